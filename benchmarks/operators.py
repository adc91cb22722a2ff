"""Time the curvature operators of issue 3 on W1 against BASE (forward + backward).

- ``K.inverse(damping=1e-3) @ v``: the first call (Cholesky / eigen decompositions of every
  factor included) and later calls (products only), for the default, heuristic and exact modes;
- EKFAC construction (two passes over the data: factors, then the eigenvalue correction);
- ``K.logdet(1e-3)`` and ``K.trace()``.

One process, interleaved with BASE, median of ``--repeats`` runs after a warm-up, torch threads
= cores. Prints a Markdown table of ratios to BASE.

    python benchmarks/operators.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import interleaved, machine, setup_threads
from factors import base_pass, w1

import kronfac


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    setup_threads()
    model, loss_fn, data, _, title = w1()
    K = kronfac.KFAC(model, loss_fn, data, fisher="mc")
    v = torch.randn(K.shape[0])

    def fresh() -> kronfac.KFAC:
        """The same operator without cached decompositions, for first-call timings."""
        return kronfac.KFAC.from_factors(K.factors, model)

    inverses = {
        "default": K.inverse(1e-3),
        "heuristic": K.inverse(1e-3, heuristic=True),
        "exact": K.inverse(1e-3, exact=True),
    }
    fns = {"BASE (forward+backward)": lambda: base_pass(model, loss_fn, data)}
    for mode in inverses:
        opts = {"heuristic": mode == "heuristic", "exact": mode == "exact"}
        fns[f"K.inverse(1e-3, {mode}) @ v, first call"] = lambda o=opts: (
            fresh().inverse(1e-3, **o) @ v
        )
        fns[f"K.inverse(1e-3, {mode}) @ v, later calls"] = lambda m=mode: inverses[m] @ v
    fns["K @ v"] = lambda: K @ v
    fns["K.logdet(1e-3), eigendecompositions included"] = lambda: fresh().logdet(1e-3)
    fns["EKFAC(...) construction (mc)"] = lambda: kronfac.EKFAC(model, loss_fn, data, fisher="mc")
    fns["KFAC(...) construction (mc)"] = lambda: kronfac.KFAC(model, loss_fn, data, fisher="mc")
    medians = interleaved(fns, args.repeats)
    base = medians["BASE (forward+backward)"]
    print(f"Machine: {machine()}\n")
    print("| workload | operation | median s | x BASE |")
    print("|---|---|---|---|")
    for name, t in medians.items():
        print(f"| {title} | {name} | {t:.4f} | {t / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
