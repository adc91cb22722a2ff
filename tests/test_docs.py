"""The documentation stands alone and stays true of the code.

Every relative Markdown link of README.md, BENCHMARKS.md and docs/*.md must name a file of the
repository (never a path outside it, such as ``../shared/...``); no source, test, benchmark or
documentation file may refer to internal documents kept beside the repository; and the imports
between kronfac's packages follow the one-way graph of docs/architecture.md.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = sorted(
    [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")],
    key=lambda p: p.as_posix(),
)
SEARCHED = ("src", "tests", "docs", "benchmarks", "README.md", "BENCHMARKS.md")
FORBIDDEN = ("DESIGN.md", "shared/")
# Build outputs and caches (ignored by git) are not the project's text.
SKIPPED_DIRS = {"__pycache__", "build", "dist", "results"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".json", ".sh"}

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_INLINE = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+\"[^\"]*\")?\s*\)"
)
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_links(text: str) -> list[str]:
    """The targets of the inline, image and reference links of ``text``, outside code."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", text))
    targets = [m.group(1) for m in _INLINE.finditer(text)]
    targets += [m.group(1) for m in _REFERENCE.finditer(text)]
    return [t[1:-1] if t.startswith("<") else t for t in targets]


def link_problem(source: Path, target: str) -> str | None:
    """Why the link ``target`` of ``source`` does not resolve to a repository file, or None."""
    if _SCHEME.match(target) or target.startswith("#"):  # web address, or an anchor
        return None
    path = target.split("#", 1)[0].split("?", 1)[0]
    if path.startswith("/"):
        return "is an absolute path"
    resolved = (source.parent / path).resolve()
    if not resolved.is_relative_to(ROOT):
        return "points outside the repository"
    if not resolved.exists():
        return "names no file"
    return None


def searched_files() -> list[Path]:
    """The text files of :data:`SEARCHED`, without build outputs, caches and this file."""
    files = []
    for name in SEARCHED:
        top = ROOT / name
        candidates = [top] if top.is_file() else sorted(top.rglob("*"))
        for path in candidates:
            parts = path.relative_to(ROOT).parts
            if any(
                p in SKIPPED_DIRS or p.startswith(".") or p.endswith(".egg-info") for p in parts
            ):
                continue
            if path.is_file() and path.suffix in TEXT_SUFFIXES and path != Path(__file__).resolve():
                files.append(path)
    return files


def test_markdown_files_found() -> None:
    assert ROOT / "README.md" in MARKDOWN
    assert any(p.parent.name == "docs" for p in MARKDOWN)


def test_link_parser() -> None:
    text = (
        'See [a](docs/a.md), ![img](b.png "title"), [web](https://x.org/y), [c](<d e.md>),\n'
        "`[not](code.md)` and\n```\n[fenced](code.md)\n```\n[ref]: ../outside.md\n"
    )
    assert markdown_links(text) == [
        "docs/a.md",
        "b.png",
        "https://x.org/y",
        "d e.md",
        "../outside.md",
    ]
    readme = ROOT / "README.md"
    assert link_problem(readme, "../shared/DESIGN.md") == "points outside the repository"
    assert link_problem(readme, "docs/no_such_file.md") == "names no file"
    assert link_problem(readme, "/etc/hosts") == "is an absolute path"
    assert link_problem(readme, "https://example.org") is None
    assert link_problem(readme, "#conventions") is None


@pytest.mark.parametrize("source", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_inside_repository(source: Path) -> None:
    problems = [
        f"{target} {why}"
        for target in markdown_links(source.read_text(encoding="utf-8"))
        if (why := link_problem(source, target)) is not None
    ]
    assert not problems, f"{source.relative_to(ROOT)}: " + "; ".join(problems)


def test_no_reference_to_documents_outside_repository() -> None:
    files = searched_files()
    assert any(p.suffix == ".py" for p in files) and any(p.suffix == ".md" for p in files)
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(word in line for word in FORBIDDEN)
    ]
    assert not hits, "References to documents outside the repository:\n" + "\n".join(hits)


# docs/architecture.md: cli → demo → {optim, laplace, influence, compat} → operators → factors →
# {layers, likelihoods, linalg} → {errors, registry}. A package may import the packages of the
# layers below its own (never one of its layer, such as layers ↔ likelihoods); only cli imports
# the top-level ``kronfac``, and nothing imports cli or (but cli) demo.
LAYERS = (
    ("cli",),
    ("demo",),
    ("optim", "laplace", "influence", "compat"),
    ("operators",),
    ("factors",),
    ("layers", "likelihoods", "linalg"),
    ("errors", "registry", "distributed"),
)
ALLOWED_IMPORTS = {
    package: {below for layer in LAYERS[i + 1 :] for below in layer}
    for i, layer in enumerate(LAYERS)
    for package in layer
}
ALLOWED_IMPORTS["cli"].add("kronfac")


def kronfac_imports(path: Path) -> set[str]:
    """The kronfac packages ``path`` imports (``"kronfac"``: the top-level package itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "kronfac":
                found.add(parts[1] if len(parts) > 1 else "kronfac")
    return found


def imports_torch_nn(path: Path) -> bool:
    """Whether ``path`` imports ``torch.nn`` (``import torch.nn``, ``from torch import nn``)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(
            a.name == "torch.nn" or a.name.startswith("torch.nn.") for a in node.names
        ):
            return True
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "torch.nn" or node.module.startswith("torch.nn."):
                return True
            if node.module == "torch" and any(a.name == "nn" for a in node.names):
                return True
    return False


def test_imports_point_one_way() -> None:
    package = ROOT / "src" / "kronfac"
    wrong = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.as_posix() == "__init__.py":  # the public names: may re-export anything
            continue
        own = rel.parts[0].removesuffix(".py")
        assert own in ALLOWED_IMPORTS, f"{rel}: package {own!r} missing from docs/architecture.md"
        extra = kronfac_imports(path) - ALLOWED_IMPORTS[own] - {own}
        if extra:
            wrong.append(f"{rel} imports {sorted(extra)}")
    assert not wrong, "Imports against the graph of docs/architecture.md: " + "; ".join(wrong)


def test_linalg_free_of_torch_nn() -> None:
    linalg = sorted((ROOT / "src" / "kronfac" / "linalg").glob("*.py"))
    assert linalg
    assert not [p.name for p in linalg if imports_torch_nn(p)]


def _python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section titled ``section``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.DOTALL)


def test_readme_language_model_examples_run_as_written(capsys: pytest.CaptureFixture) -> None:
    """GPT-2 with the defaults and Llama with padding, exactly as the README shows them."""
    pytest.importorskip("transformers")
    import warnings

    import kronfac

    blocks = _python_blocks("Language models")
    assert len(blocks) == 2
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        exec(blocks[0], namespace)  # GPT-2, every module selected
        left_out = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
        assert any("'transformer.wpe'" in m for m in left_out)
        assert len(namespace["factors"]) == 9
        exec(blocks[1], namespace)  # Llama with padding, low-rank factors
    K = namespace["K"]
    assert isinstance(K.factors["model.layers.0.mlp.up_proj"].S, kronfac.LowRankFactor)
    assert "model.layers.0.mlp.up_proj" in K.factors and "lm_head" not in K.factors
    assert "transformer.wte" in capsys.readouterr().out


def test_readme_laplace_example_runs_as_written(capsys: pytest.CaptureFixture) -> None:
    """The digits Laplace example: trained, tuned, a predictive that sums to one."""
    pytest.importorskip("sklearn")
    import torch

    (block,) = _python_blocks("Be Bayesian: Laplace approximations")
    namespace: dict = {}
    torch.manual_seed(0)
    exec(block, namespace)
    probs, la = namespace["probs"], namespace["la"]
    assert probs.shape == (397, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(397))
    assert la.prior_precision != 1.0  # tuned
    assert "log evidence" in capsys.readouterr().out
