"""Optimizer comparisons on scikit-learn's digits: the demo code of ``kronfac demo``.

Demo and benchmark code, kept out of the library packages: :mod:`kronfac.cli` (``kronfac demo``,
and ``kronfac factors`` for its data and table) and ``benchmarks/optim.py`` import it, nothing in
the library does.

Tasks (``load_digits``: 1797 images 8x8 scaled to ``[0, 1]``, a fixed 1437 / 360 split):

- ``autoencoder``: 64-256-128-32-128-256-64 with tanh, a sigmoid output and binary
  cross-entropy (``BCEWithLogitsLoss`` on the logits), in the style of Hinton & Salakhutdinov
  (2006);
- ``mlp``: a classifier 64-256-256-10 with tanh and cross-entropy; test accuracy reported.

Each run trains with batches of 256 (a fresh permutation per epoch, last partial batch dropped)
and evaluates the loss on the whole training set every ``eval_every`` steps; the clock counts
the training steps only (forward, backward, optimizer step), never the evaluations.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.optim.kfac import KFAC

__all__ = [
    "KFAC_OPTIONS",
    "METHODS",
    "TABLE_HEADER",
    "Run",
    "Task",
    "digits_tasks",
    "format_table",
    "make_optimizer",
    "median_run",
    "plot_runs",
    "summarise",
    "train",
]

# Learning-rate grids (3 values each) and the K-FAC settings of the comparison.
METHODS: dict[str, tuple[float, ...]] = {
    "adam": (3e-4, 1e-3, 3e-3),
    "sgd": (0.03, 0.1, 0.3),
    "kfac": (0.1, 0.3, 0.5),
    "ekfac": (0.1, 0.3, 0.5),
}
KFAC_OPTIONS: dict[str, Any] = {
    "adaptive": False,
    "uncovered": "sgd",
    "damping": 0.1,
    "factor_decay": 0.95,
    "inverse_every": 10,
    "kl_clip": 0.1,
    "momentum": 0.9,
    "fisher": "mc",
}


@dataclass
class Task:
    """A model family, its loss and the data (training and test)."""

    name: str
    build: Callable[[], nn.Module]
    loss_fn: nn.Module
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    classify: bool

    def model(self, seed: int) -> nn.Module:
        """A fresh model with seeded initial weights."""
        torch.manual_seed(seed)
        return self.build()


@dataclass
class Run:
    """One training run: the loss curve against steps and training seconds."""

    task: str
    method: str
    lr: float
    seed: int
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    test_accuracy: float | None = None

    @property
    def final_loss(self) -> float:
        """The last evaluated training loss (``inf`` if it diverged)."""
        loss = self.losses[-1] if self.losses else math.inf
        return loss if math.isfinite(loss) else math.inf

    def reached(self, target: float) -> tuple[int, float] | None:
        """``(steps, seconds)`` at the first evaluation with loss <= ``target``, or ``None``."""
        for s, t, loss in zip(self.steps, self.seconds, self.losses, strict=True):
            if loss <= target:
                return s, t
        return None

    @property
    def seconds_per_step(self) -> float:
        """Amortised training seconds per step."""
        return self.seconds[-1] / self.steps[-1] if self.steps and self.steps[-1] else math.nan


def digits_tasks() -> list[Task]:
    """The autoencoder and the classifier on the digits (needs scikit-learn).

    Raises:
        ImportError: Without scikit-learn (``pip install 'kronfac[demo]'``).
    """
    from sklearn.datasets import load_digits

    X_np, y_np = load_digits(return_X_y=True)
    X = torch.as_tensor(X_np, dtype=torch.float32) / 16.0
    y = torch.as_tensor(y_np, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1437], perm[1437:]

    def autoencoder() -> nn.Module:
        sizes = [64, 256, 128, 32, 128, 256, 64]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)  # logits: the sigmoid is in BCEWithLogitsLoss

    def mlp() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
        )

    return [
        Task("autoencoder", autoencoder, nn.BCEWithLogitsLoss(), X[train], X[train], X[test],
             X[test], classify=False),
        Task("mlp", mlp, nn.CrossEntropyLoss(), X[train], y[train], X[test], y[test],
             classify=True),
    ]  # fmt: skip


def make_optimizer(
    method: str, model: nn.Module, lr: float, loss_fn: nn.Module
) -> torch.optim.Optimizer:
    """``"adam"``, ``"sgd"`` (momentum 0.9), ``"kfac"`` or ``"ekfac"`` (:data:`KFAC_OPTIONS`).

    K-FAC watches ``loss_fn``, the loss module the training loop calls.

    Raises:
        ValueError: For an unknown method.
    """
    if method == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if method in ("kfac", "ekfac"):
        return KFAC(model, lr, loss_fn=loss_fn, ekfac=method == "ekfac", **KFAC_OPTIONS)
    raise ValueError(f"Unknown method {method!r}; expected one of {list(METHODS)}.")


@torch.no_grad()
def _evaluate(task: Task, model: nn.Module) -> float:
    return float(task.loss_fn(model(task.X_train), task.y_train))


def train(
    task: Task,
    method: str,
    lr: float,
    seed: int,
    max_steps: int,
    *,
    eval_every: int = 25,
    target: float | None = None,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> Run:
    """Train one model; stop after ``max_steps`` or once the loss is at most ``target``.

    A loss that turns NaN / Inf ends the run (it diverged; its final loss reads ``inf``).
    """
    model = task.model(seed)
    optimizer = make_optimizer(method, model, lr, task.loss_fn)
    g = torch.Generator().manual_seed(seed)
    n = len(task.X_train)
    run = Run(task.name, method, lr, seed, [0], [0.0], [_evaluate(task, model)])
    order: list[Tensor] = []
    elapsed, step = 0.0, 0
    while step < max_steps:
        if not order:
            order = list(torch.randperm(n, generator=g).split(batch_size))
            if len(order[-1]) < batch_size:
                order.pop()
        idx = order.pop(0)
        X, y = task.X_train[idx], task.y_train[idx]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(X), y)  # K-FAC records the batch here (MC labels drawn)
        loss.backward()
        optimizer.step()
        elapsed += time.perf_counter() - start
        step += 1
        if progress is not None:
            progress(1)
        if step % eval_every == 0 or step == max_steps:
            run.steps.append(step)
            run.seconds.append(elapsed)
            run.losses.append(_evaluate(task, model))
            if not math.isfinite(run.losses[-1]):
                break
            if target is not None and run.losses[-1] <= target:
                break
    if task.classify:
        with torch.no_grad():
            predicted = model(task.X_test).argmax(dim=-1)
        run.test_accuracy = float((predicted == task.y_test).float().mean())
    return run


def median_run(runs: Sequence[Run], target: float | None = None) -> Run:
    """The run with the median time to ``target`` (or median final loss without one)."""

    def key(r: Run) -> float:
        if target is None:
            return r.final_loss
        hit = r.reached(target)
        return math.inf if hit is None else hit[1]

    ranked = sorted(runs, key=key)
    return ranked[(len(ranked) - 1) // 2]


def summarise(runs: Iterable[Run], target: float, adam_seconds_per_step: float) -> list[list[str]]:
    """One row per method at its best learning rate (least median time to ``target``).

    Cells: method, learning rate, median steps and seconds to the target (``-`` unless most
    seeds reach it), that time over Adam's, the median step time over ``adam_seconds_per_step``,
    the median final loss and (classifiers) the median test accuracy, as :data:`TABLE_HEADER`.
    """
    by_method: dict[str, dict[float, list[Run]]] = {}
    for r in runs:
        by_method.setdefault(r.method, {}).setdefault(r.lr, []).append(r)
    best: dict[str, tuple[float, list[Run], float]] = {}
    for method, per_lr in by_method.items():
        lr, group = min(
            per_lr.items(),
            key=lambda kv: (
                _median_time(kv[1], target),
                statistics.median(r.final_loss for r in kv[1]),
            ),
        )
        best[method] = (lr, group, _median_time(group, target))
    adam_time = best["adam"][2] if "adam" in best else math.nan
    rows = []
    for method, (lr, group, secs) in best.items():
        hits = [h for h in (r.reached(target) for r in group) if h is not None]
        reached = math.isfinite(secs)
        per_step = statistics.median(r.seconds_per_step for r in group)
        accs = [r.test_accuracy for r in group if r.test_accuracy is not None]
        rows.append(
            [
                method,
                f"{lr:g}",
                f"{statistics.median(h[0] for h in hits):.0f}" if reached else "-",
                f"{secs:.2f}" if reached else "-",
                f"{secs / adam_time:.2f}" if reached and math.isfinite(adam_time) else "-",
                f"{per_step / adam_seconds_per_step:.2f}",
                f"{statistics.median(r.final_loss for r in group):.4g}",
                f"{100 * statistics.median(accs):.1f}" if accs else "",
            ]
        )
    return rows


TABLE_HEADER = [
    "method",
    "lr",
    "steps to target",
    "s to target",
    "time / Adam's",
    "step time / Adam's",
    "final loss",
    "test acc %",
]


def _median_time(runs: Sequence[Run], target: float) -> float:
    """Median seconds to ``target`` over ``runs`` (``inf`` unless most runs reach it)."""
    times = [h[1] if (h := r.reached(target)) is not None else math.inf for r in runs]
    return statistics.median(times)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def plot_runs(
    curves: dict[str, list[Run]], targets: dict[str, float], path: Any, title: str = ""
) -> str:
    """Training loss against training seconds, one panel per task (needs matplotlib).

    Args:
        curves: Task name → the runs to draw (one line each, labelled by method and lr).
        targets: Task name → the target loss (a dashed line).
        path: Where to write the PNG.
        title: The figure's title.

    Returns:
        A line to print: where the plot is, or that matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(matplotlib not installed: pip install 'kronfac[plot]' for the plot)"
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    for ax, (task, runs) in zip(axes[0], curves.items(), strict=True):
        for r in runs:
            ax.plot(r.seconds, r.losses, label=f"{r.method} (lr {r.lr:g})")
        if task in targets:
            ax.axhline(targets[task], color="gray", linestyle="--", linewidth=1, label="target")
        ax.set_yscale("log")
        ax.set_xlabel("training seconds")
        ax.set_ylabel("training loss")
        ax.set_title(task)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"
