"""Time this checkout against an earlier commit, in one process, interleaved.

The earlier commit's ``src/kronfac`` is extracted (``git archive``) into a temporary folder as
the package ``kronfac_<rev>``, so both versions run side by side on the same data, the same
threads and the same load: every configuration is timed in rounds that alternate the two
versions, and the medians are reported as a ratio (this checkout / the earlier commit).

Rounds alternate the order of the versions. Comparing a commit with itself
(``--rev HEAD`` on a clean checkout) shows the noise of the machine: 0.93–1.07 on the shared
2-core machine of BENCHMARKS.md.

Configurations: ``compute_factors`` on W1 (MLP 784-512-512-10, 2048 samples in batches of 256,
mc and empirical) and W3 (the Llama of benchmarks/factors.py, mc), and one training step of
the K-FAC optimizer on W1 (batch 256, ``inverse_every=10``: the median over a window of steps
covers the refreshes in proportion) against a plain forward + backward pass.

    python benchmarks/compare_commits.py --rev 093bd46 [--repeats 7] [--steps 30]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch
from _common import machine, setup_threads
from factors import w1, w3
from torch import nn

import kronfac

ROOT = Path(__file__).resolve().parents[1]


def load_revision(rev: str, into: Path) -> ModuleType:
    """``src/kronfac`` of ``rev`` as the package ``kronfac_<rev>`` (imports rewritten)."""
    name = f"kronfac_{re.sub(r'[^0-9A-Za-z]', '_', rev)}"
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "src/kronfac"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / name
    (into / "src" / "kronfac").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"\bkronfac\b(?=[.\s])", name, text)
        path.write_text(text, encoding="utf-8")
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def optimizer(lib: ModuleType, model: nn.Module, loss_fn: nn.Module) -> torch.optim.Optimizer:
    """The K-FAC optimizer of ``lib`` (which may predate the ``loss_fn`` argument)."""
    KFAC = importlib.import_module(f"{lib.__name__}.optim").KFAC
    params = inspect.signature(lib.optim.preconditioner.KFACPreconditioner).parameters
    extra = {"loss_fn": loss_fn} if "loss_fn" in params else {}
    return KFAC(model, 0.1, inverse_every=10, **extra)


def _order(names: list[str], r: int) -> list[str]:
    """The versions in round ``r``'s order: alternated, so neither always runs first."""
    return names if r % 2 else names[::-1]


def step_times(libs: dict[str, ModuleType], steps: int, rounds: int) -> dict[str, float]:
    """Median seconds per W1 training step of each version's optimizer (and of plain SGD)."""
    torch.manual_seed(0)
    X, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    loss_fn = nn.CrossEntropyLoss()
    states = {}
    for name in ["forward+backward", *libs]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        opt = (
            torch.optim.SGD(model.parameters(), lr=1e-3)
            if name == "forward+backward"
            else optimizer(libs[name], model, loss_fn)
        )
        states[name] = (model, opt)
    times: dict[str, list[float]] = {k: [] for k in states}
    for r in range(rounds + 1):  # the first round warms up
        for name in _order(list(states), r):
            model, opt = states[name]
            start = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad()
                loss_fn(model(X), y).backward()
                opt.step()
            if r:
                times[name].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def factor_times(libs: dict[str, ModuleType], rounds: int) -> dict[str, dict[str, float]]:
    """Median seconds of ``compute_factors`` per workload / Fisher type and version."""
    out = {}
    for label, make, fishers in (("W1", w1, ("mc", "empirical")), ("W3", w3, ("mc",))):
        model, loss_fn, data, opts, _ = make()
        for fisher in fishers:
            times: dict[str, list[float]] = {k: [] for k in libs}
            for r in range(rounds + 1):
                for name in _order(list(libs), r):
                    lib = libs[name]
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        start = time.perf_counter()
                        lib.compute_factors(model, loss_fn, data, fisher=fisher, **opts)
                    if r:
                        times[name].append(time.perf_counter() - start)
            out[f"{label} compute_factors {fisher}"] = {
                k: statistics.median(v) for k, v in times.items()
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the earlier commit (git revision)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per round")
    args = parser.parse_args(argv)
    setup_threads()
    with tempfile.TemporaryDirectory() as tmp:
        old = load_revision(args.rev, Path(tmp))
        libs = {"this checkout": kronfac, args.rev: old}
        print(f"Machine: {machine()}\n")
        print(f"| configuration | this checkout / {args.rev} | x forward+backward (this, old) |")
        print("|---|---|---|")
        steps = step_times(libs, args.steps, args.repeats)
        base = steps["forward+backward"]
        print(
            f"| W1 K-FAC optimizer step | {steps['this checkout'] / steps[args.rev]:.2f} | "
            f"{steps['this checkout'] / base:.2f}, {steps[args.rev] / base:.2f} |"
        )
        for config, t in factor_times(libs, args.repeats).items():
            print(f"| {config} | {t['this checkout'] / t[args.rev]:.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
