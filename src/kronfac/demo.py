"""Optimizer races, Laplace calibration and influence on the digits: the code of ``kronfac demo``.

Demo and benchmark code, kept out of the library packages: :mod:`kronfac.cli` (``kronfac demo``,
``kronfac demo laplace``, ``kronfac demo influence``, and ``kronfac factors`` for its data and
table), ``benchmarks/optim.py``, ``benchmarks/laplace.py`` and ``benchmarks/influence.py``
import it, nothing in the library does.

Tasks (:func:`load_tasks`):

- ``autoencoder``: scikit-learn's ``load_digits`` (1797 images 8x8 scaled to ``[0, 1]``, a fixed
  1437 / 360 split), 64-256-128-32-128-256-64 with tanh, a sigmoid output and binary
  cross-entropy (``BCEWithLogitsLoss`` on the logits), in the style of Hinton & Salakhutdinov
  (2006); batches of 256 (a fresh permutation per epoch, the last partial batch dropped);
  evaluated by the loss on the whole training set;
- ``mlp``: the same digits, a classifier 64-256-256-10 with tanh and cross-entropy; evaluated
  likewise, test accuracy reported;
- ``lm``: a byte-level decoder-only transformer (:class:`ByteTransformer`) on the Python
  standard library's own source files (:func:`stdlib_bytes`, the last 10% held out), batches of
  32 random windows, next-byte cross-entropy on the flattened logits ``[B·T, 256]``; evaluated
  by the mean next-byte loss over a fixed set of held-out windows.

Methods (:data:`METHODS`, :func:`make_optimizer`): Adam, AdamW, SGD with momentum, Muon on the
hidden matrices with AdamW on the rest, K-FAC with a fixed learning rate and momentum
(``kfac-fixed``), and the adaptive K-FAC and EKFAC of :class:`kronfac.optim.KFAC`.

A race (:func:`race`) sets a target with Adam, runs every method to it, and times the methods'
steps apart from the runs, in interleaved rounds on the same batches (:func:`time_steps`): the
time to the target is the steps to the target times that median step time, so that a busy
machine slows every method alike.

Laplace on the digits (:func:`laplace_digits`): an MLP trained to its MAP under a Gaussian prior
(:func:`train_map`) against :class:`~kronfac.laplace.Laplace` approximations of all its layers
or the last one (:data:`LAPLACE_VARIANTS`), compared by test accuracy, NLL and expected
calibration error (:func:`calibration`), in a table (:func:`laplace_table`) and a reliability
diagram (:func:`plot_reliability`).

Mislabelled digits (:func:`mislabel_detection`): an MLP trained on digits with a share of
flipped training labels (:func:`mislabeled_digits`); each training image is scored by its
self-influence under :class:`~kronfac.influence.Influence` (EKFAC, K-FAC) and by the
per-example loss and gradient norm (:func:`per_example_losses`), each score judged by its AUROC
at finding the flipped labels (:class:`Detection`, :func:`influence_table`); the most helpful and
harmful training images of a few test images are drawn by :func:`plot_influential`.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from kronfac.influence import Influence
from kronfac.laplace import Laplace
from kronfac.optim.kfac import KFAC

__all__ = [
    "DEMO_LAPLACE_VARIANTS",
    "ECE_BINS",
    "INFLUENCE_BASELINES",
    "INFLUENCE_BATCH",
    "INFLUENCE_CURVATURES",
    "INFLUENCE_EPOCHS",
    "INFLUENCE_HEADER",
    "INFLUENCE_HIDDEN",
    "INFLUENCE_NOISE",
    "INFLUENCE_TRAIN",
    "KFAC_FIXED_OPTIONS",
    "LAPLACE_EPOCHS",
    "LAPLACE_HEADER",
    "LAPLACE_PRIOR",
    "LAPLACE_SPLIT",
    "LAPLACE_VARIANTS",
    "METHODS",
    "TABLE_HEADER",
    "TASKS",
    "ByteTransformer",
    "Calibration",
    "Detection",
    "DigitsSplit",
    "LaplaceRun",
    "LaplaceVariant",
    "MislabelStudy",
    "MislabeledDigits",
    "OptimizerChain",
    "Race",
    "Run",
    "Stepper",
    "Task",
    "Timing",
    "calibration",
    "digits_data",
    "digits_split",
    "digits_tasks",
    "expected_calibration_error",
    "fit_laplace",
    "format_table",
    "influence_mlp",
    "influence_queries",
    "influence_table",
    "laplace_digits",
    "laplace_mlp",
    "laplace_table",
    "lm_task",
    "load_tasks",
    "make_optimizer",
    "mislabel_detection",
    "mislabeled_digits",
    "per_example_losses",
    "plot_influential",
    "plot_races",
    "plot_reliability",
    "race",
    "stdlib_bytes",
    "time_steps",
    "train",
    "train_map",
    "train_step",
]

Batch = tuple[Tensor, Tensor]

TASKS = ("autoencoder", "mlp", "lm")

# Learning-rate grids. Adaptive K-FAC / EKFAC: a factor on the step the quadratic model chooses.
METHODS: dict[str, tuple[float, ...]] = {
    "adam": (3e-4, 1e-3, 3e-3),
    "adamw": (3e-4, 1e-3, 3e-3),
    "sgd": (0.03, 0.1, 0.3),
    "muon": (0.01, 0.02, 0.05),
    "kfac-fixed": (0.1, 0.3, 0.5),
    "kfac": (0.5, 1.0),
    "ekfac": (0.5, 1.0),
}
# AdamW's decoupled weight decay, also that of the AdamW beside Muon.
WEIGHT_DECAY = 0.01
# The learning rate of the AdamW that takes Muon's other parameters.
MUON_ADAMW_LR = 3e-3
# ``kfac-fixed``: the fixed-learning-rate K-FAC of the earlier benchmarks.
KFAC_FIXED_OPTIONS: dict[str, Any] = {
    "adaptive": False,
    "uncovered": "sgd",
    "damping": 0.1,
    "factor_decay": 0.95,
    "inverse_every": 10,
    "kl_clip": 0.1,
    "momentum": 0.9,
    "fisher": "mc",
}


class Stepper(Protocol):
    """What the training loop needs of an optimizer."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients."""

    def step(self) -> Any:
        """Update the parameters from their gradients."""


@dataclass
class Task:
    """A model family, its loss, its training batches and its evaluation.

    Attributes:
        name: The task's name.
        build: A fresh model (the caller seeds torch).
        loss_fn: The loss module the training loop calls (K-FAC watches it).
        batches: Seed → the endless stream of training batches ``(X, y)``.
        eval_data: The batch of the evaluation loss (:meth:`evaluate`).
        evaluation: What :meth:`evaluate` measures, for the reports.
        about: A line on the data, for the reports.
        test_data: The test set of a classifier (:meth:`accuracy`), or ``None``.
        forward: ``forward(model, X) -> loss input`` when the loss does not take the model's
            output as it is (K-FAC's ``forward=``); ``None``: ``model(X)``.
        kfac_options: Further options of every :class:`~kronfac.optim.KFAC` on the task.
    """

    name: str
    build: Callable[[], nn.Module]
    loss_fn: nn.Module
    batches: Callable[[int], Iterator[Batch]]
    eval_data: Batch
    evaluation: str = "training loss"
    about: str = ""
    test_data: Batch | None = None
    forward: Callable[[nn.Module, Tensor], Tensor] | None = None
    kfac_options: dict[str, Any] = field(default_factory=dict)

    def model(self, seed: int) -> nn.Module:
        """A fresh model with seeded initial weights."""
        torch.manual_seed(seed)
        return self.build()

    def loss(self, model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
        """The loss of ``model`` on ``(X, y)``, through :attr:`loss_fn` (K-FAC records it)."""
        output = model(X) if self.forward is None else self.forward(model, X)
        loss: Tensor = self.loss_fn(output, y)
        return loss

    def describe(self) -> str:
        """A line on the task: parameters, batch shapes, evaluation, data."""
        params = sum(p.numel() for p in self.model(0).parameters())
        X, y = next(self.batches(0))
        line = (
            f"{self.name}: {params:,} parameters, batches X {tuple(X.shape)} y {tuple(y.shape)}, "
            f"evaluated by the {self.evaluation}"
        )
        return f"{line}; {self.about}" if self.about else line

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        """The loss on :attr:`eval_data` (K-FAC records nothing without gradients)."""
        return float(self.loss(model, *self.eval_data))

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float | None:
        """The accuracy on :attr:`test_data` (``None`` without)."""
        if self.test_data is None:
            return None
        X, y = self.test_data
        return float((model(X).argmax(dim=-1) == y).float().mean())


# -- the digits ---------------------------------------------------------------------------------


def digits_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``X_train, y_train, X_test, y_test`` of the digits: 1437 / 360, pixels in ``[0, 1]``.

    Raises:
        ImportError: Without scikit-learn (``pip install 'kronfac[demo]'``).
    """
    from sklearn.datasets import load_digits

    X_np, y_np = load_digits(return_X_y=True)
    X = torch.as_tensor(X_np, dtype=torch.float32) / 16.0
    y = torch.as_tensor(y_np, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1437], perm[1437:]
    return X[train], y[train], X[test], y[test]


def _epochs(X: Tensor, y: Tensor, batch_size: int) -> Callable[[int], Iterator[Batch]]:
    """Seed → batches of a fresh permutation per epoch, the last partial batch dropped."""

    def batches(seed: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(len(X), generator=g).split(batch_size):
                if len(idx) == batch_size:
                    yield X[idx], y[idx]

    return batches


def digits_tasks(batch_size: int = 256) -> list[Task]:
    """The autoencoder and the classifier on the digits (needs scikit-learn).

    Raises:
        ImportError: Without scikit-learn (``pip install 'kronfac[demo]'``).
    """
    X_train, y_train, X_test, y_test = digits_data()
    about = f"digits, {len(X_train)} training / {len(X_test)} test images"

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
        Task("autoencoder", autoencoder, nn.BCEWithLogitsLoss(),
             _epochs(X_train, X_train, batch_size), (X_train, X_train), about=about),
        Task("mlp", mlp, nn.CrossEntropyLoss(), _epochs(X_train, y_train, batch_size),
             (X_train, y_train), about=about, test_data=(X_test, y_test)),
    ]  # fmt: skip


# -- the byte-level language model --------------------------------------------------------------


def stdlib_bytes(max_bytes: int = 4_000_000) -> Tensor:
    """The standard library's ``Lib/*.py`` files, sorted by name, concatenated, capped.

    Args:
        max_bytes: At most this many bytes (from the start).

    Returns:
        A ``uint8`` tensor of the bytes.
    """
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    data = bytearray()
    for path in files:
        data += path.read_bytes()
        if len(data) >= max_bytes:
            break
    return torch.frombuffer(data[:max_bytes], dtype=torch.uint8).clone()


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 2-layer GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, h: Tensor) -> Tensor:
        """``[B, T, d] -> [B, T, d]``."""
        B, T, d = h.shape
        x = self.norm1(h)
        q, k, v = (
            p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.out(a.transpose(1, 2).reshape(B, T, d))
        return h + self.down(F.gelu(self.up(self.norm2(h))))


class ByteTransformer(nn.Module):
    """A decoder-only transformer over bytes: logits ``[B, T, 256]`` for inputs ``[B, T]``.

    Byte embedding plus a learned position embedding (one ``[1, T, d]`` output shared across
    the batch, which K-FAC leaves to AdamW), pre-norm blocks, a final LayerNorm and a linear
    head (the last module, so that Muon's selection leaves it out).

    Args:
        context: The longest input ``T``.
        width: The model width ``d``.
        heads: Attention heads per block.
        blocks: Number of blocks.
    """

    def __init__(self, context: int = 64, width: int = 64, heads: int = 4, blocks: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(_Block(width, heads) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        self.register_buffer("positions", torch.arange(context)[None], persistent=False)

    def forward(self, X: Tensor) -> Tensor:
        """Next-byte logits ``[B, T, 256]`` of the bytes ``X`` ``[B, T]``."""
        positions: Tensor = self.positions[:, : X.shape[1]]  # type: ignore[index]
        h = self.tok(X) + self.pos(positions)
        logits: Tensor = self.head(self.norm(self.blocks(h)))
        return logits


def _flat_logits(model: nn.Module, X: Tensor) -> Tensor:
    """The LM's loss input: logits ``[B·T, 256]``."""
    logits: Tensor = model(X)
    return logits.reshape(-1, 256)


def _windows(data: Tensor, starts: Tensor, context: int) -> Batch:
    """Inputs ``[n, T]`` and next-byte targets ``[n·T]`` of the windows at ``starts``."""
    window = data[starts[:, None] + torch.arange(context + 1)].long()
    return window[:, :-1], window[:, 1:].reshape(-1)


def lm_task(
    *,
    context: int = 64,
    width: int = 64,
    heads: int = 4,
    blocks: int = 2,
    batch_size: int = 32,
    max_bytes: int = 4_000_000,
    eval_windows: int = 128,
) -> Task:
    """The byte-level transformer on the standard library's source (module docstring).

    Args:
        context: Window length ``T`` (and the model's context).
        width: Model width.
        heads: Attention heads.
        blocks: Transformer blocks.
        batch_size: Windows per training batch, drawn uniformly from the training bytes by a
            generator of the run's seed.
        max_bytes: Cap on the text (:func:`stdlib_bytes`); the last 10% is held out.
        eval_windows: Held-out windows of the evaluation, evenly spaced.
    """
    data = stdlib_bytes(max_bytes)
    split = len(data) - len(data) // 10
    train, held_out = data[:split], data[split:]
    last = len(held_out) - context - 1
    eval_data = _windows(held_out, torch.linspace(0, last, eval_windows).long(), context)

    def batches(seed: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        while True:
            starts = torch.randint(0, len(train) - context, (batch_size,), generator=g)
            yield _windows(train, starts, context)

    return Task(
        "lm",
        lambda: ByteTransformer(context, width, heads, blocks),
        nn.CrossEntropyLoss(),
        batches,
        eval_data,
        evaluation="held-out loss",
        about=(
            f"Lib/*.py of Python {platform.python_version()}: {len(train):,} training bytes, "
            f"{len(held_out):,} held out ({eval_windows} windows of {context} evaluated)"
        ),
        forward=_flat_logits,
        kfac_options={"exclude": ["pos"]},  # shared across the batch: no per-example gradients
    )


def load_tasks(names: Sequence[str] = TASKS) -> list[Task]:
    """The tasks of ``names`` (:data:`TASKS`), in that order.

    Raises:
        ValueError: For an unknown name.
        ImportError: For a digits task without scikit-learn.
    """
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}; expected some of {list(TASKS)}.")
    tasks = {t.name: t for t in digits_tasks()} if {"autoencoder", "mlp"} & set(names) else {}
    if "lm" in names:
        tasks["lm"] = lm_task()
    return [tasks[n] for n in names]


# -- the methods --------------------------------------------------------------------------------


class OptimizerChain:
    """Several optimizers over disjoint parameters, stepped and cleared as one."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every optimizer's gradients."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """Step every optimizer."""
        for opt in self.optimizers:
            opt.step()


def _muon(model: nn.Module, lr: float) -> OptimizerChain:
    """Muon on the hidden matrices, AdamW (:data:`MUON_ADAMW_LR`) on every other parameter.

    The hidden matrices are the weights of the ``nn.Linear`` modules but the last one (the
    output head); embeddings, the head and 1-D parameters go to AdamW.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hidden = [m.weight for m in linears[:-1]]
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return OptimizerChain(
        torch.optim.Muon(hidden, lr=lr, weight_decay=0.0, momentum=0.95, nesterov=True),
        torch.optim.AdamW(rest, lr=MUON_ADAMW_LR, weight_decay=WEIGHT_DECAY),
    )


def make_optimizer(method: str, model: nn.Module, lr: float, task: Task) -> Stepper:
    """The optimizer of ``method`` (:data:`METHODS`) for ``model`` on ``task``.

    ``adam``; ``adamw`` (:data:`WEIGHT_DECAY`); ``sgd`` (momentum 0.9); ``muon`` (Muon with
    momentum 0.95, Nesterov, no weight decay, on the hidden matrices; AdamW on the rest);
    ``kfac-fixed`` (:data:`KFAC_FIXED_OPTIONS`); ``kfac`` and ``ekfac``: adaptive
    :class:`~kronfac.optim.KFAC` with its defaults, ``lr`` a factor on the chosen step. The
    K-FAC ones watch ``task.loss_fn`` and get ``task.forward`` and ``task.kfac_options``.

    Raises:
        ValueError: For an unknown method.
    """
    kfac = {"loss_fn": task.loss_fn, "forward": task.forward, **task.kfac_options}
    if method == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if method == "muon":
        return _muon(model, lr)
    if method == "kfac-fixed":
        return KFAC(model, lr, **kfac, **KFAC_FIXED_OPTIONS)
    if method in ("kfac", "ekfac"):
        return KFAC(model, lr, **kfac, ekfac=method == "ekfac")
    raise ValueError(f"Unknown method {method!r}; expected one of {list(METHODS)}.")


# -- training -----------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run: the evaluation loss against steps."""

    task: str
    method: str
    lr: float
    seed: int
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    test_accuracy: float | None = None

    @property
    def final_loss(self) -> float:
        """The last evaluation loss (``inf`` if it diverged)."""
        loss = self.losses[-1] if self.losses else math.inf
        return loss if math.isfinite(loss) else math.inf

    def reached(self, target: float) -> int | None:
        """The steps at the first evaluation with loss <= ``target``, or ``None``."""
        pairs = zip(self.steps, self.losses, strict=True)
        return next((s for s, loss in pairs if loss <= target), None)

    def steps_to(self, target: float) -> float:
        """:meth:`reached` as a float: ``inf`` when not reached."""
        hit = self.reached(target)
        return math.inf if hit is None else hit


def train_step(task: Task, model: nn.Module, optimizer: Stepper, batch: Batch) -> None:
    """One training step: clear the gradients, forward, backward, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    task.loss(model, *batch).backward()  # K-FAC records the batch at the loss call
    optimizer.step()


def train(
    task: Task,
    method: str,
    lr: float,
    seed: int,
    max_steps: int,
    *,
    eval_every: int = 25,
    target: float | None = None,
    progress: Callable[[int], Any] | None = None,
) -> Run:
    """Train one model; stop after ``max_steps`` or once the evaluation is at most ``target``.

    The model's initial weights and the batches come from ``seed``. An evaluation that turns
    NaN / Inf ends the run (it diverged; its final loss reads ``inf``).

    Args:
        task: The task.
        method: A key of :data:`METHODS`.
        lr: The learning rate.
        seed: The seed.
        max_steps: The most steps.
        eval_every: Steps between evaluations (and after the last step).
        target: Stop at the first evaluation at most this.
        progress: Called with 1 after each step.
    """
    model = task.model(seed)
    optimizer = make_optimizer(method, model, lr, task)
    run = Run(task.name, method, lr, seed, [0], [task.evaluate(model)])
    for step, batch in enumerate(itertools.islice(task.batches(seed), max_steps), 1):
        train_step(task, model, optimizer, batch)
        if progress is not None:
            progress(1)
        if step % eval_every and step != max_steps:
            continue
        run.steps.append(step)
        run.losses.append(task.evaluate(model))
        if not math.isfinite(run.losses[-1]) or (target is not None and run.losses[-1] <= target):
            break
    run.test_accuracy = task.accuracy(model)
    return run


# -- step times ---------------------------------------------------------------------------------


@dataclass
class Timing:
    """A method's cost per training step (forward, backward, optimizer step)."""

    seconds: float
    aten_ops: float


def _aten_ops(steps: Callable[[], None]) -> int:
    """The ``aten::`` operator calls (nested ones included) that ``steps()`` dispatches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps()
    return sum(event.name.startswith("aten::") for event in prof.events())


def time_steps(
    task: Task,
    lrs: Mapping[str, float],
    *,
    rounds: int = 7,
    steps: int = 10,
    profile_steps: int = 10,
    seed: int = 0,
) -> dict[str, Timing]:
    """Each method's median seconds and ``aten::`` op count per training step on ``task``.

    One model and optimizer per method (``seed``), all on the same ``steps`` batches. After a
    warm-up round, ``rounds`` rounds in which every method takes the ``steps`` steps in turn
    (the order reversed every other round); a method's time is the median over the rounds.
    The op count comes from a profiled run of ``profile_steps`` more steps.

    Args:
        task: The task.
        lrs: Method → learning rate.
        rounds: Timed rounds.
        steps: Steps per method per round.
        profile_steps: Profiled steps per method (cover ``inverse_every`` for the amortised
            count).
        seed: The models' and the batches' seed.
    """
    batches = list(itertools.islice(task.batches(seed), steps))
    states = {}
    for method, lr in lrs.items():
        model = task.model(seed)
        states[method] = (model, make_optimizer(method, model, lr, task))

    def run(method: str, n: int) -> None:
        model, optimizer = states[method]
        for i in range(n):
            train_step(task, model, optimizer, batches[i % steps])

    names = list(states)
    for method in names:
        run(method, steps)
    times: dict[str, list[float]] = {m: [] for m in names}
    for r in range(rounds):
        for method in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            run(method, steps)
            times[method].append((time.perf_counter() - start) / steps)
    return {
        m: Timing(
            statistics.median(times[m]),
            _aten_ops(functools.partial(run, m, profile_steps)) / profile_steps,
        )
        for m in names
    }


# -- races --------------------------------------------------------------------------------------

TABLE_HEADER = [
    "method",
    "lr",
    "steps to target",
    "ms / step",
    "step time / Adam's",
    "time to target / Adam's",
    "aten ops / step",
    "final loss",
    "test acc %",
]


@dataclass
class Race:
    """Every method against Adam's target on one task (:func:`race`).

    Attributes:
        task: The task.
        steps: Adam's steps ``S`` that set the target.
        adam_lr: Adam's best learning rate over its grid.
        target: The median final evaluation of Adam at ``adam_lr`` after ``S`` steps.
        runs: Phase 2: every method, learning rate and seed, to the target or the limit.
        best: Method → its best learning rate (least median steps to the target, then least
            median final loss).
        timings: Method → its step cost (:func:`time_steps`, at its best learning rate).
    """

    task: Task
    steps: int
    adam_lr: float
    target: float
    runs: list[Run]
    best: dict[str, float]
    timings: dict[str, Timing]

    def group(self, method: str, lr: float | None = None) -> list[Run]:
        """The runs of ``method`` at ``lr`` (default: its best)."""
        lr = self.best[method] if lr is None else lr
        return [r for r in self.runs if r.method == method and r.lr == lr]

    def steps_to_target(self, method: str) -> float:
        """Median steps to the target at the best lr (``inf`` unless most seeds reach it)."""
        return statistics.median(r.steps_to(self.target) for r in self.group(method))

    def seconds_to_target(self, method: str) -> float:
        """:meth:`steps_to_target` times the method's median step time."""
        return self.steps_to_target(method) * self.timings[method].seconds

    def curve(self, method: str) -> Run:
        """The run of the median seed (steps to the target, then final loss)."""
        ranked = sorted(self.group(method), key=lambda r: (r.steps_to(self.target), r.final_loss))
        return ranked[(len(ranked) - 1) // 2]

    def heading(self) -> str:
        """A line naming the task, its evaluation and the target."""
        return (
            f"{self.task.name}: target {self.target:.5g} ({self.task.evaluation}) = Adam "
            f"(lr {self.adam_lr:g}) after {self.steps} steps"
        )

    def rows(self) -> list[list[str]]:
        """One row per method at its best learning rate, the cells of :data:`TABLE_HEADER`."""
        adam = self.timings["adam"]
        adam_time = self.seconds_to_target("adam")
        rows = []
        for method, lr in self.best.items():
            group, timing = self.group(method), self.timings[method]
            steps, secs = self.steps_to_target(method), self.seconds_to_target(method)
            accs = [r.test_accuracy for r in group if r.test_accuracy is not None]
            rows.append(
                [
                    method,
                    f"{lr:g}",
                    f"{steps:.0f}" if math.isfinite(steps) else "-",
                    f"{1e3 * timing.seconds:.3g}",
                    f"{timing.seconds / adam.seconds:.2f}",
                    f"{secs / adam_time:.2f}" if math.isfinite(secs / adam_time) else "-",
                    f"{timing.aten_ops:.0f}",
                    f"{statistics.median(r.final_loss for r in group):.4g}",
                    f"{100 * statistics.median(accs):.1f}" if accs else "",
                ]
            )
        return rows

    def table(self) -> str:
        """:meth:`heading` and the table of :meth:`rows`."""
        return f"{self.heading()}\n{format_table(TABLE_HEADER, self.rows())}"


def _best_lrs(runs: Sequence[Run], target: float) -> dict[str, float]:
    """Method → the lr of least median steps to ``target``, then least median final loss."""
    groups: dict[str, dict[float, list[Run]]] = {}
    for r in runs:
        groups.setdefault(r.method, {}).setdefault(r.lr, []).append(r)

    def key(group: list[Run]) -> tuple[float, float]:
        return (
            statistics.median(r.steps_to(target) for r in group),
            statistics.median(r.final_loss for r in group),
        )

    return {m: min(per_lr, key=lambda lr: key(per_lr[lr])) for m, per_lr in groups.items()}


def race(
    task: Task,
    grids: Mapping[str, Sequence[float]],
    *,
    seeds: Sequence[int],
    steps: int,
    max_factor: float = 3.0,
    eval_every: int = 25,
    rounds: int = 7,
    round_steps: int = 10,
    profile_steps: int = 10,
    progress: bool = True,
) -> Race:
    """Race the methods of ``grids`` (it must hold ``"adam"``) on ``task``.

    Phase 1: Adam with each learning rate of its grid and each seed for ``steps`` steps; the
    target is the median final evaluation of the best one. Phase 2: every method with each
    learning rate of its grid (Adam: its best) and each seed until the target or
    ``max_factor · steps`` steps, seed by seed. Then the step times at each method's best
    learning rate (:func:`time_steps`).

    Args:
        task: The task.
        grids: Method → learning rates.
        seeds: The seeds.
        steps: Adam's steps ``S``.
        max_factor: The other runs' limit, a multiple of ``S``.
        eval_every: Steps between evaluations.
        rounds: Timed rounds of :func:`time_steps`.
        round_steps: Steps per method per round.
        profile_steps: Profiled steps per method.
        progress: Show a progress bar (stderr).
    """
    limit = max(steps, math.ceil(max_factor * steps))
    plan = [("adam", lr, s, steps) for lr in grids["adam"] for s in seeds]
    others = sum(len(grid) for method, grid in grids.items() if method != "adam")
    total = len(plan) * steps + len(seeds) * (1 + others) * limit
    with tqdm(total=total, desc=f"{task.name}: Adam", file=sys.stderr, disable=not progress) as bar:

        def run(method: str, lr: float, seed: int, max_steps: int, to: float | None) -> Run:
            result = train(task, method, lr, seed, max_steps, eval_every=eval_every, target=to,
                           progress=bar.update)  # fmt: skip
            bar.update(max_steps - result.steps[-1])
            return result

        adam = [run(*p, None) for p in plan]
        adam_lr = _best_lrs(adam, -math.inf)["adam"]  # no target: the least final loss
        target = statistics.median(r.final_loss for r in adam if r.lr == adam_lr)
        bar.set_description(f"{task.name}: to {target:.4g}")
        phase2 = {**grids, "adam": (adam_lr,)}
        runs = [
            run(method, lr, seed, limit, target)
            for seed in seeds
            for method, grid in phase2.items()
            for lr in grid
        ]
    best = _best_lrs(runs, target)
    timings = time_steps(task, best, rounds=rounds, steps=round_steps, profile_steps=profile_steps)
    return Race(task, steps, adam_lr, target, runs, best, timings)


# -- reports ------------------------------------------------------------------------------------


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


_NO_MATPLOTLIB = "(matplotlib not installed: pip install 'kronfac[plot]' for the plot)"


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_races(races: Sequence[Race], path: Any, title: str = "") -> str:
    """The evaluation loss against steps (top) and seconds (bottom), one column per task.

    One line per method: the median seed at its best learning rate; seconds are steps times
    the method's median step time. Needs matplotlib.

    Args:
        races: The races to draw.
        path: Where to write the PNG.
        title: The figure's title.

    Returns:
        A line to print: where the plot is, or that matplotlib is missing.
    """
    plt = _pyplot()
    if plt is None:
        return _NO_MATPLOTLIB
    fig, axes = plt.subplots(2, len(races), figsize=(6 * len(races), 8), squeeze=False)
    for col, rc in enumerate(races):
        for row, unit in enumerate(("steps", "seconds (steps x median step time)")):
            ax = axes[row][col]
            for method, lr in rc.best.items():
                curve = rc.curve(method)
                scale = 1.0 if row == 0 else rc.timings[method].seconds
                ax.plot([s * scale for s in curve.steps], curve.losses, label=f"{method} ({lr:g})")
            ax.axhline(rc.target, color="gray", linestyle="--", linewidth=1, label="target")
            ax.set_yscale("log")
            ax.set_xlabel(unit)
            ax.set_ylabel(rc.task.evaluation)
            ax.set_title(rc.task.name)
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


# -- Laplace on the digits ----------------------------------------------------------------------

# Train / validation / test images of a seed's split of the 1797 digits.
LAPLACE_SPLIT = (1000, 397, 400)
# δ₀ of the MAP's prior N(0, δ₀⁻¹ I): Adam's weight decay is δ₀ / N.
LAPLACE_PRIOR = 1.0
LAPLACE_EPOCHS = 100
LAPLACE_BATCH = 100
LAPLACE_LR = 3e-3
ECE_BINS = 15


@dataclass(frozen=True)
class LaplaceVariant:
    """One Laplace approximation of :func:`laplace_digits`.

    Attributes:
        name: The row's label.
        layers: ``"all"`` (every Linear layer) or ``"last"`` (the output layer alone).
        tuning: ``"marglik"`` (one prior precision), ``"marglik per module"`` (one per layer,
            the prior a dict) or ``"gridsearch"`` (the validation NLL).
        curvature: ``"kfac"`` or ``"ekfac"``.
        grid: The grid of ``"gridsearch"`` (``None``: :class:`~kronfac.laplace.Laplace`'s).
    """

    name: str
    layers: str
    tuning: str
    curvature: str = "kfac"
    grid: tuple[float, ...] | None = None


LAPLACE_VARIANTS: dict[str, LaplaceVariant] = {
    v.name: v
    for v in (
        LaplaceVariant("K-FAC all, marglik", "all", "marglik"),
        LaplaceVariant("K-FAC all, marglik per module", "all", "marglik per module"),
        LaplaceVariant("K-FAC all, gridsearch", "all", "gridsearch"),
        LaplaceVariant("K-FAC last, marglik", "last", "marglik"),
        LaplaceVariant("K-FAC last, gridsearch", "last", "gridsearch"),
        LaplaceVariant("EKFAC all, marglik", "all", "marglik", "ekfac"),
        LaplaceVariant("EKFAC all, marglik per module", "all", "marglik per module", "ekfac"),
        LaplaceVariant("EKFAC all, gridsearch", "all", "gridsearch", "ekfac"),
    )
}
# ``kronfac demo laplace``: all layers and the last one, each by the evidence and the grid.
DEMO_LAPLACE_VARIANTS = (
    "K-FAC all, marglik",
    "K-FAC all, gridsearch",
    "K-FAC last, marglik",
    "K-FAC last, gridsearch",
)


@dataclass
class DigitsSplit:
    """A seed's split of the digits (pixels / 16, in ``[0, 1]``) into three batches ``(X, y)``."""

    train: Batch
    val: Batch
    test: Batch

    def describe(self) -> str:
        """``"1000 train / 397 val / 400 test"``."""
        sizes = (len(b[1]) for b in (self.train, self.val, self.test))
        return "{} train / {} val / {} test".format(*sizes)


def digits_split(seed: int, sizes: Sequence[int] = LAPLACE_SPLIT) -> DigitsSplit:
    """The digits in a random permutation of ``seed``, cut into train, validation and test.

    Args:
        seed: The permutation's seed.
        sizes: The three sets' sizes (positive, at most 1797 in all).

    Raises:
        ValueError: Sizes that are not three positive counts within the 1797 images.
        ImportError: Without scikit-learn (``pip install 'kronfac[demo]'``).
    """
    from sklearn.datasets import load_digits

    X_np, y_np = load_digits(return_X_y=True)
    if len(sizes) != 3 or min(sizes) < 1 or sum(sizes) > len(y_np):
        raise ValueError(
            f"sizes must be three positive counts (train, val, test) of at most {len(y_np)} "
            f"images in all, got {tuple(sizes)}."
        )
    X = torch.as_tensor(X_np, dtype=torch.float32) / 16.0
    y = torch.as_tensor(y_np, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, val, test = perm[: sum(sizes)].split(list(sizes))
    return DigitsSplit((X[train], y[train]), (X[val], y[val]), (X[test], y[test]))


def laplace_mlp() -> nn.Sequential:
    """The MLP 64-128-128-10 with tanh; its Linear layers are ``fc1``, ``fc2``, ``fc3``."""
    return nn.Sequential(
        collections.OrderedDict(
            fc1=nn.Linear(64, 128),
            act1=nn.Tanh(),
            fc2=nn.Linear(128, 128),
            act2=nn.Tanh(),
            fc3=nn.Linear(128, 10),
        )
    )


def _batches(data: Batch, size: int) -> list[Batch]:
    X, y = data
    return list(zip(X.split(size), y.split(size), strict=True))


def train_map(
    model: nn.Module,
    data: Batch,
    *,
    prior_precision: float = LAPLACE_PRIOR,
    epochs: int = LAPLACE_EPOCHS,
    batch_size: int = LAPLACE_BATCH,
    lr: float = LAPLACE_LR,
    seed: int = 0,
) -> None:
    r"""Train ``model`` to the MAP of a cross-entropy likelihood and a Gaussian prior.

    Adam with weight decay ``δ₀ / N`` (added to the gradient, not decoupled) on mini-batches of
    a fresh permutation per epoch, its learning rate annealed to 0 by a cosine: in expectation
    the gradient of

    .. math::

        \frac{1}{N}\Big(\sum_{i=1}^{N} -\log p(y_i \mid x_i, θ) + \frac{δ_0}{2} \|θ\|^2\Big),

    the negative log posterior over ``N`` of the prior ``N(0, δ₀⁻¹ I)``, the prior the Laplace
    approximations start from. The model is left in eval mode.

    Args:
        model: The model (trained in place).
        data: The training set ``(X, y)``.
        prior_precision: ``δ₀``.
        epochs: Passes over the data.
        batch_size: Images per step.
        lr: Adam's initial learning rate.
        seed: The seed of the batches' order.
    """
    X, y = data
    steps = epochs * math.ceil(len(y) / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=prior_precision / len(y))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(X[idx]), y[idx]).backward()
            optimizer.step()
            schedule.step()
    model.eval()


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    r"""The expected calibration error of class probabilities over equal-width bins.

    With the confidence ``c_i = max_k p_ik``, the prediction ``argmax_k p_ik`` and the bins
    ``B_b = {i : b/m < c_i ≤ (b+1)/m}``, ``b = 0, …, m−1``:

    .. math::

        \mathrm{ECE} = \sum_b \frac{|B_b|}{n} \, |\mathrm{acc}_b - \mathrm{conf}_b|,

    ``acc_b`` the fraction of correct predictions and ``conf_b`` the mean confidence in ``B_b``
    (empty bins add nothing).

    Args:
        probs: ``[n, C]`` class probabilities.
        labels: ``[n]`` true classes.
        bins: ``m``, the number of bins over ``[0, 1]``.

    Returns:
        The ECE in ``[0, 1]``.

    Raises:
        ValueError: Shapes other than ``[n, C]`` and ``[n]`` (``n ≥ 1``), or ``bins < 1``.
    """
    correct, confidence, index = _confidence_bins(probs, labels, bins)
    # |B_b| · |acc_b − conf_b| = |Σ_{i ∈ B_b} (correct_i − c_i)|
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct - confidence)
    return float(gap.abs().sum()) / len(labels)


def _confidence_bins(probs: Tensor, labels: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per data point (float64): correct (0 / 1), confidence, and its bin of ``(b/m, (b+1)/m]``."""
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or len(labels) == 0:
        raise ValueError(
            f"Expected probabilities [n, C] and labels [n] with n >= 1, got shapes "
            f"{tuple(probs.shape)} and {tuple(labels.shape)}."
        )
    if bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}.")
    confidence, predicted = probs.detach().to(torch.float64).max(dim=1)
    correct = (predicted == labels).to(torch.float64)
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)[1:-1]
    return correct, confidence, torch.bucketize(confidence, edges)  # (lo, hi] bins


@dataclass(frozen=True)
class Calibration:
    """Test metrics of class probabilities: accuracy, mean NLL and ECE (:func:`calibration`)."""

    accuracy: float
    nll: float
    ece: float


def calibration(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> Calibration:
    """The accuracy, the mean negative log-likelihood ``−(1/n) Σ_i log p_{i y_i}`` and the ECE.

    Args:
        probs: ``[n, C]`` class probabilities.
        labels: ``[n]`` true classes.
        bins: The ECE's bins (:func:`expected_calibration_error`).

    Raises:
        ValueError: As :func:`expected_calibration_error`.
    """
    ece = expected_calibration_error(probs, labels, bins)
    p = probs.detach().to(torch.float64)
    accuracy = float((p.argmax(dim=1) == labels).to(torch.float64).mean())
    nll = -float(p.gather(1, labels[:, None]).clamp_min(1e-300).log().mean())
    return Calibration(accuracy, nll, ece)


@dataclass
class LaplaceRun:
    """The test predictions of the MAP or one Laplace approximation on one seed.

    Attributes:
        name: The MAP's ``"MAP"`` or the :class:`LaplaceVariant`'s name.
        seed: The seed.
        probs: ``[n, C]`` test class probabilities.
        labels: ``[n]`` test classes.
        metrics: Their :func:`calibration`.
        seconds: Building the approximation and tuning its prior (0 for the MAP).
        prior: The tuned prior precision (``None`` for the MAP), per module for a dict.
    """

    name: str
    seed: int
    probs: Tensor
    labels: Tensor
    metrics: Calibration
    seconds: float = 0.0
    prior: float | dict[str, float] | None = None


def fit_laplace(
    model: nn.Module,
    variant: LaplaceVariant,
    split: DigitsSplit,
    *,
    prior_precision: float = LAPLACE_PRIOR,
    batch_size: int = LAPLACE_BATCH,
    seed: int = 0,
) -> LaplaceRun:
    """Build ``variant``'s :class:`~kronfac.laplace.Laplace` around ``model``, tune, predict.

    The approximation (type-2 Fisher, joint biases) covers every Linear layer or the last
    one, starts from ``prior_precision`` (one per layer for ``"marglik per module"``), passes
    over the training set in batches of ``batch_size``, and tunes its prior by
    :meth:`~kronfac.laplace.Laplace.optimize_prior_precision` (marglik: 100 Adam steps of
    learning rate 0.1 on ``log δ``; gridsearch: the probit predictive's NLL on the validation
    set). The test probabilities are the probit predictive's.

    Args:
        model: The MAP model (eval mode).
        variant: The approximation.
        split: The data.
        prior_precision: The starting prior precision ``δ₀``.
        batch_size: Images per batch of the data passes and the predictive.
        seed: The run's seed (recorded).

    Raises:
        ValueError: A variant with unknown ``layers`` or ``tuning``.
    """
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = {"all": None, "last": linears[-1:]}
    if variant.layers not in layers:
        raise ValueError(f"Unknown layers {variant.layers!r}; expected one of {list(layers)}.")
    tunings = ("marglik", "marglik per module", "gridsearch")
    if variant.tuning not in tunings:
        raise ValueError(f"Unknown tuning {variant.tuning!r}; expected one of {list(tunings)}.")
    start = time.perf_counter()
    la = Laplace(
        model,
        nn.CrossEntropyLoss(),
        _batches(split.train, batch_size),
        modules=layers[variant.layers],
        prior_precision=prior_precision,
        curvature=variant.curvature,
    )
    if variant.tuning == "gridsearch":
        val = _batches(split.val, batch_size)
        la.optimize_prior_precision("gridsearch", val_data=val, grid=variant.grid)
    else:
        if variant.tuning == "marglik per module":
            la.prior_precision = dict.fromkeys(la.modules, prior_precision)
        la.optimize_prior_precision("marglik")
    seconds = time.perf_counter() - start
    X_test, y_test = split.test
    with torch.no_grad():
        probs = torch.cat([_probabilities(la, X) for X in X_test.split(batch_size)])
    prior = la.prior_precision
    tuned = {k: float(v) for k, v in prior.items()} if isinstance(prior, Mapping) else float(prior)
    return LaplaceRun(variant.name, seed, probs, y_test, calibration(probs, y_test), seconds, tuned)


def _probabilities(la: Laplace, X: Tensor) -> Tensor:
    probs = la.predictive(X)
    assert isinstance(probs, Tensor)  # cross-entropy: class probabilities
    return probs


def laplace_digits(
    seed: int,
    variants: Sequence[str],
    *,
    sizes: Sequence[int] = LAPLACE_SPLIT,
    epochs: int = LAPLACE_EPOCHS,
    prior_precision: float = LAPLACE_PRIOR,
) -> list[LaplaceRun]:
    """The MAP MLP and Laplace approximations of it on one seed's split of the digits.

    The split (:func:`digits_split`), the MLP's initial weights (:func:`laplace_mlp`) and its
    batches (:func:`train_map`) come from ``seed``.

    Args:
        seed: The seed.
        variants: Names of :data:`LAPLACE_VARIANTS`, in the order of the result.
        sizes: Train, validation and test sizes.
        epochs: The MAP's training epochs.
        prior_precision: ``δ₀``: the MAP's prior and the approximations' starting prior.

    Returns:
        The MAP's run, then one per variant.

    Raises:
        ValueError: An unknown variant, or bad ``sizes``.
        ImportError: Without scikit-learn (``pip install 'kronfac[demo]'``).
    """
    unknown = [v for v in variants if v not in LAPLACE_VARIANTS]
    if unknown:
        raise ValueError(
            f"Unknown variant(s) {unknown}; expected some of {list(LAPLACE_VARIANTS)}."
        )
    split = digits_split(seed, sizes)
    torch.manual_seed(seed)
    model = laplace_mlp()
    train_map(model, split.train, prior_precision=prior_precision, epochs=epochs, seed=seed)
    X_test, y_test = split.test
    with torch.no_grad():
        probs = torch.softmax(model(X_test), dim=-1)
    runs = [LaplaceRun("MAP", seed, probs, y_test, calibration(probs, y_test))]
    for name in variants:
        variant = LAPLACE_VARIANTS[name]
        runs.append(fit_laplace(model, variant, split, prior_precision=prior_precision, seed=seed))
    return runs


LAPLACE_HEADER = ["method", "prior δ", "test acc %", "NLL", "ECE", "ECE / MAP's", "build+tune s"]


def _format_prior(priors: Sequence[float | dict[str, float] | None]) -> str:
    """The median prior over the seeds (per module, ``/``-separated, for dicts)."""
    if priors[0] is None:
        return "-"
    if isinstance(priors[0], dict):
        dicts = [p for p in priors if isinstance(p, dict)]
        return "/".join(f"{statistics.median(d[m] for d in dicts):.3g}" for m in dicts[0])
    return f"{statistics.median(p for p in priors if isinstance(p, float)):.3g}"


def laplace_table(runs: Sequence[LaplaceRun]) -> str:
    """One row per method (first-seen order): medians over its seeds of :data:`LAPLACE_HEADER`.

    ``ECE / MAP's`` is the median over the seeds of the ratio to the same seed's MAP.

    Raises:
        ValueError: Runs without the MAP of each of their seeds.
    """
    maps = {r.seed: r for r in runs if r.name == "MAP"}
    if missing := sorted({r.seed for r in runs} - set(maps)):
        raise ValueError(f"The table needs the MAP run of every seed; missing seeds {missing}.")
    groups: dict[str, list[LaplaceRun]] = {}
    for r in runs:
        groups.setdefault(r.name, []).append(r)
    rows = []
    median = statistics.median
    for name, group in groups.items():
        ratio = median(r.metrics.ece / max(maps[r.seed].metrics.ece, 1e-12) for r in group)
        rows.append(
            [
                name,
                _format_prior([r.prior for r in group]),
                f"{100 * median(r.metrics.accuracy for r in group):.2f}",
                f"{median(r.metrics.nll for r in group):.4f}",
                f"{median(r.metrics.ece for r in group):.4f}",
                f"{ratio:.2f}",
                "-" if name == "MAP" else f"{median(r.seconds for r in group):.2f}",
            ]
        )
    return format_table(LAPLACE_HEADER, rows)


def plot_reliability(
    runs: Sequence[LaplaceRun], path: Any, title: str = "", bins: int = ECE_BINS
) -> str:
    """A reliability diagram: accuracy against confidence per bin, one line per method.

    The test predictions of each method's runs are pooled over the seeds; each point is a
    non-empty bin of :func:`expected_calibration_error` at its mean confidence, and the
    legend gives the pooled ECE. Below, the share of test points per bin. Needs matplotlib.

    Args:
        runs: The runs to draw (methods in first-seen order).
        path: Where to write the PNG.
        title: The figure's title.
        bins: The bins.

    Returns:
        A line to print: where the plot is, or that matplotlib is missing.
    """
    plt = _pyplot()
    if plt is None:
        return _NO_MATPLOTLIB
    pooled: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
    for r in runs:
        seen_probs, seen_labels = pooled.setdefault(r.name, ([], []))
        seen_probs.append(r.probs)
        seen_labels.append(r.labels)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="calibrated")
    centers = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    width = 1.0 / bins / (len(pooled) + 1)
    for k, (name, (probs_list, labels_list)) in enumerate(pooled.items()):
        probs, labels = torch.cat(probs_list), torch.cat(labels_list)
        correct, confidence, index = _confidence_bins(probs, labels, bins)
        count = torch.zeros(bins, dtype=torch.float64).index_add_(
            0, index, torch.ones_like(correct)
        )
        hit = count > 0
        accuracy = torch.zeros_like(count).index_add_(0, index, correct)[hit] / count[hit]
        mean_conf = torch.zeros_like(count).index_add_(0, index, confidence)[hit] / count[hit]
        ece = expected_calibration_error(probs, labels, bins)
        top.plot(mean_conf.tolist(), accuracy.tolist(), marker="o", label=f"{name} (ECE {ece:.3f})")
        offset = (k + 0.5 - len(pooled) / 2) * width
        shares = (count / len(labels)).tolist()
        bottom.bar((centers + offset).tolist(), shares, width=width, label=name)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(fontsize=8, loc="upper left")
    bottom.set_xlabel(f"confidence (max. probability), {bins} bins")
    bottom.set_ylabel("share of points")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


# -- influence on the digits: mislabelled examples ----------------------------------------------

# Training images of a seed's split (the rest of the 1797 are the test images), the share of
# them whose label is flipped to another class, and the MLP's training (as for Laplace).
INFLUENCE_TRAIN = 1000
INFLUENCE_NOISE = 0.1
INFLUENCE_EPOCHS = 1000  # it memorises about half the flipped labels (100: none of them)
INFLUENCE_BATCH = 100
INFLUENCE_HIDDEN = 64
# Self-influence rankings of :func:`mislabel_detection`, by their rows' names.
INFLUENCE_CURVATURES = {"EKFAC self-influence": "ekfac", "K-FAC self-influence": "kfac"}
INFLUENCE_BASELINES = ("training loss", "gradient norm")


@dataclass
class MislabeledDigits:
    """A seed's split of the digits with some training labels flipped (:func:`mislabeled_digits`).

    Attributes:
        train: ``(X, y)``, the training images with the noisy labels the model learns.
        labels: ``[n]`` the training images' true labels.
        flipped: ``[n]`` bool, whether the label in :attr:`train` is wrong.
        test: ``(X, y)``, the other images, true labels.
    """

    train: Batch
    labels: Tensor
    flipped: Tensor
    test: Batch

    def describe(self) -> str:
        """``"1000 train (100 labels flipped) / 797 test"``."""
        n, k, m = len(self.labels), int(self.flipped.sum()), len(self.test[1])
        return f"{n} train ({k} labels flipped) / {m} test"


def mislabeled_digits(
    seed: int, train: int = INFLUENCE_TRAIN, noise: float = INFLUENCE_NOISE
) -> MislabeledDigits:
    """The digits (pixels / 16) permuted by ``seed``: ``train`` training images, the rest test.

    ``round(noise · train)`` training images, drawn by a generator of ``seed``, get their label
    replaced by another class, uniformly among the 9 others.

    Args:
        seed: The permutation's and the flips' seed.
        train: The training images (at least 1, at most 1796).
        noise: The share of training labels flipped, in ``[0, 1]``.

    Raises:
        ValueError: ``train`` or ``noise`` out of range.
        ImportError: Without scikit-learn (``pip install 'kronfac[demo]'``).
    """
    from sklearn.datasets import load_digits

    X_np, y_np = load_digits(return_X_y=True)
    if not 1 <= train < len(y_np):
        raise ValueError(f"train must be in [1, {len(y_np) - 1}] images, got {train!r}.")
    if not 0 <= noise <= 1:
        raise ValueError(f"noise must be a share in [0, 1], got {noise!r}.")
    X = torch.as_tensor(X_np, dtype=torch.float32) / 16.0
    y = torch.as_tensor(y_np, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:train], perm[train:]
    labels = y[tr]
    flipped = torch.zeros(train, dtype=torch.bool)
    flipped[torch.randperm(train, generator=g)[: round(noise * train)]] = True
    shift = torch.randint(1, 10, (train,), generator=g)  # another class: + 1..9 (mod 10)
    noisy = torch.where(flipped, (labels + shift) % 10, labels)
    return MislabeledDigits((X[tr], noisy), labels, flipped, (X[te], y[te]))


def influence_mlp(hidden: int = INFLUENCE_HIDDEN) -> nn.Sequential:
    """The MLP 64-``hidden``-10 with tanh (64-64-10: 4,810 parameters); Linear ``fc1``, ``fc2``."""
    return nn.Sequential(
        collections.OrderedDict(
            fc1=nn.Linear(64, hidden), act1=nn.Tanh(), fc2=nn.Linear(hidden, 10)
        )
    )


def per_example_losses(model: nn.Module, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Each data point's cross-entropy and the Euclidean norm of its gradient (all parameters).

    ``torch.func.vmap`` of ``torch.func.grad`` over the data points.

    Returns:
        ``(losses [n], gradient norms [n])``.
    """
    from torch.func import functional_call, grad_and_value, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    grads, losses = vmap(grad_and_value(loss), in_dims=(None, 0, 0))(params, X, y)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    return losses.detach(), norms.detach()


@dataclass
class Detection:
    """How well one score ranks the flipped training labels first.

    Attributes:
        name: The score's name (a row of :func:`influence_table`).
        seed: The seed.
        scores: ``[n]`` per training image, the higher the more suspect.
        auroc: The area under the ROC curve of ``scores`` detecting the flipped labels.
        precision: The share of flipped labels among the ``k`` highest scores, ``k`` the number
            of flipped labels (so also the share of them found there).
        seconds: The time the scores took (the curvature included).
    """

    name: str
    seed: int
    scores: Tensor
    auroc: float
    precision: float
    seconds: float

    @classmethod
    def of(cls, name: str, seed: int, scores: Tensor, flipped: Tensor, seconds: float) -> Detection:
        """The AUROC (scikit-learn's ``roc_auc_score``) and the precision of ``scores``."""
        from sklearn.metrics import roc_auc_score

        scores = scores.detach().to(torch.float64)
        k = int(flipped.sum())
        top = scores.topk(k).indices if k else scores.new_zeros(0, dtype=torch.long)
        precision = float(flipped[top].double().mean()) if k else math.nan
        auroc = float(roc_auc_score(flipped.numpy(), scores.numpy()))
        return cls(name, seed, scores, auroc, precision, seconds)


@dataclass
class MislabelStudy:
    """One seed of :func:`mislabel_detection`: the data, the trained model, the rankings.

    Attributes:
        seed: The seed.
        data: The split with flipped labels.
        model: The MLP trained on the noisy labels (eval mode).
        batches: The training set's batches the influences were computed from.
        detections: One per score, :data:`INFLUENCE_CURVATURES` then :data:`INFLUENCE_BASELINES`.
        influences: Row name → its :class:`~kronfac.influence.Influence`.
        train_accuracy: On the noisy training labels.
        test_accuracy: On the test images.
    """

    seed: int
    data: MislabeledDigits
    model: nn.Module
    batches: list[Batch]
    detections: list[Detection]
    influences: dict[str, Influence]
    train_accuracy: float
    test_accuracy: float


def mislabel_detection(
    seed: int,
    *,
    train: int = INFLUENCE_TRAIN,
    noise: float = INFLUENCE_NOISE,
    epochs: int = INFLUENCE_EPOCHS,
    curvatures: Sequence[str] = tuple(INFLUENCE_CURVATURES),
) -> MislabelStudy:
    """Train the MLP on digits with flipped labels, then rank the training images by suspicion.

    The split and flips (:func:`mislabeled_digits`), the MLP's initial weights
    (:func:`influence_mlp`) and its batches come from ``seed``; it is trained like the Laplace
    demo's MAP (:func:`train_map`: Adam, weight decay ``δ₀ / N``, ``δ₀`` = 1, batches of 100,
    a cosine schedule). The rankings: the self-influence ``∇ℓ_tᵀ (H + δI)⁻¹ ∇ℓ_t`` of
    :class:`~kronfac.influence.Influence` (MC Fisher, default damping: 0.1 × each layer's mean
    eigenvalue) with each curvature of ``curvatures``; the per-example training loss; the norm
    of its gradient.

    Args:
        seed: The seed.
        train: Training images.
        noise: Share of flipped training labels.
        epochs: Training epochs.
        curvatures: Names of :data:`INFLUENCE_CURVATURES`.

    Raises:
        ValueError: Unknown ``curvatures``, or ``train`` / ``noise`` out of range.
        ImportError: Without scikit-learn (``pip install 'kronfac[demo]'``).
    """
    unknown = [c for c in curvatures if c not in INFLUENCE_CURVATURES]
    if unknown:
        raise ValueError(
            f"Unknown curvature(s) {unknown}; expected some of {list(INFLUENCE_CURVATURES)}."
        )
    data = mislabeled_digits(seed, train, noise)
    torch.manual_seed(seed)
    model = influence_mlp()
    train_map(model, data.train, epochs=epochs, batch_size=INFLUENCE_BATCH, seed=seed)
    batches = _batches(data.train, INFLUENCE_BATCH)
    detections, influences = [], {}
    for name in curvatures:
        start = time.perf_counter()
        inf = Influence(model, nn.CrossEntropyLoss(), batches, curvature=INFLUENCE_CURVATURES[name])
        scores = inf.self_scores(batches)
        assert isinstance(scores, Tensor)
        seconds = time.perf_counter() - start
        detections.append(Detection.of(name, seed, scores, data.flipped, seconds))
        influences[name] = inf
    X, y = data.train
    start = time.perf_counter()
    losses, norms = per_example_losses(model, X, y)
    seconds = time.perf_counter() - start
    detections.append(Detection.of("training loss", seed, losses, data.flipped, seconds))
    detections.append(Detection.of("gradient norm", seed, norms, data.flipped, seconds))
    with torch.no_grad():
        train_acc = float((model(X).argmax(-1) == y).float().mean())
        X_test, y_test = data.test
        test_acc = float((model(X_test).argmax(-1) == y_test).float().mean())
    return MislabelStudy(seed, data, model, batches, detections, influences, train_acc, test_acc)


INFLUENCE_HEADER = ["score", "AUROC", "precision@k", "seconds"]


def influence_table(detections: Sequence[Detection]) -> str:
    """One row per score (first-seen order): medians over the seeds, and ranges when several.

    ``precision@k``: the share of flipped labels among the ``k`` highest scores, ``k`` the
    number of flipped labels.
    """
    groups: dict[str, list[Detection]] = {}
    for d in detections:
        groups.setdefault(d.name, []).append(d)
    several = any(len(g) > 1 for g in groups.values())

    def cell(values: list[float], fmt: str) -> str:
        text = format(statistics.median(values), fmt)
        if several:
            text += f" ({min(values):{fmt}}–{max(values):{fmt}})"
        return text

    rows = [
        [
            name,
            cell([d.auroc for d in group], ".3f"),
            cell([d.precision for d in group], ".2f"),
            cell([d.seconds for d in group], ".2f"),
        ]
        for name, group in groups.items()
    ]
    header = INFLUENCE_HEADER
    if several:
        header = [header[0], *(f"{h} median (range)" for h in header[1:])]
    return format_table(header, rows)


def influence_queries(
    inf: Influence, study: MislabelStudy, queries: int = 4
) -> tuple[Tensor, Tensor]:
    """Influence scores on every training image of ``queries`` test images of distinct classes.

    The queries: the first test image of each class, classes in the order they first appear
    in the test set (fewer when the test set holds fewer classes).

    Returns:
        ``(query indices into the test set [q], scores [q, n_train])``: ``score(q, t) =
        ∇ℓ_qᵀ (H + δI)⁻¹ ∇ℓ_t`` at the query's true label, positive where upweighting ``t``
        lowers the query's loss (helpful).
    """
    X_test, y_test = study.data.test
    first = {int(c): i for i, c in reversed(list(enumerate(y_test.tolist())))}
    index = torch.tensor(sorted(first.values())[:queries], dtype=torch.long)
    scores = inf.pairwise_scores(study.batches, [(X_test[index], y_test[index])])
    assert isinstance(scores, Tensor)
    return index, scores


def plot_influential(
    study: MislabelStudy,
    index: Tensor,
    scores: Tensor,
    path: Any,
    title: str = "",
    top: int = 3,
) -> str:
    """Per test image (a row): the image, its ``top`` most helpful and most harmful training images.

    Most helpful: the highest scores (upweighting them lowers the test loss the most); most
    harmful: the lowest. Each training image shows its (noisy) label and its score; a flipped
    label is marked in red with the true one. Needs matplotlib.

    Args:
        study: The seed's study (:func:`mislabel_detection`).
        index: The queries' indices into the test set ``[q]``.
        scores: ``[q, n_train]`` (:func:`influence_queries`).
        path: Where to write the PNG.
        title: The figure's title.
        top: Training images per side.

    Returns:
        A line to print: where the plot is, or that matplotlib is missing.
    """
    plt = _pyplot()
    if plt is None:
        return _NO_MATPLOTLIB
    X_train, y_train = study.data.train
    X_test, y_test = study.data.test
    with torch.no_grad():
        predicted = study.model(X_test[index]).argmax(-1)
    cols = 1 + 2 * top
    fig, axes = plt.subplots(len(index), cols, figsize=(1.3 * cols, 1.55 * len(index) + 0.5),
                             squeeze=False)  # fmt: skip
    for row, (q, s) in enumerate(zip(index.tolist(), scores, strict=True)):
        order = s.argsort(descending=True)
        picks = [*order[:top].tolist(), *order.flip(0)[:top].tolist()]
        ax = axes[row][0]
        ax.imshow(X_test[q].view(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"test y={int(y_test[q])}\npred {int(predicted[row])}", fontsize=7)
        for col, t in enumerate(picks, 1):
            ax = axes[row][col]
            ax.imshow(X_train[t].view(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
            label = f"y={int(y_train[t])}"
            wrong = bool(study.data.flipped[t])
            if wrong:
                label += f" (true {int(study.data.labels[t])})"
            ax.set_title(f"{label}\n{float(s[t]):+.3g}", fontsize=7,
                         color="red" if wrong else "black")  # fmt: skip
    for ax in (a for r in axes for a in r):
        ax.set_xticks([])
        ax.set_yticks([])
    sides = ["query", *(f"helpful {k}" for k in range(1, top + 1))]
    sides += [f"harmful {k}" for k in range(1, top + 1)]
    for ax, side in zip(axes[-1], sides, strict=True):
        ax.set_xlabel(side, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"
