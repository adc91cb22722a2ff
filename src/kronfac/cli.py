"""The ``kronfac`` command line.

Subcommands:
    ``kronfac demo`` (``kronfac demo optim``): adaptive K-FAC (:class:`kronfac.optim.KFAC`)
    against Adam and Muon on scikit-learn's bundled digits (a deep autoencoder and an MLP
    classifier): progress bars, a table of the steps each needs to reach Adam's final training
    loss, its step time (measured apart, in interleaved rounds) and the time to the target,
    and a PNG plot of the loss against steps and seconds when matplotlib is installed.
    ``kronfac demo laplace``: an MLP trained to its MAP on the digits against K-FAC Laplace
    approximations of it (:class:`kronfac.Laplace`, all layers or the last one, the prior
    tuned by the marginal likelihood or a validation grid search): a table of the test
    accuracy, NLL and ECE, and a PNG reliability diagram when matplotlib is installed.
    ``kronfac demo influence``: an MLP trained on the digits with 10% of its training labels
    flipped; the self-influence of :class:`kronfac.Influence` (EKFAC and K-FAC) against the
    per-example loss and gradient norm at finding the flipped labels (a table of AUROCs), and
    the most helpful and harmful training images of a few test images (a PNG when matplotlib
    is installed).
    ``kronfac factors``: train a small MLP on the digits, compute its Kronecker factors with
    :func:`kronfac.compute_factors` and print one row per layer (factor shapes, traces,
    condition numbers) and the cost of the factor pass relative to one plain forward +
    backward pass over the same data.

The digits tasks, the race, the Laplace comparison, the mislabelled digits, their tables and
plots they share with ``benchmarks/optim.py``, ``benchmarks/laplace.py`` and
``benchmarks/influence.py`` are in :mod:`kronfac.demo`. This module
is the top of the import graph: it may import anything in kronfac, and nothing in kronfac
imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import kronfac
from kronfac import demo
from kronfac.factors import FISHER_TYPES

__all__ = ["build_mlp", "main"]

_SKLEARN_MISSING = "kronfac {} needs scikit-learn: pip install 'kronfac[demo]'"
_BATCH_SIZE = 128
_LR = 1e-2
_DIGITS = 1797  # images in scikit-learn's load_digits
_MIN_TRAIN = 10  # demo influence: at least one flipped label and one clean one


def build_mlp() -> nn.Sequential:
    """The demo's MLP 64-128-64-10 with ReLU activations.

    Returns:
        An ``nn.Sequential`` whose Linear layers are named ``fc1``, ``fc2``, ``fc3``.
    """
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(64, 128),
            act1=nn.ReLU(),
            fc2=nn.Linear(128, 64),
            act2=nn.ReLU(),
            fc3=nn.Linear(64, 10),
        )
    )


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _split(text: str) -> tuple[int, int, int]:
    sizes = text.split(",")
    if len(sizes) != 3 or not all(s.strip().isdigit() and int(s) > 0 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"expected three positive integers TRAIN,VAL,TEST, got {text!r}"
        )
    train, val, test = map(int, sizes)
    if train + val + test > _DIGITS:
        raise argparse.ArgumentTypeError(f"the digits have {_DIGITS} images, asked for {text!r}")
    return train, val, test


def _train_images(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not _MIN_TRAIN <= value < _DIGITS:
        raise argparse.ArgumentTypeError(
            f"expected an integer in [{_MIN_TRAIN}, {_DIGITS - 1}] (the rest are test images), "
            f"got {text!r}"
        )
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kronfac",
        description="Kronecker-factored curvature (K-FAC, EKFAC) for PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"kronfac {kronfac.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo_parser = sub.add_parser(
        "demo",
        help=(
            "adaptive K-FAC against Adam and Muon, Laplace calibration, or influence functions, "
            "on the digits data"
        ),
        description=(
            "optim (the default): train a deep autoencoder 64-256-128-32-128-256-64 and an MLP "
            "64-256-256-10 on scikit-learn's bundled digits with Adam for --steps steps, then "
            "Muon and adaptive K-FAC until they reach Adam's final training loss (at most 3 x "
            "--steps steps); time each method's steps apart, in interleaved rounds; print the "
            "steps, step time and time each needed and plot the losses against steps and "
            "seconds. laplace: train an MLP 64-128-128-10 to its MAP on a split of the digits "
            "for --epochs epochs; compare its test accuracy, NLL and calibration error with "
            "K-FAC Laplace approximations of all layers and of the last layer, their prior "
            "tuned by the marginal likelihood or a grid search on the validation set; print "
            "the table and plot a reliability diagram. influence: train an MLP 64-64-10 for "
            "--epochs epochs on --train digits with 10% of their labels flipped; rank the "
            "training images by their EKFAC and K-FAC self-influence, per-example loss and "
            "gradient norm, print how well each finds the flipped labels (AUROC), and plot the "
            "most helpful and harmful training images of a few test images."
        ),
    )
    demo_parser.add_argument(
        "what",
        nargs="?",
        choices=DEMOS,
        default="optim",
        help=(
            "optim: the optimizer race (default); laplace: Laplace calibration; influence: "
            "mislabelled digits"
        ),
    )
    demo_parser.add_argument(
        "--steps",
        type=_int_at_least(1),
        help=f"optim: Adam's steps (default: {DEMO_STEPS})",
    )
    demo_parser.add_argument(
        "--epochs",
        type=_int_at_least(0),
        help=(
            f"laplace, influence: the MLP's training epochs (default: {demo.LAPLACE_EPOCHS}, "
            f"{demo.INFLUENCE_EPOCHS})"
        ),
    )
    demo_parser.add_argument(
        "--split",
        type=_split,
        metavar="TRAIN,VAL,TEST",
        help="laplace: images per set (default: {},{},{})".format(*demo.LAPLACE_SPLIT),
    )
    demo_parser.add_argument(
        "--train",
        type=_train_images,
        metavar="N",
        help=(
            f"influence: training images, {100 * demo.INFLUENCE_NOISE:.0f}%% of their labels "
            f"flipped; the rest are test images (default: {demo.INFLUENCE_TRAIN})"
        ),
    )
    demo_parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo_parser.add_argument(
        "--threads", type=_int_at_least(1), default=1, help="torch intra-op threads (default: 1)"
    )
    demo_parser.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help=(
            "where to write the plot when matplotlib is installed (default: "
            f"{DEMO_PLOTS['optim']}, {DEMO_PLOTS['laplace']} or {DEMO_PLOTS['influence']})"
        ),
    )
    demo_parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    factors = sub.add_parser(
        "factors",
        help="train a small MLP on the digits data and print its Kronecker factors",
        description=(
            "Train an MLP 64-128-64-10 on scikit-learn's bundled digits (1437 / 360), compute "
            "its Kronecker factors over the training set and print one row per layer."
        ),
    )
    factors.add_argument(
        "--epochs", type=_int_at_least(0), default=20, help="training epochs (default: 20)"
    )
    factors.add_argument(
        "--fisher",
        choices=FISHER_TYPES,
        default="mc",
        help="Fisher type passed to compute_factors (default: mc)",
    )
    factors.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    factors.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=1,
        help=(
            "torch intra-op threads (default: 1; the MLP's layers are too small to gain from "
            "more, and on a busy machine extra threads slow it down many times; this machine "
            f"has {os.cpu_count()} CPUs)"
        ),
    )
    factors.add_argument(
        "--save", type=Path, metavar="PATH", help="write the factors to PATH (safetensors)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``kronfac`` command line.

    Args:
        argv: The arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 when an optional dependency is missing.

    Raises:
        SystemExit: With status 2 on invalid arguments (argparse), 0 for ``--help``.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        plot = None if args.no_plot else (args.plot or Path(DEMO_PLOTS[args.what]))
        if plot is not None and not plot.parent.is_dir():
            parser.error(f"--plot: folder {str(plot.parent)!r} does not exist")
        for flag in sorted({f for flags in DEMO_FLAGS.values() for f in flags}):
            if getattr(args, flag) is not None and flag not in DEMO_FLAGS[args.what]:
                demos = " and ".join(
                    f"'kronfac demo {d}'" for d, f in DEMO_FLAGS.items() if flag in f
                )
                parser.error(f"--{flag} applies to {demos} only")
        if args.what == "influence":
            return _demo_influence(
                epochs=demo.INFLUENCE_EPOCHS if args.epochs is None else args.epochs,
                train=demo.INFLUENCE_TRAIN if args.train is None else args.train,
                seed=args.seed,
                threads=args.threads,
                plot=plot,
            )
        if args.what == "laplace":
            return _demo_laplace(
                epochs=demo.LAPLACE_EPOCHS if args.epochs is None else args.epochs,
                split=demo.LAPLACE_SPLIT if args.split is None else args.split,
                seed=args.seed,
                threads=args.threads,
                plot=plot,
            )
        steps = DEMO_STEPS if args.steps is None else args.steps
        return _demo(steps=steps, seed=args.seed, threads=args.threads, plot=plot)
    if args.command == "factors":
        if args.save is not None and not args.save.parent.is_dir():
            parser.error(f"--save: folder {str(args.save.parent)!r} does not exist")
        return _factors(
            epochs=args.epochs,
            fisher=args.fisher,
            seed=args.seed,
            threads=args.threads,
            save=args.save,
        )
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse checks the choices


# -- demo ---------------------------------------------------------------------------------------

# Adam sets the target; Muon (the usual 0.02) and adaptive K-FAC (its defaults) race to it.
DEMO_GRIDS: dict[str, tuple[float, ...]] = {"adam": (3e-3,), "muon": (0.02,), "kfac": (1.0,)}
DEMO_STEPS = 300
DEMOS = ("optim", "laplace", "influence")
DEMO_PLOTS = {
    "optim": "kronfac_demo.png",
    "laplace": "kronfac_laplace.png",
    "influence": "kronfac_influence.png",
}
# The options of some demos only (their default None: not given).
DEMO_FLAGS = {"optim": ("steps",), "laplace": ("epochs", "split"), "influence": ("epochs", "train")}
# demo influence: the test images whose most helpful and harmful training images are shown.
DEMO_QUERIES = 4


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads, then restore the count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _demo(*, steps: int, seed: int, threads: int, plot: Path | None) -> int:
    """Race Muon and adaptive K-FAC to Adam's loss on the digits. Returns the status."""
    try:
        tasks = demo.digits_tasks()
    except ImportError:
        print(_SKLEARN_MISSING.format("demo"), file=sys.stderr)
        return 2
    races = []
    timed = min(10, steps)  # steps per method per timing round, and profiled
    print(
        f"digits, batch 256, seed {seed}, {threads} thread(s); step times: 5 interleaved rounds "
        f"of {timed} steps, median"
    )
    with _threads(threads):
        for task in tasks:
            races.append(
                demo.race(
                    task,
                    DEMO_GRIDS,
                    seeds=[seed],
                    steps=steps,
                    eval_every=max(1, steps // 30),
                    rounds=5,
                    round_steps=timed,
                    profile_steps=timed,
                )
            )
            print(f"\n{races[-1].table()}")
        if plot is not None:
            title = f"digits, batch 256, {steps} Adam steps, seed {seed}"
            print("\n" + demo.plot_races(races, plot, title))
    return 0


def _demo_laplace(
    *, epochs: int, split: tuple[int, int, int], seed: int, threads: int, plot: Path | None
) -> int:
    """The MAP MLP against K-FAC Laplace approximations on the digits. Returns the status."""
    try:
        sizes = demo.digits_split(seed, split).describe()
    except ImportError:
        print(_SKLEARN_MISSING.format("demo laplace"), file=sys.stderr)
        return 2
    print(
        f"digits {sizes} (seed {seed}), MLP 64-128-128-10 tanh trained to its MAP: {epochs} "
        f"epochs of Adam, weight decay δ₀/N, δ₀ = {demo.LAPLACE_PRIOR:g}; {threads} thread(s)\n"
        f"Laplace: K-FAC, probit predictive; prior δ tuned by the marginal likelihood "
        f"(marglik) or the validation NLL (gridsearch); ECE: {demo.ECE_BINS} bins",
        flush=True,
    )
    with _threads(threads):
        runs = demo.laplace_digits(seed, demo.DEMO_LAPLACE_VARIANTS, sizes=split, epochs=epochs)
    print(f"\n{demo.laplace_table(runs)}")
    if plot is not None:
        title = f"digits test set ({sizes}), seed {seed}"
        print("\n" + demo.plot_reliability(runs, plot, title))
    return 0


def _demo_influence(*, epochs: int, train: int, seed: int, threads: int, plot: Path | None) -> int:
    """Self-influence against baselines at finding flipped digit labels. Returns the status."""
    try:
        sizes = demo.mislabeled_digits(seed, train).describe()
    except ImportError:
        print(_SKLEARN_MISSING.format("demo influence"), file=sys.stderr)
        return 2
    print(
        f"digits {sizes} (seed {seed}), MLP 64-64-10 tanh: {epochs} epochs of Adam on the noisy "
        f"labels, weight decay δ₀/N, δ₀ = {demo.LAPLACE_PRIOR:g}; {threads} thread(s)\n"
        "Scores of the training images, the higher the more suspect: kronfac.Influence "
        "self-influence ∇ℓᵀ(H + δI)⁻¹∇ℓ\n(H: EKFAC / K-FAC of the summed loss, MC Fisher, δ = "
        "0.1 x each layer's mean eigenvalue), the per-example loss and gradient norm;\n"
        "AUROC of finding the flipped labels, precision@k: flipped among the k highest, k = "
        "the number flipped",
        flush=True,
    )
    with _threads(threads):
        study = demo.mislabel_detection(seed, train=train, epochs=epochs)
        print(f"\n{demo.influence_table(study.detections)}")
        print(
            f"\ntraining accuracy (noisy labels) {study.train_accuracy:.3f}, test accuracy "
            f"{study.test_accuracy:.3f}"
        )
        inf = study.influences["EKFAC self-influence"]
        index, scores = demo.influence_queries(inf, study, DEMO_QUERIES)
    y_test, y_train = study.data.test[1], study.data.train[1]
    print(
        "\nEKFAC influence of the training images on test images (positive: upweighting it "
        "lowers the test loss; * a flipped label):"
    )
    for q, s in zip(index.tolist(), scores, strict=True):
        order = s.argsort(descending=True).tolist()
        names = [
            f"#{t} y={int(y_train[t])}{'*' if bool(study.data.flipped[t]) else ''} "
            f"({float(s[t]):+.3g})"
            for t in order[:3] + order[::-1][:3]
        ]
        print(
            f"  test #{q} (y={int(y_test[q])}): most helpful {', '.join(names[:3])}; "
            f"most harmful {', '.join(names[3:])}"
        )
    if plot is not None:
        title = f"digits {sizes}, seed {seed}: EKFAC influence on test images"
        print("\n" + demo.plot_influential(study, index, scores, plot, title))
    return 0


# -- factors ------------------------------------------------------------------------------------


def _train(
    model: nn.Module, loader: DataLoader[tuple[Tensor, ...]], loss_fn: nn.Module, epochs: int
) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=_LR)
    model.train()
    for _ in range(epochs):
        for X, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(X), y).backward()
            optimizer.step()


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    X_train: Tensor,
    y_train: Tensor,
    X_test: Tensor,
    y_test: Tensor,
) -> tuple[float, float]:
    """``(train loss, test accuracy)`` of ``model``."""
    train_loss = float(loss_fn(model(X_train), y_train))
    accuracy = float((model(X_test).argmax(dim=-1) == y_test).float().mean())
    return train_loss, accuracy


def _forward_backward_time(
    model: nn.Module, loss_fn: nn.Module, loader: DataLoader[tuple[Tensor, ...]]
) -> float:
    """Seconds of one plain forward + backward pass (weight gradients) over ``loader``."""
    start = time.perf_counter()
    for X, y in loader:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def _condition_number(eigenvalues: Tensor) -> float:
    """Largest over smallest eigenvalue; ``inf`` when the smallest is ``<= 0``."""
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    return largest / smallest if smallest > 0 else float("inf")


def _format_cond(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.3e}"


def _factor_table(factors: kronfac.KroneckerFactors) -> str:
    """One row per module: shapes, traces, condition numbers and the time of their eigvalsh."""
    header = ["module", "A shape", "S shape", "tr(A)", "tr(S)", "cond(A)", "cond(S)", "eigh ms"]
    torch.linalg.eigvalsh(torch.eye(2, dtype=torch.float64))  # load LAPACK outside the timings
    rows = []
    for name, (A, S) in factors.items():
        # the MLP's factors, computed without rank=, are dense tensors (never low-rank)
        assert isinstance(A, Tensor) and isinstance(S, Tensor)
        start = time.perf_counter()
        eig_A = torch.linalg.eigvalsh(A.double())
        eig_S = torch.linalg.eigvalsh(S.double())
        eigh_ms = 1e3 * (time.perf_counter() - start)
        rows.append(
            [
                name,
                "x".join(map(str, A.shape)),
                "x".join(map(str, S.shape)),
                f"{float(A.trace()):.4g}",
                f"{float(S.trace()):.4g}",
                _format_cond(_condition_number(eig_A)),
                _format_cond(_condition_number(eig_S)),
                f"{eigh_ms:.1f}",
            ]
        )
    table = demo.format_table(header, rows)
    if any("inf" in r[5:7] for r in rows):
        table += (
            "\ncond = inf: a singular factor (smallest eigenvalue <= 0), from always-zero "
            "inputs, dead ReLUs or\nthe softmax's constant direction; invert it with damping."
        )
    return table


def _factors(*, epochs: int, fisher: str, seed: int, threads: int, save: Path | None) -> int:
    """Train the MLP, compute and report its factors. Returns the exit status."""
    try:
        X_train, y_train, X_test, y_test = demo.digits_data()
    except ImportError:
        print(_SKLEARN_MISSING.format("factors"), file=sys.stderr)
        return 2

    with _threads(threads):
        torch.manual_seed(seed)
        model = build_mlp()
        loss_fn = nn.CrossEntropyLoss()
        train_set = TensorDataset(X_train, y_train)
        shuffled = DataLoader(
            train_set,
            batch_size=_BATCH_SIZE,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        loader = DataLoader(train_set, batch_size=_BATCH_SIZE)

        start = time.perf_counter()
        _train(model, shuffled, loss_fn, epochs)
        train_s = time.perf_counter() - start
        train_loss, accuracy = _evaluate(model, loss_fn, X_train, y_train, X_test, y_test)
        print(
            f"MLP 64-128-64-10 on digits ({len(y_train)} train / {len(y_test)} test), "
            f"{epochs} epochs in {train_s:.2f} s ({threads} threads): train loss {train_loss:.4f}, "
            f"test accuracy {100 * accuracy:.2f}%"
        )

        start = time.perf_counter()
        factors = kronfac.compute_factors(model, loss_fn, loader, fisher=fisher, progress=True)
        factors_s = time.perf_counter() - start
        sys.stderr.flush()
        plain_s = _forward_backward_time(model, loss_fn, loader)

        print(f"\nKronecker factors (fisher={fisher}, N={factors.num_data}):")
        print(_factor_table(factors))
        print(
            f"\ncompute_factors: {factors_s:.3f} s = {factors_s / plain_s:.1f}x one plain "
            f"forward+backward pass over the same data ({plain_s:.3f} s)"
        )
        if save is not None:
            factors.save(save)
            print(f"factors saved to {save}")
    return 0
