"""The optimizer race: Adam, AdamW, SGD, Muon, K-FAC and EKFAC to Adam's loss, and step costs.

1. Race (``kronfac.demo.race``), per task of ``--tasks``: the deep autoencoder and the MLP
   classifier on scikit-learn's digits (evaluated by the training loss), and a byte-level
   transformer language model on the standard library's source (evaluated by the held-out
   loss). Phase 1 trains Adam for ``--steps`` steps S with each learning rate of its grid and
   each of ``--seeds`` seeds; the target is the median final evaluation of the best Adam
   learning rate. Phase 2 runs every method of ``--methods`` with each learning rate of its
   grid (Adam: its best) and each seed until the target or ``--max-factor`` x S steps. Each
   method's step time (forward, backward, optimizer step) is measured apart at its best
   learning rate: ``--rounds`` interleaved rounds of ``--round-steps`` steps on the same
   batches, median; its ``aten::`` ops per step come from a profiled run. Reported per method
   at its best learning rate (medians over the seeds): steps to the target, step time and
   time to the target (steps x step time) relative to Adam's, ops per step, the final
   evaluation and (MLP) the test accuracy. ``--plot``: the evaluation against steps and
   seconds, one column per task.
2. W1 (the MLP 784-512-512-10 of the factor benchmarks, batch 256 of random data): the step
   time and ops per step of Adam, Muon, fixed K-FAC, adaptive K-FAC and EKFAC relative to
   Adam's (the race's options).
3. ``--stability N``: adaptive K-FAC with its defaults on each task for N seeds and S steps;
   how many runs diverged (a non-finite evaluation, or a final one above the starting one), the
   worst final evaluation, and how many runs warned. Nothing else runs.

Usage::

    python benchmarks/optim.py                          # race (3 tasks, 3 seeds, S = 500), W1
    python benchmarks/optim.py --only w1 --threads 2
    python benchmarks/optim.py --stability 50
    python benchmarks/optim.py --tasks lm --methods adam,kfac --steps 20 --seeds 1 --no-plot
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from _common import machine
from torch import nn
from tqdm import tqdm

from kronfac import demo as C

# W1's methods and learning rates (adaptive K-FAC / EKFAC: their default step).
W1_LRS = {"adam": 1e-3, "muon": 0.02, "kfac-fixed": 0.1, "kfac": 1.0, "ekfac": 1.0}


def race(tasks: Sequence[C.Task], methods: Sequence[str], args: argparse.Namespace) -> None:
    grids = {m: C.METHODS[m] for m in ("adam", *methods)}
    races = []
    for task in tasks:
        print(f"\n{task.describe()}", flush=True)
        result = C.race(
            task,
            grids,
            seeds=range(args.seeds),
            steps=args.steps,
            max_factor=args.max_factor,
            eval_every=args.eval_every,
            rounds=args.rounds,
            round_steps=args.round_steps,
            profile_steps=args.profile_steps,
        )
        print(f"\n{result.table()}", flush=True)
        races.append(result)
    if args.plot is not None:
        title = (
            f"median of {args.seeds} seeds at each method's best learning rate; "
            f"seconds = steps x median step time"
        )
        print("\n" + C.plot_races(races, args.plot, title))


def w1_task() -> C.Task:
    torch.manual_seed(0)
    batch = (torch.randn(256, 784), torch.randint(0, 10, (256,)))

    def mlp() -> nn.Module:
        return nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    return C.Task("w1", mlp, nn.CrossEntropyLoss(), lambda seed: itertools.repeat(batch), batch)


def w1_step_time(args: argparse.Namespace) -> None:
    rounds, steps, profiled = args.rounds, args.round_steps, args.profile_steps
    timings = C.time_steps(w1_task(), W1_LRS, rounds=rounds, steps=steps, profile_steps=profiled)
    adam = timings["adam"]
    print(
        f"\nW1 784-512-512-10, batch 256: step time ({rounds} interleaved rounds of {steps} "
        f"steps, median), aten ops per step ({profiled} profiled steps)"
    )
    rows = [
        [
            name,
            f"{1e3 * t.seconds:.2f}",
            f"{t.seconds / adam.seconds:.2f}",
            f"{t.aten_ops:.0f}",
            f"{t.aten_ops / adam.aten_ops:.1f}",
        ]
        for name, t in timings.items()
    ]
    print(C.format_table(["method", "ms / step", "x Adam", "aten ops / step", "ops x Adam"], rows))


def stability(tasks: Sequence[C.Task], runs: int, args: argparse.Namespace) -> None:
    print(f"\nAdaptive K-FAC, its defaults: {runs} seeds x {args.steps} steps per task")
    rows, notes = [], []
    for task in tasks:
        results, warned, messages = [], 0, set()
        for seed in tqdm(range(runs), desc=f"{task.name}: stability", file=sys.stderr):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results.append(
                    C.train(task, "kfac", 1.0, seed, args.steps, eval_every=args.eval_every)
                )
            warned += bool(caught)
            messages.update(f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught)
        diverged = [r.seed for r in results if r.final_loss > r.losses[0]]  # NaN reads inf
        finals = [r.final_loss for r in results]
        rows.append(
            [
                task.name,
                task.evaluation,
                str(len(results)),
                str(len(diverged)),
                f"{statistics.median(r.losses[0] for r in results):.4g}",
                f"{statistics.median(finals):.4g}",
                f"{max(finals):.4g}",
                str(warned),
            ]
        )
        if diverged:
            notes.append(f"{task.name}: diverged seeds {diverged}")
        notes += [f"{task.name}: {m}" for m in sorted(messages)]
    header = ["task", "evaluation", "runs", "diverged", "start", "median final", "worst final"]
    print(C.format_table([*header, "runs that warned"], rows))
    print("\n".join(notes))


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"expected some of {','.join(choices)}")
        return names

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="Adam's steps S (default 500)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-factor", type=float, default=3.0, help="other runs: at most x S")
    parser.add_argument("--tasks", type=_names(C.TASKS), default=list(C.TASKS))
    parser.add_argument("--methods", type=_names(list(C.METHODS)), default=list(C.METHODS))
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--round-steps", type=int, default=10, help="steps per method per round")
    parser.add_argument("--profile-steps", type=int, default=10, help="steps profiled for ops")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("optim.png"))
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None)
    parser.add_argument("--only", choices=("race", "w1"))
    parser.add_argument("--stability", type=int, metavar="N", help="only the stability check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    tasks = C.load_tasks(args.tasks) if args.only != "w1" else []
    if args.stability:
        stability(tasks, args.stability, args)
        return
    methods = [m for m in args.methods if m != "adam"]
    print(f"learning-rate grids: { {m: C.METHODS[m] for m in ('adam', *methods)} }")
    print(f"kfac-fixed: {C.KFAC_FIXED_OPTIONS}; kfac, ekfac: KFAC's defaults (adaptive)")
    if args.only in (None, "race"):
        race(tasks, methods, args)
    if args.only in (None, "w1"):
        w1_step_time(args)


if __name__ == "__main__":
    main()
