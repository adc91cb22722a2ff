"""Laplace on the digits: calibration of K-FAC / EKFAC Laplace approximations against the MAP.

Per seed (``kronfac.demo.laplace_digits``): scikit-learn's ``load_digits`` (pixels / 16) in a
random permutation of the seed, cut into 1000 train / 397 validation / 400 test images; an MLP
64-128-128-10 with tanh (initial weights of the seed) trained to its MAP: 100 epochs of Adam
(learning rate 3e-3, annealed to 0 by a cosine, batches of 100) with weight decay δ₀ / N, the
gradient of the negative log posterior / N of the prior N(0, δ₀⁻¹ I), δ₀ = ``--prior`` (1).
Then ``kronfac.Laplace`` (type-2 Fisher, joint biases, probit predictive) started from δ₀:

- every Linear layer, K-FAC: the prior tuned by the marginal likelihood (one δ, and one δ per
  layer from a dict prior: 100 Adam steps on log δ), and by a grid search of the validation
  NLL over 10^k, k = -1, ..., 4;
- the last layer alone, K-FAC: marginal likelihood, and a grid search over Laplace's default
  grid 10^k, k = -4, -3.5, ..., 4;
- with ``--ekfac``: every layer with EKFAC, the same three tunings.

Reported on the test set, medians over the seeds: accuracy, NLL, ECE (15 equal-width
confidence bins), the ECE relative to the same seed's MAP, and the seconds to build the
approximation and tune its prior (the test predictive excluded). The issue's target: with the
grid-searched prior, a test ECE at least 30% below the MAP's with an NLL no worse. The
reliability diagram (``--plot``) pools the seeds' test predictions of the MAP, the all-layer
evidence prior (the underconfident one), and the two Laplace variants of least median test NLL.

Usage::

    python benchmarks/laplace.py                    # 3 seeds, K-FAC (about 2.5 min, 1 core)
    python benchmarks/laplace.py --ekfac --seeds 1
    python benchmarks/laplace.py --prior 0.1 --no-plot
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from _common import machine
from tqdm import tqdm

from kronfac import demo as C

KFAC_VARIANTS = [name for name in C.LAPLACE_VARIANTS if name.startswith("K-FAC")]
EKFAC_VARIANTS = [name for name in C.LAPLACE_VARIANTS if name.startswith("EKFAC")]
TARGET_ECE_RATIO = 0.7  # at least 30% below the MAP's


def target_lines(runs: list[C.LaplaceRun]) -> list[str]:
    """Whether each grid-searched variant meets the target, seed by seed and in the median."""
    maps = {r.seed: r.metrics for r in runs if r.name == "MAP"}
    lines = []
    for name in dict.fromkeys(r.name for r in runs if r.name.endswith("gridsearch")):
        group = [r for r in runs if r.name == name]
        ratios = [r.metrics.ece / max(maps[r.seed].ece, 1e-12) for r in group]
        excess = [r.metrics.nll - maps[r.seed].nll for r in group]
        held = [q <= TARGET_ECE_RATIO and d <= 0 for q, d in zip(ratios, excess, strict=True)]
        lines.append(
            f"{name}: ECE / MAP's {statistics.median(ratios):.2f} (median; target <= "
            f"{TARGET_ECE_RATIO}), NLL - MAP's {statistics.median(excess):+.2e} (median), no "
            f"worse on {sum(d <= 0 for d in excess)}/{len(group)} seeds; target held on "
            f"{sum(held)}/{len(group)} seeds"
        )
    return lines


def plotted(runs: list[C.LaplaceRun]) -> list[C.LaplaceRun]:
    """The MAP, the all-layer evidence prior, and the two Laplace variants of least NLL."""
    names = list(dict.fromkeys(r.name for r in runs if r.name != "MAP"))
    nll = {n: statistics.median(r.metrics.nll for r in runs if r.name == n) for n in names}
    keep = {"MAP", "K-FAC all, marglik", *sorted(names, key=nll.__getitem__)[:2]}
    return [r for r in runs if r.name in keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--epochs", type=int, default=C.LAPLACE_EPOCHS, help="MAP's epochs")
    parser.add_argument("--prior", type=float, default=C.LAPLACE_PRIOR, help="δ₀ (default 1)")
    parser.add_argument("--ekfac", action="store_true", help="also the EKFAC variants")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument(
        "--plot", type=Path, default=Path(__file__).with_name("laplace_reliability.png")
    )
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    variants = KFAC_VARIANTS + (EKFAC_VARIANTS if args.ekfac else [])
    runs: list[C.LaplaceRun] = []
    for seed in tqdm(range(args.seeds), desc="seeds", file=sys.stderr):
        runs += C.laplace_digits(seed, variants, epochs=args.epochs, prior_precision=args.prior)
    split = C.digits_split(0)
    print(
        f"\ndigits {split.describe()}, MLP 64-128-128-10 tanh, MAP: {args.epochs} epochs of "
        f"Adam, prior δ₀ = {args.prior:g}; test metrics, median of {args.seeds} seed(s); ECE: "
        f"{C.ECE_BINS} bins; prior δ per layer fc1/fc2/fc3 for 'per module'"
    )
    print(C.laplace_table(runs))
    print("\n".join(["", *target_lines(runs)]))
    if args.plot is not None:
        title = f"digits test set, {args.seeds} seed(s) pooled, prior δ₀ = {args.prior:g}"
        print("\n" + C.plot_reliability(plotted(runs), args.plot, title))


if __name__ == "__main__":
    main()
