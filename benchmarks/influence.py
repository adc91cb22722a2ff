"""Influence on the digits: self-influence finds flipped labels; baselines and the exact GGN.

Per seed and training length (``kronfac.demo.mislabel_detection``): scikit-learn's
``load_digits`` (pixels / 16) in a random permutation of the seed, 1000 training images (the
other 797: test), 10% of the training labels flipped to another class (uniform among the 9
others, drawn by the seed); an MLP 64-64-10 with tanh (4,810 parameters, initial weights of the
seed) trained on the noisy labels as ``benchmarks/laplace.py`` trains its MAP: Adam (learning
rate 3e-3, cosine-annealed to 0, batches of 100) with weight decay δ₀ / N, δ₀ = 1, for each of
``--epochs`` (default 100, as laplace.py, where the MLP does not fit the flipped labels, and
1000, where it memorises about half of them). Then each training image gets a score, the higher
the more suspect, and the AUROC (``sklearn.metrics.roc_auc_score``) of the scores detecting the
flipped labels is reported, with precision@k (the share of flipped labels among the k highest
scores, k = 100 the number flipped):

- ``kronfac.Influence(...).self_scores``, EKFAC and K-FAC: ``∇ℓ_tᵀ (H + δI)⁻¹ ∇ℓ_t`` with ``H``
  the curvature of the summed training loss (MC Fisher, one sample), kronfac's default damping
  ``δ_m = 0.1 ×`` the mean eigenvalue of layer m's block, biases joint with their weights;
- the exact-GGN self-influence: the same formula with ``H`` the dense float64 GGN of the summed
  training loss, ``Σ_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n`` (``J_n`` the ``[10, 4810]`` Jacobian of
  the logits from ``torch.func.jacrev``; the type-2 Fisher, whose expectation the MC Fisher
  estimates), and the same damping rule applied to the dense GGN's diagonal blocks: ``δ_m =
  0.1 × tr(G_mm) / P_m`` per layer m (weight and bias), then a Cholesky factorisation of
  ``G + diag(δ)`` and one triangular solve of the 1000 per-example gradients;
- the per-example training loss and the norm of the per-example gradient (``torch.func``).

Also the Spearman correlation of each kronfac self-influence with the exact-GGN one. Seconds:
the curvature and the scores (the exact GGN: Jacobians, GGN, damping, Cholesky and solve).
Each table: the median over the seeds and the range (min–max).

Usage::

    python benchmarks/influence.py       # 3 seeds, 100 and 1000 epochs (about 2 min, 1 core)
    python benchmarks/influence.py --seeds 1 --epochs 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _common import machine
from scipy.stats import spearmanr
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from tqdm import tqdm

from kronfac import demo as C
from kronfac.influence.influence import HEURISTIC_DAMPING

EXACT = "exact-GGN self-influence"


def exact_self_influence(
    model: nn.Module, X: Tensor, y: Tensor, chunk: int = 100
) -> tuple[Tensor, dict[str, float]]:
    """``g_nᵀ (G + diag(δ))⁻¹ g_n`` with the dense float64 GGN ``G`` of the summed loss.

    ``δ`` per Linear layer (its weight and bias): ``HEURISTIC_DAMPING · tr(G_mm) / P_m``.

    Returns:
        The scores ``[n]`` and ``δ`` per layer.
    """
    model64 = _double(model)
    params = {k: v.detach() for k, v in model64.named_parameters()}
    X, y = X.double(), y
    P = sum(p.numel() for p in params.values())

    def logits(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model64, p, (x[None],))[0]

    def loss(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits(p, x)[None], t[None], reduction="sum")

    G = torch.zeros(P, P, dtype=torch.float64)
    grads = []
    for s in range(0, len(y), chunk):
        xs, ts = X[s : s + chunk], y[s : s + chunk]
        J = vmap(jacrev(logits), in_dims=(None, 0))(params, xs)  # name -> [c, 10, *shape]
        J = torch.cat([J[k].flatten(2) for k in params], dim=2)  # [c, 10, P]
        p = torch.softmax(functional_call(model64, params, (xs,)), dim=-1).detach()
        # diag(p) − p pᵀ = B Bᵀ with B = diag(√p) − p √pᵀ (Σ p = 1)
        B = torch.diag_embed(p.sqrt()) - p[:, :, None] * p.sqrt()[:, None, :]
        L = (B.transpose(1, 2) @ J).reshape(-1, P)  # rows of Bᵀ J
        G.addmm_(L.T, L)
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ts)
        grads.append(torch.cat([g[k].flatten(1) for k in params], dim=1))
    # the damping rule per layer: its weight and bias together
    delta = torch.empty(P, dtype=torch.float64)
    deltas, start = {}, 0
    for name, module in model64.named_children():
        size = sum(p.numel() for p in module.parameters())
        if size:
            deltas[name] = HEURISTIC_DAMPING * float(G.diagonal()[start : start + size].mean())
            delta[start : start + size] = deltas[name]
            start += size
    assert start == P  # named_parameters() lists the layers' weights and biases in this order
    chol = torch.linalg.cholesky(G + torch.diag(delta))
    Z = torch.linalg.solve_triangular(chol, torch.cat(grads).T, upper=False)  # [P, n]
    return Z.square().sum(0), deltas


def _double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def run(seed: int, epochs: int) -> tuple[list[C.Detection], C.MislabelStudy, dict[str, float]]:
    """One seed's detections with the exact GGN's, the Spearman ρ with it, and the dampings.

    The third item: ``"ρ <name>"`` per kronfac row, ``"δ <curvature> <layer>"`` per layer.
    """
    study = C.mislabel_detection(seed, epochs=epochs)
    X, y = study.data.train
    start = time.perf_counter()
    exact, deltas = exact_self_influence(study.model, X, y)
    seconds = time.perf_counter() - start
    detections = list(study.detections)
    detections.insert(len(C.INFLUENCE_CURVATURES), C.Detection.of(EXACT, seed, exact,
                      study.data.flipped, seconds))  # fmt: skip
    stats = {
        f"Spearman ρ({d.name}, exact GGN)": float(spearmanr(d.scores, exact).statistic)
        for d in study.detections
        if d.name in C.INFLUENCE_CURVATURES
    }
    for name, inf in study.influences.items():
        stats |= {f"δ {name.split()[0]} {m}": d for m, d in inf.damping.items()}
    stats |= {f"δ exact GGN {m}": d for m, d in deltas.items()}
    return detections, study, stats


def fitted_flips(study: C.MislabelStudy) -> float:
    """The share of flipped training labels the model predicts (has memorised)."""
    X, y = study.data.train
    with torch.no_grad():
        hit = study.model(X[study.data.flipped]).argmax(-1) == y[study.data.flipped]
    return float(hit.float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument(
        "--epochs",
        type=lambda s: [int(e) for e in s.split(",")],
        default=[100, 1000],
        help="comma-separated training lengths (default 100,1000)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    total = time.perf_counter()
    median = statistics.median
    for epochs in args.epochs:
        detections: list[C.Detection] = []
        stats: dict[str, list[float]] = {}
        studies = []
        for seed in tqdm(range(args.seeds), desc=f"{epochs} epochs: seeds", file=sys.stderr):
            found, study, values = run(seed, epochs)
            detections += found
            studies.append(study)
            for name, value in values.items():
                stats.setdefault(name, []).append(value)
        params = sum(p.numel() for p in studies[0].model.parameters())
        print(
            f"\n## {epochs} epochs\n\ndigits {studies[0].data.describe()}, MLP 64-64-10 tanh "
            f"({params:,} parameters), {epochs} epochs of Adam, weight decay δ₀/N, δ₀ = "
            f"{C.LAPLACE_PRIOR:g}; {args.seeds} seed(s), median (range). Training accuracy on "
            f"the noisy labels {median(s.train_accuracy for s in studies):.3f}, flipped labels "
            f"fitted {median(fitted_flips(s) for s in studies):.2f}, test accuracy "
            f"{median(s.test_accuracy for s in studies):.3f}; k = "
            f"{int(studies[0].data.flipped.sum())}\n"
        )
        print(C.influence_table(detections))
        print()
        for name, values in stats.items():
            print(f"{name}: {median(values):.3g} ({min(values):.3g}–{max(values):.3g})")
    print(f"\ntotal {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
