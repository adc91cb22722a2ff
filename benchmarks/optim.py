"""K-FAC / EKFAC against Adam and SGD: time to a training loss, and the cost of a step.

1. Digits (scikit-learn's ``load_digits``, 1437 training images; ``kronfac.demo``):
   a deep autoencoder 64-256-128-32-128-256-64 (tanh, sigmoid output, BCE) and an MLP
   classifier 64-256-256-10. Phase 1 trains Adam for ``--steps`` steps with each learning rate
   of its grid and ``--seeds`` seeds; the target is the median final training loss of the best
   Adam learning rate. Phase 2 runs every method (Adam's best rate again, SGD with momentum,
   K-FAC, EKFAC; three learning rates each) until it reaches the target or ``--steps`` steps,
   seed by seed, methods interleaved. Reported per method (its best rate): steps and training
   seconds to the target (median over seeds), the time relative to Adam's, the amortised step
   time relative to Adam's, the final loss and (MLP) the test accuracy.
2. W1 (the MLP 784-512-512-10 of the factor benchmarks, batch 256, random data): the
   amortised seconds per training step (forward, backward, optimizer step) of K-FAC and EKFAC
   (``inverse_every=10``) relative to Adam's, interleaved rounds of 20 steps, median.

Usage: ``python benchmarks/optim.py [--steps 2000] [--seeds 3] [--plot benchmarks/optim.png]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import machine
from torch import nn
from tqdm import tqdm

from kronfac import demo as C
from kronfac.optim import KFAC


def digits(steps: int, seeds: int, plot: Path | None) -> None:
    tasks = C.digits_tasks()
    curves, targets = {}, {}
    for task in tasks:
        # phase 1: Adam's grid sets the target
        adam = [
            C.train(task, "adam", lr, seed, steps)
            for lr in C.METHODS["adam"]
            for seed in range(seeds)
        ]
        by_lr = {lr: [r for r in adam if r.lr == lr] for lr in C.METHODS["adam"]}
        best_lr = min(by_lr, key=lambda lr: statistics.median(r.final_loss for r in by_lr[lr]))
        target = statistics.median(r.final_loss for r in by_lr[best_lr])
        targets[task.name] = target
        # phase 2: every method to the target, interleaved seed by seed
        grids = {"adam": (best_lr,), **{m: C.METHODS[m] for m in ("sgd", "kfac", "ekfac")}}
        total = seeds * sum(len(g) for g in grids.values())
        runs = []
        with tqdm(total=total, desc=f"{task.name}: runs to {target:.4g}", file=sys.stderr) as bar:
            for seed in range(seeds):
                for method, grid in grids.items():
                    for lr in grid:
                        runs.append(C.train(task, method, lr, seed, steps, target=target))
                        bar.update(1)
        adam_step = statistics.median(r.seconds_per_step for r in runs if r.method == "adam")
        rows = C.summarise(runs, target, adam_step)
        print(f"\n{task.name}: target {target:.5g} = Adam (lr {best_lr:g}) after {steps} steps")
        print(C.format_table(C.TABLE_HEADER, rows))
        best = {row[0]: float(row[1]) for row in rows}
        curves[task.name] = [
            C.median_run([r for r in runs if r.method == m and r.lr == lr], target)
            for m, lr in best.items()
        ]
    if plot is not None:
        title = f"digits, batch 256, median of {seeds} seeds (best learning rate per method)"
        print("\n" + C.plot_runs(curves, targets, plot, title))


def w1_step_time(rounds: int) -> None:
    torch.manual_seed(0)
    X = torch.randn(256, 784)
    y = torch.randint(0, 10, (256,))
    loss_fn = nn.CrossEntropyLoss()
    setups = {
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        "kfac": lambda m: KFAC(m, 0.1, loss_fn=loss_fn, inverse_every=10),
        "kfac factor_every=10": lambda m: KFAC(
            m, 0.1, loss_fn=loss_fn, inverse_every=10, factor_every=10
        ),
        "kfac cholesky": lambda m: KFAC(
            m, 0.1, loss_fn=loss_fn, inverse_every=10, inverse_method="cholesky"
        ),
        "ekfac": lambda m: KFAC(m, 0.1, loss_fn=loss_fn, inverse_every=10, ekfac=True),
    }
    states = {}
    for name, make in setups.items():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        states[name] = (model, make(model))

    def steps(name: str, n: int) -> float:
        model, opt = states[name]
        start = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(X), y).backward()
            opt.step()
        return (time.perf_counter() - start) / n

    for name in states:  # warm-up: first decompositions, allocator
        steps(name, 10)
    times: dict[str, list[float]] = {name: [] for name in states}
    for _ in range(rounds):
        for name in states:
            times[name].append(steps(name, 20))
    adam = statistics.median(times["adam"])
    print(f"\nW1 784-512-512-10, batch 256: amortised step time ({rounds} rounds of 20 steps)")
    rows = [
        [name, f"{1e3 * statistics.median(t):.2f}", f"{statistics.median(t) / adam:.2f}"]
        for name, t in times.items()
    ]
    print(C.format_table(["method", "ms / step", "x Adam"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("optim.png"))
    parser.add_argument("--only", choices=("digits", "w1"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"K-FAC / EKFAC options: {C.KFAC_OPTIONS}; learning-rate grids: {C.METHODS}")
    if args.only in (None, "digits"):
        digits(args.steps, args.seeds, args.plot)
    if args.only in (None, "w1"):
        w1_step_time(args.rounds)


if __name__ == "__main__":
    main()
