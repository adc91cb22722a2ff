"""The ``kronfac`` command line: ``kronfac demo`` end to end, argument errors, missing extras."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

import kronfac
from kronfac import cli

needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="kronfac demo needs scikit-learn"
)

LINEAR_NAMES = [n for n, m in cli.build_mlp().named_modules() if isinstance(m, nn.Linear)]


def _table_rows(out: str) -> dict[str, list[str]]:
    """Rows of the printed factor table keyed by module name."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("module"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip() or line.startswith("cond = inf"):
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


@needs_sklearn
def test_demo_prints_a_row_per_linear_layer(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert LINEAR_NAMES == ["fc1", "fc2", "fc3"]
    assert "test accuracy" in out
    rows = _table_rows(out)
    assert list(rows) == LINEAR_NAMES
    # Joint bias: A is (d_in + 1)², S is d_out².
    assert rows["fc1"][1:3] == ["65x65", "128x128"]
    assert rows["fc2"][1:3] == ["129x129", "64x64"]
    assert rows["fc3"][1:3] == ["65x65", "10x10"]
    for cells in rows.values():
        assert len(cells) == 8
        for cell in cells[3:]:
            assert cell == "inf" or float(cell) >= 0
    assert "compute_factors:" in out and "forward+backward" in out
    assert torch.get_num_threads() == threads  # the demo restores the thread count


@needs_sklearn
def test_demo_save_writes_loadable_factors(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f.safetensors"
    argv = ["demo", "--epochs", "1", "--fisher", "forward-only", "--threads", "1"]
    argv += ["--save", str(path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert str(path) in out
    factors = kronfac.KroneckerFactors.load(path)
    assert len(factors) == 3
    assert list(factors) == LINEAR_NAMES
    assert factors.options["fisher"] == "forward-only"
    assert factors.num_data == 1438
    torch.testing.assert_close(factors["fc3"].S, torch.eye(10))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["demo", "--fisher", "bogus"],
        ["demo", "--epochs", "-1"],
        ["demo", "--epochs", "two"],
        ["demo", "--threads", "0"],
        ["demo", "--save", "/no/such/folder/f.safetensors"],
    ],
)
def test_bad_arguments_exit_with_status_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_demo_without_sklearn_exits_with_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A None entry in sys.modules makes `import` raise ImportError, even for cached modules.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert cli.main(["demo", "--epochs", "1"]) == 2
    captured = capsys.readouterr()
    assert "kronfac demo needs scikit-learn: pip install 'kronfac[demo]'" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_condition_number_is_inf_for_singular_factors() -> None:
    assert cli._condition_number(torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)) == float("inf")
    assert cli._condition_number(torch.tensor([-1e-12, 1.0], dtype=torch.float64)) == float("inf")
    assert cli._condition_number(torch.tensor([0.5, 2.0], dtype=torch.float64)) == 4.0
