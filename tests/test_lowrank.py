"""Low-rank Kronecker factors (``rank=`` / ``rank_threshold=``), against full-rank references.

Every factor whose side is ``>= rank_threshold`` is a :class:`kronfac.LowRankFactor`
``(U, eigenvalues)`` approximating, at the same scale, the factor the full-rank path returns.
Every dense reference is built *in the test* from the reconstructed factors
(``U diag(λ) Uᵀ``, ``torch.kron``, :func:`helpers.kfac_block`), never through the library's
operator ``to_dense``.

1. Exactness when the data's rank is at most ``k``: reconstructed ``A`` and ``S`` equal the
   full-rank factors (type-2 / empirical, joint / separate bias, flat inputs and sequences with
   expand / reduce, batches of unequal size), plus the form of ``(U, λ)`` (orthonormal columns,
   ``λ`` descending and non-negative); ``rank > side``; many rows in a low-dim subspace.
2. Truncation quality: within 10 % of the best rank-``k`` Frobenius error on decaying spectra
   (``0.8^i`` to ``0.99^i``, ranks 4 to 64, the default sketch width); ``oversample=`` sets the
   sketch's width, which never exceeds the side (exact when capped); sketches of one shape
   share one reproducible test matrix.
3. The operator surface (``@``, ``trace``, ``frobenius_norm``, ``diagonal``, ``logdet``, ``det``,
   ``to_dense``, the three damped inverses) against dense computations from the reconstructed
   factors; singular low-rank blocks (``logdet(0) = -inf``, ``inverse(0)`` raises).
4. Peak memory of the streaming path, measured in a subprocess.
5. Save / load, bad options, EKFAC with low-rank factors, grouped convolutions (not
   implemented above the threshold, unchanged below it).
6. ``fisher="forward-only"`` (``S = I`` on a low-rank side) and non-finite inputs on the
   streamed path.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    DT,
    assert_rel_close,
    damped_inv,
    gen,
    init,
    kfac_block,
    make_data,
    mlp,
    pi_damping,
    randn,
    split_batches,
)
from torch import Tensor, nn

import kronfac

DAMPING = 1e-2


# ----------------------------------------------------------------------------------------------
# helpers


def dense(F) -> Tensor:
    """A factor as a dense matrix, reconstructed in the test: ``U diag(λ) Uᵀ``."""
    if isinstance(F, kronfac.LowRankFactor):
        return (F.U * F.eigenvalues) @ F.U.T
    return F


def check_lowrank(F, side: int, k: int, what: str) -> None:
    """``F`` is a ``LowRankFactor`` of ``k`` orthonormal columns, ``λ`` descending and >= 0."""
    assert isinstance(F, kronfac.LowRankFactor), f"{what}: expected LowRankFactor, got {type(F)}"
    U, lam = F.U, F.eigenvalues
    assert tuple(U.shape) == (side, k), f"{what}: U shape {tuple(U.shape)}, expected {(side, k)}"
    assert tuple(lam.shape) == (k,), f"{what}: eigenvalues shape {tuple(lam.shape)}"
    assert U.dtype == DT and lam.dtype == DT, f"{what}: dtypes {U.dtype}, {lam.dtype}"
    assert torch.isfinite(U).all() and torch.isfinite(lam).all(), what
    eye = torch.eye(k, dtype=DT)
    assert_rel_close(U.T @ U, eye, 1e-12, f"{what}: UᵀU = I")
    assert bool((lam[:-1] >= lam[1:]).all()), f"{what}: eigenvalues not descending: {lam}"
    assert bool((lam >= 0).all()), f"{what}: negative eigenvalue {lam.min().item():.3e}"
    assert float(getattr(F, "shift", 0.0)) == 0.0, f"{what}: computed factor has a shift"
    assert_rel_close(F.to_dense(), dense(F), 1e-13, f"{what}: to_dense = U diag(λ) Uᵀ")


def check_factors(low, full, rank: int, threshold: int, tol: float, what: str) -> None:
    """Every factor of ``low``: low-rank iff its side >= threshold, equal to ``full``'s."""
    assert list(low) == list(full), what
    for mod in full:
        for field in ("A", "S"):
            F, ref = getattr(low[mod], field), getattr(full[mod], field)
            side = ref.shape[-1]
            name = f"{what} {mod}.{field} (side {side})"
            if side >= threshold:
                check_lowrank(F, side, min(rank, side), name)
            else:
                assert isinstance(F, Tensor) and not isinstance(F, kronfac.LowRankFactor), name
            assert_rel_close(dense(F), ref, tol, name)


# ----------------------------------------------------------------------------------------------
# 1. exactness when the data's rank is at most k

# (batch sizes, per-datum input shape, approx): total rows per factor <= 8 = rank
SHAPES = {
    "flat": ((1, 3, 2), (40,), "expand"),  # 6 data points
    "seq-expand": ((1, 2, 1), (2, 40), "expand"),  # 4 sequences x T = 2: 8 rows
    "seq-reduce": ((2, 1, 3), (3, 40), "reduce"),  # 6 sequences, positions merged: 6 rows
}


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_exact_when_data_rank_at_most_k(shape, fisher, bias):
    """Linear(40, 30)-tanh-Linear(30, 1), MSE: one output, so every ``A`` and ``S`` has rank at
    most the number of rows (<= 8); with ``rank=8, rank_threshold=20`` both factors of the first
    layer and ``A`` of the second are low-rank and equal the full-rank ones."""
    batches, in_shape, approx = SHAPES[shape]
    model = mlp((40, 30, 1), seed=1)
    data = make_data(model, "mse", batches, in_shape, seed=2)
    kw = dict(fisher=fisher, bias=bias, approx=approx)
    full = kronfac.compute_factors(model, nn.MSELoss(), data, **kw)
    low = kronfac.compute_factors(model, nn.MSELoss(), data, rank=8, rank_threshold=20, **kw)
    assert low.num_data == full.num_data
    check_factors(low, full, 8, 20, 1e-10, f"{shape} {fisher} {bias}")
    # the case really is low-rank: a low-rank factor with trailing (near-)zero eigenvalues
    lam = low["0"].A.eigenvalues
    assert lam[0] > 0
    if shape != "seq-expand":
        assert lam[-1] <= 1e-12 * lam[0], f"data rank 6 < 8, got eigenvalues {lam}"


def test_exact_rank_above_side():
    """``rank`` larger than every side: ``k = side``, the reconstruction is the full factor."""
    model = mlp((40, 30, 1), seed=3)
    data = make_data(model, "mse", (20, 30, 7), (40,), seed=4)
    full = kronfac.compute_factors(model, nn.MSELoss(), data, fisher="empirical")
    low = kronfac.compute_factors(
        model, nn.MSELoss(), data, fisher="empirical", rank=64, rank_threshold=20
    )
    check_factors(low, full, 64, 20, 1e-10, "rank 64")


def test_exact_inputs_in_subspace():
    """57 rows in 3 batches whose inputs live in a 5-dim subspace: ``A`` (with the bias column,
    rank <= 6) is exact although there are many more rows than ``k = 8``."""
    basis = torch.linalg.qr(randn(40, 5, g=gen(5)))[0].T  # [5, 40]

    def X_of(B, g):
        return randn(B, 5, g=g) @ basis + 0.3  # offset: the bias direction is not orthogonal

    model = mlp((40, 30, 1), seed=6)
    data = make_data(model, "mse", (20, 30, 7), None, seed=7, X_of=X_of)
    kw = dict(fisher="type-2")
    full = kronfac.compute_factors(model, nn.MSELoss(), data, **kw)
    low = kronfac.compute_factors(model, nn.MSELoss(), data, rank=8, rank_threshold=20, **kw)
    A = low["0"].A
    check_lowrank(A, 41, 8, "subspace A")
    assert_rel_close(dense(A), full["0"].A, 1e-10, "subspace A")
    assert A.eigenvalues[6:].max() <= 1e-12 * A.eigenvalues[0]


# ----------------------------------------------------------------------------------------------
# 2. truncation quality


def test_truncation_near_optimal():
    """Inputs with a decaying spectrum (``x = z diag(0.8^i) Q``), 512 rows in 8 batches: the
    streamed rank-8 ``A`` is within 10 % of the best rank-8 Frobenius error."""
    d, k = 64, 8
    Q = torch.linalg.qr(randn(d, d, g=gen(8)))[0]
    scales = 0.8 ** torch.arange(d, dtype=DT)

    def X_of(B, g):
        return (randn(B, d, g=g) * scales) @ Q

    model = init(nn.Linear(d, 4), seed=9)
    data = make_data(model, "mse", [64] * 8, None, seed=10, X_of=X_of)
    kw = dict(fisher="empirical")
    full = kronfac.compute_factors(model, nn.MSELoss(), data, **kw)
    low = kronfac.compute_factors(model, nn.MSELoss(), data, rank=k, rank_threshold=32, **kw)
    A_full = full[""].A
    check_lowrank(low[""].A, d + 1, k, "A")
    assert_rel_close(low[""].S, full[""].S, 1e-12, "S (dense, side 4)")
    evals, evecs = torch.linalg.eigh(A_full)
    best = (evecs[:, -k:] * evals[-k:]) @ evecs[:, -k:].T
    best_err = torch.linalg.norm(A_full - best).item()
    err = torch.linalg.norm(dense(low[""].A) - A_full).item()
    assert best_err > 1e-6 * torch.linalg.norm(A_full).item()  # truncation is not trivial
    assert err <= 1.10 * best_err, (
        f"rank-{k} error {err:.4e} vs best {best_err:.4e} (ratio {err / best_err:.4f})"
    )


SPECTRA = (0.8, 0.9, 0.95, 0.99)


def spectrum_inputs(rho: float, d: int, seed: int):
    """``X_of`` for :func:`mse_data`: rows ``z diag(√λ) Qᵀ``, ``λ_i = rho^i``, ``Q`` a random
    orthogonal matrix: the inputs' covariance is ``Q diag(λ) Qᵀ``."""
    Q = torch.linalg.qr(randn(d, d, g=gen(seed)))[0]
    scales = (rho ** torch.arange(d, dtype=DT)).sqrt()

    def X_of(B, g):
        return (randn(B, d, g=g) * scales) @ Q.T

    return X_of


def input_covariance(data) -> Tensor:
    """``A = XᵀX / N`` of a bias-free Linear layer, from the stacked inputs (float64)."""
    X = torch.cat([x for x, _ in data])
    return X.T @ X / len(X)


def truncation(evals: Tensor, evecs: Tensor, k: int) -> Tensor:
    """The optimal rank-``k`` approximation (Eckart–Young) from ``torch.linalg.eigh``'s output."""
    return (evecs[:, -k:] * evals[-k:]) @ evecs[:, -k:].T


@pytest.mark.parametrize("rho", SPECTRA)
def test_truncation_near_optimal_default_width(rho):
    """Input covariance spectrum ``rho^i`` (d = 600, 1024 rows in 8 batches), Linear(600, 1)
    without bias, ``fisher="forward-only"``: ``A = XᵀX / N`` (side 600 >= the default threshold)
    is streamed with the default sketch width, and for k = 4, 16, 64 its rank-k Frobenius error
    is within 1.10x the optimal one (``oversample=10`` gives 1.12x to 1.39x at k = 16 here, 1.49x
    to 4.36x at k = 64)."""
    d = 600
    model = init(nn.Linear(d, 1, bias=False), seed=34)
    data = make_data(model, "mse", [128] * 8, None, seed=35, X_of=spectrum_inputs(rho, d, seed=36))
    C = input_covariance(data)
    evals, evecs = torch.linalg.eigh(C)
    for k in (4, 16, 64):
        low = kronfac.compute_factors(model, nn.MSELoss(), data, fisher="forward-only", rank=k)
        A = low[""].A
        check_lowrank(A, d, k, f"{rho}^i, k = {k}")
        best_err = torch.linalg.norm(C - truncation(evals, evecs, k)).item()
        err = torch.linalg.norm(dense(A) - C).item()
        assert best_err > 1e-9 * torch.linalg.norm(C).item()  # truncation is not trivial
        assert err <= 1.10 * best_err, (
            f"{rho}^i, rank {k}: error {err:.4e} vs best {best_err:.4e} "
            f"(ratio {err / best_err:.4f})"
        )


def test_explicit_oversample_is_honoured():
    """Inputs of rank 10 in 600 dims, rank 4: with ``oversample=8`` (width 12 >= 10) and by
    default (width 26) the sketch is exact — the factor is the optimal rank-4 truncation — and
    with ``oversample=5`` (width 9 < 10) it is not."""
    d, k, r = 600, 4, 10
    basis = torch.linalg.qr(randn(d, r, g=gen(37)))[0]  # [d, r]
    scales = (0.9 ** torch.arange(r, dtype=DT)).sqrt()

    def X_of(B, g):
        return (randn(B, r, g=g) * scales) @ basis.T

    model = init(nn.Linear(d, 1, bias=False), seed=38)
    data = make_data(model, "mse", (20, 30, 10), None, seed=39, X_of=X_of)
    C = input_covariance(data)
    best = truncation(*torch.linalg.eigh(C), k)
    kw = dict(fisher="forward-only", rank=k)
    for oversample in (8, None):
        A = kronfac.compute_factors(model, nn.MSELoss(), data, oversample=oversample, **kw)[""].A
        check_lowrank(A, d, k, f"oversample {oversample}")
        assert_rel_close(dense(A), best, 1e-10, f"oversample {oversample} (width >= {r})")
    A = kronfac.compute_factors(model, nn.MSELoss(), data, oversample=5, **kw)[""].A
    check_lowrank(A, d, k, "oversample 5")
    gap = (dense(A) - best).abs().max().item()
    assert gap > 1e-6 * best.abs().max().item(), f"width 9 < rank {r} yet exact ({gap:.2e})"


@pytest.mark.parametrize("rank", [1, 4, 8, 16, 64, 600])
def test_sketch_width_never_exceeds_side(rank):
    """``l = min(side, rank + p)``, ``p = 3·rank + 10`` by default or ``oversample``; ``Ω``
    has orthonormal columns."""
    for side, oversample in itertools.product((20, 41, 64, 600), (None, 0, 10, 1000)):
        s = kronfac.linalg.StreamingLowRank(side, rank, torch.device("cpu"), oversample)
        p = 3 * rank + 10 if oversample is None else oversample
        assert s.width == min(side, rank + p), (side, rank, oversample, s.width)
        assert s.omega.shape == s.Y.shape == (side, s.width)
        eye = torch.eye(s.width, dtype=DT)
        assert_rel_close(s.omega.T @ s.omega, eye, 1e-12, f"ΩᵀΩ side {side} rank {rank}")


def test_sketch_omega_shared_and_reproducible():
    """Sketches of one shape share one ``Ω`` (made from a fixed seed, the same when made anew);
    with no data the result is ``λ = 0`` on a copy of ``Ω``'s first ``k`` columns."""
    cpu = torch.device("cpu")
    a, b = (kronfac.linalg.StreamingLowRank(50, 4, cpu) for _ in range(2))
    assert a.omega is b.omega and a.width == 26
    assert kronfac.linalg.StreamingLowRank(50, 4, cpu, oversample=2).omega.shape == (50, 6)
    omega = a.omega.clone()
    del a, b
    assert torch.equal(kronfac.linalg.StreamingLowRank(50, 4, cpu).omega, omega)
    for rank in (4, 60):  # k = min(rank, width)
        s = kronfac.linalg.StreamingLowRank(50, rank, cpu)
        F = s.result(1.0, DT)
        k = min(rank, s.width)
        assert torch.equal(F.U, s.omega[:, :k]) and F.U.data_ptr() != s.omega.data_ptr()
        assert torch.equal(F.eigenvalues, torch.zeros(k, dtype=DT))


def test_width_capped_at_side_is_exact():
    """Rank 8 (default width 42) on Linear(40, 30)-tanh-Linear(30, 1) with 100 data: the sketch
    of ``A`` (side 41) and ``S`` (side 30) has ``side`` columns, so it is exact, and each factor
    is the optimal rank-8 truncation of the full-rank one although the data has full rank."""
    model = mlp((40, 30, 1), seed=40)
    data = make_data(model, "mse", (50, 50), (40,), seed=41)
    kw = dict(fisher="empirical")
    full = kronfac.compute_factors(model, nn.MSELoss(), data, **kw)
    low = kronfac.compute_factors(model, nn.MSELoss(), data, rank=8, rank_threshold=20, **kw)
    for field, side in (("A", 41), ("S", 30)):
        F, ref = getattr(low["0"], field), getattr(full["0"], field)
        check_lowrank(F, side, 8, f"0.{field}")
        evals = torch.linalg.eigvalsh(ref)
        assert evals[-9] > 1e-3 * evals[-1], f"0.{field}: data rank below 9"
        assert_rel_close(dense(F), truncation(*torch.linalg.eigh(ref), 8), 1e-9, f"0.{field}")


# ----------------------------------------------------------------------------------------------
# 3. operators on mixed low-rank / dense factors

RANK, THRESHOLD = 5, 30


def op_problem():
    """Linear(40, 36)-tanh-Linear(36, 3), MSE, 24 data: layer 0 has both factors low-rank
    (A 41 / 40, S 36), layer 2 a low-rank A (37 / 36) and a dense S (3)."""
    model = mlp((40, 36, 3), seed=11)
    data = make_data(model, "mse", (10, 14), (40,), seed=12)
    return model, nn.MSELoss(), data


def blocks_dense(factors, block_of) -> Tensor:
    """Block-diagonal ``[P, P]`` in the parameter layout (modules' parameters are contiguous)."""
    return torch.block_diag(*[block_of(mod, dense(f.A), dense(f.S)) for mod, f in factors.items()])


def block_from(S_w: Tensor, A: Tensor, S_b: Tensor, joint: bool) -> Tensor:
    """``kfac_block`` with its own bias block ``S_b`` for a separate bias."""
    if joint:
        return kfac_block(S_w, A, True)
    return torch.block_diag(torch.kron(S_w, A), S_b)


@pytest.fixture(scope="module", params=["joint", "separate"])
def op_case(request):
    bias = request.param
    model, loss_fn, data = op_problem()
    kw = dict(fisher="type-2", bias=bias)
    factors = kronfac.compute_factors(
        model, loss_fn, data, rank=RANK, rank_threshold=THRESHOLD, **kw
    )
    joint = bias == "joint"
    q0, q2 = 40 + joint, 36 + joint
    check_lowrank(factors["0"].A, q0, RANK, "0.A")
    check_lowrank(factors["0"].S, 36, RANK, "0.S")
    check_lowrank(factors["2"].A, q2, RANK, "2.A")
    assert not isinstance(factors["2"].S, kronfac.LowRankFactor)
    assert factors["2"].S.shape == (3, 3)
    op = kronfac.KFAC.from_factors(factors, model)
    ref = blocks_dense(factors, lambda m, A, S: kfac_block(S, A, joint))
    assert ref.shape == (36 * 41 + 3 * 37,) * 2
    return dict(
        model=model, data=data, kw=kw, factors=factors, op=op, ref=ref, joint=joint, bias=bias
    )


def test_kfac_constructor_matches_from_factors(op_case):
    c = op_case
    K = kronfac.KFAC(
        c["model"], nn.MSELoss(), c["data"], rank=RANK, rank_threshold=THRESHOLD, **c["kw"]
    )
    assert_rel_close(K.to_dense(), c["op"].to_dense(), 1e-13, "KFAC(rank=...) vs from_factors")


def test_to_dense_and_products(op_case):
    op, ref, model = op_case["op"], op_case["ref"], op_case["model"]
    assert tuple(op.shape) == tuple(ref.shape)
    assert_rel_close(op.to_dense(), ref, 1e-11, "to_dense")
    P = ref.shape[0]
    v, V = randn(P, g=gen(13)), randn(P, 3, g=gen(14))
    out = op @ v
    assert out.shape == v.shape
    assert_rel_close(out, ref @ v, 1e-11, "op @ v")
    assert_rel_close(op @ V, ref @ V, 1e-11, "op @ V")
    params = dict(model.named_parameters())
    sizes = [p.numel() for p in params.values()]

    def unflatten(x: Tensor) -> list[Tensor]:
        return [t.reshape(p.shape) for t, p in zip(x.split(sizes), params.values(), strict=True)]

    parts, expected = unflatten(v), unflatten(ref @ v)
    out_list = op @ parts
    assert isinstance(out_list, list)
    out_dict = op @ dict(zip(params, parts, strict=True))
    assert isinstance(out_dict, dict) and list(out_dict) == list(params)
    for n, o, e in zip(params, out_list, expected, strict=True):
        assert_rel_close(o, e, 1e-11, f"list {n}")
        assert_rel_close(out_dict[n], e, 1e-11, f"dict {n}")


def test_closed_forms(op_case):
    op, ref = op_case["op"], op_case["ref"]
    assert_rel_close(op.trace(), ref.trace(), 1e-11, "trace")
    assert_rel_close(op.frobenius_norm(), torch.linalg.matrix_norm(ref), 1e-11, "frobenius")
    assert_rel_close(op.diagonal(), ref.diagonal(), 1e-11, "diagonal")


def test_logdet_det(op_case):
    op, ref = op_case["op"], op_case["ref"]
    P = ref.shape[0]
    # singular without damping: rank-5 factors
    logdet0 = op.logdet(0.0)
    assert logdet0.item() == -math.inf, f"logdet(0) = {logdet0.item()!r}, expected -inf"
    assert op.det(0.0).item() == 0.0
    evals = torch.linalg.eigvalsh(ref + DAMPING * torch.eye(P, dtype=DT))
    expected = evals.log().sum().item()
    logdet = op.logdet(DAMPING).item()
    assert math.isfinite(logdet)
    assert abs(logdet - expected) <= 1e-10 * max(1.0, abs(expected)), (
        f"logdet({DAMPING}) {logdet!r}, dense {expected!r}"
    )
    assert_rel_close(op.det(DAMPING), torch.as_tensor(logdet, dtype=DT).exp(), 1e-12, "det")
    # a damping large enough that det does not underflow
    big = 1.0  # most eigenvalues of ref + I are 1: det neither under- nor overflows
    evals = torch.linalg.eigvalsh(ref + big * torch.eye(P, dtype=DT))
    expected = evals.log().sum().item()
    assert abs(op.logdet(big).item() - expected) <= 1e-10 * max(1.0, abs(expected))
    assert_rel_close(op.det(big), torch.as_tensor(expected, dtype=DT).exp(), 1e-8, "det(1)")


@pytest.mark.parametrize("mode", ["default", "heuristic", "exact"])
def test_inverses(op_case, mode):
    c = op_case
    op, ref, joint, factors = c["op"], c["ref"], c["joint"], c["factors"]
    d = DAMPING
    min_damping = 1e-8

    def block(m, A, S):  # the factored inverses: one δ for both factors, or π-damping
        d_S, d_A = pi_damping(S, A, d, min_damping) if mode == "heuristic" else (d, d)
        return block_from(damped_inv(S, d_S), damped_inv(A, d_A), damped_inv(S, d_S), joint)

    if mode == "exact":
        expected = damped_inv(ref, d)
        inverse = op.inverse(d, exact=True)
    elif mode == "default":
        expected = blocks_dense(factors, block)
        inverse = op.inverse(d)
    else:
        expected = blocks_dense(factors, block)
        inverse = op.inverse(d, heuristic=True, min_damping=min_damping)
    assert_rel_close(inverse.to_dense(), expected, 1e-9, f"{mode} inverse to_dense")
    V = randn(ref.shape[0], 2, g=gen(15))
    assert_rel_close(inverse @ V, expected @ V, 1e-9, f"{mode} inverse @ V")
    if mode == "exact":  # (M + δI) (M + δI)⁻¹ V = V
        W = inverse @ V
        assert_rel_close(op @ W + d * W, V, 1e-9, "(M + δI)(M + δI)⁻¹ V")


@pytest.mark.parametrize("exact", [False, True])
def test_inverse_undamped_is_singular(op_case, exact):
    with pytest.raises(kronfac.NotPSDError):
        op_case["op"].inverse(0.0, exact=exact)


# ----------------------------------------------------------------------------------------------
# 4. peak memory (subprocess: ru_maxrss is a per-process high-water mark)

MEMORY_SCRIPT = textwrap.dedent(
    """
    import os, sys
    # ru_maxrss includes the high-water mark inherited at exec time: subprocess's vfork shares
    # the pytest process's memory, whose peak becomes ours. A forked child starts afresh (its
    # mark is this small interpreter's), so measure there.
    pid = os.fork()
    if pid:
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

    import json, resource, torch, kronfac
    from torch import nn

    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def peak_kib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    g = torch.Generator().manual_seed(0)
    loss = nn.MSELoss()
    # warm-up of the same code paths on a small layer (lazy library loading, allocator pools)
    warm = nn.Linear(600, 4)
    wdata = [(torch.randn(64, 600, generator=g), torch.randn(64, 4, generator=g))] * 2
    kronfac.compute_factors(warm, loss, wdata, fisher="empirical", rank=32, rank_threshold=512)
    model = nn.Linear(4096, 4)
    data = [(torch.randn(64, 4096, generator=g), torch.randn(64, 4, generator=g))
            for _ in range(4)]
    rss0, peak0 = rss_kib(), peak_kib()
    low = kronfac.compute_factors(model, loss, data, fisher="empirical", rank=32)
    peak1 = peak_kib()
    A = next(iter(low.values())).A
    kind = type(A).__name__
    shape = list(A.U.shape) if kind == "LowRankFactor" else list(A.shape)
    del low, A
    full = kronfac.compute_factors(model, loss, data, fisher="empirical")
    peak2 = peak_kib()
    full_shape = list(next(iter(full.values())).A.shape)
    print(json.dumps(dict(rss0=rss0, peak0=peak0, peak1=peak1, peak2=peak2, kind=kind,
                          shape=shape, full_shape=full_shape)), flush=True)
    os._exit(0)
    """
)


def test_peak_memory_subprocess():
    """Linear(4096, 4), rank 32 (threshold 512): the peak RSS increase during compute_factors is
    below one dense 4097 x 4097 float32 factor (64 MiB); the full-rank run, after it, exceeds it.
    """
    res = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["kind"] == "LowRankFactor" and m["shape"] == [4097, 32], m
    assert m["full_shape"] == [4097, 4097], m
    dense_kib = 4097 * 4097 * 4 / 1024
    # upper bound on the increase over the RSS at the start (the high-water mark before may be
    # above the RSS then, which would hide part of an increase measured peak-to-peak)
    low_increase = m["peak1"] - m["rss0"]
    full_increase = m["peak2"] - m["peak1"]
    report = (
        f"low-rank peak increase <= {low_increase / 1024:.1f} MiB "
        f"(peak-to-peak {(m['peak1'] - m['peak0']) / 1024:.1f} MiB), full-rank "
        f"{full_increase / 1024:.1f} MiB, one dense factor {dense_kib / 1024:.1f} MiB"
    )
    print(report)
    assert low_increase < dense_kib, report
    assert full_increase >= 0.9 * dense_kib, f"sanity contrast failed: {report}"


# ----------------------------------------------------------------------------------------------
# 5. save / load, options, unsupported combinations


def test_save_load_round_trip(op_case, tmp_path):
    factors, model, op = op_case["factors"], op_case["model"], op_case["op"]
    path = tmp_path / "factors.safetensors"
    factors.save(path)
    loaded = kronfac.KroneckerFactors.load(path)
    assert list(loaded) == list(factors)
    assert loaded.options == factors.options and loaded.num_data == factors.num_data
    for mod in factors:
        for field in ("A", "S"):
            F, G = getattr(factors[mod], field), getattr(loaded[mod], field)
            assert type(G) is type(F), f"{mod}.{field}: {type(G)} after load, {type(F)} before"
            if isinstance(F, kronfac.LowRankFactor):
                assert torch.equal(G.U, F.U), f"{mod}.{field} U"
                assert torch.equal(G.eigenvalues, F.eigenvalues), f"{mod}.{field} eigenvalues"
            else:
                assert torch.equal(G, F), f"{mod}.{field}"
    op2 = kronfac.KFAC.from_factors(loaded, model)
    assert_rel_close(op2.to_dense(), op.to_dense(), 1e-14, "operator after load")
    v = randn(op.shape[0], g=gen(16))
    assert_rel_close(op2.inverse(DAMPING) @ v, op.inverse(DAMPING) @ v, 1e-14, "inverse")


def test_to_keeps_lowrank(op_case):
    factors = op_case["factors"].to(torch.float32)
    A = factors["0"].A
    assert isinstance(A, kronfac.LowRankFactor) and A.U.dtype == torch.float32
    assert_rel_close(A.U, op_case["factors"]["0"].A.U.float(), 0.0, "U cast")


def tiny_problem():
    model = mlp((6, 4, 2), seed=17)
    return model, nn.MSELoss(), make_data(model, "mse", (3, 2), (6,), seed=18)


@pytest.mark.parametrize(
    "kw",
    [
        dict(rank=0),
        dict(rank=-2),
        dict(rank=2.5),
        dict(rank="8"),
        dict(rank=4, rank_threshold=0),
        dict(rank=4, rank_threshold=-1),
        dict(rank=4, rank_threshold=2.5),
    ],
    ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_bad_options(kw):
    model, loss_fn, data = tiny_problem()
    with pytest.raises(ValueError):
        kronfac.compute_factors(model, loss_fn, data, fisher="type-2", **kw)
    with pytest.raises(ValueError):
        kronfac.KFAC(model, loss_fn, data, fisher="type-2", **kw)


def test_small_factors_unchanged_below_threshold():
    """``rank`` given but every side below the threshold: the full-rank dense factors."""
    model, loss_fn, data = tiny_problem()
    full = kronfac.compute_factors(model, loss_fn, data, fisher="type-2")
    with pytest.warns(UserWarning, match="rank=2 applies to no factor"):
        low = kronfac.compute_factors(model, loss_fn, data, fisher="type-2", rank=2)
    check_factors(low, full, 2, 512, 0.0, "below threshold")


def ekfac_problem(n_data):
    model = mlp((40, 36, 3), seed=31)
    g = gen(32)
    X, y = randn(n_data, 40, g=g), torch.randint(0, 3, (n_data,), generator=g)
    half = n_data // 2
    return model, nn.CrossEntropyLoss(), split_batches(X, y, (half, n_data - half))


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_ekfac_with_rank_exact_when_data_rank_at_most_k(bias):
    """Gradients live in the span of the low-rank bases: EKFAC equals its full-rank self."""
    model, loss_fn, data = ekfac_problem(5)
    full = kronfac.EKFAC(model, loss_fn, data, fisher="empirical", bias=bias)
    low = kronfac.EKFAC(
        model, loss_fn, data, fisher="empirical", bias=bias, rank=8, rank_threshold=30
    )
    assert isinstance(low.factors["0"].A, kronfac.LowRankFactor)
    assert_rel_close(low.to_dense(), full.to_dense(), 1e-10, "EKFAC rank <= k")


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_ekfac_with_rank_keeps_the_trace_and_round_trips(bias, tmp_path):
    """Beyond rank k the complement carries the mean second moment outside the bases: the
    trace (total per-example second moment) is that of full-rank EKFAC, whatever the basis."""
    model, loss_fn, data = ekfac_problem(60)
    full = kronfac.EKFAC(model, loss_fn, data, fisher="empirical", bias=bias)
    low = kronfac.EKFAC(
        model, loss_fn, data, fisher="empirical", bias=bias, rank=8, rank_threshold=30
    )
    assert_rel_close(low.trace(), full.trace(), 1e-10, "trace")
    dense = low.to_dense()
    eye = torch.eye(len(dense), dtype=DT)
    v = randn(len(dense), g=gen(33))
    assert_rel_close(low.inverse(0.1) @ v, torch.linalg.solve(dense + 0.1 * eye, v), 1e-9, "inv")
    assert_rel_close(low.logdet(0.1), torch.logdet(dense + 0.1 * eye), 1e-10, "logdet")
    low.factors.save(tmp_path / "ekfac-lowrank.safetensors")
    loaded = kronfac.KroneckerFactors.load(tmp_path / "ekfac-lowrank.safetensors")
    assert_rel_close(kronfac.EKFAC.from_factors(loaded, model).to_dense(), dense, 1e-12, "file")


def grouped_problem():
    model = init(nn.Sequential(nn.Conv2d(8, 4, 3, groups=2), nn.Flatten()), seed=19)
    return model, nn.MSELoss(), make_data(model, "mse", (2, 3), (8, 5, 5), seed=20)


def test_grouped_conv_below_threshold_ok():
    model, loss_fn, data = grouped_problem()
    full = kronfac.compute_factors(model, loss_fn, data, fisher="type-2")
    with pytest.warns(UserWarning, match="rank=4 applies to no factor"):
        low = kronfac.compute_factors(
            model, loss_fn, data, fisher="type-2", rank=4, rank_threshold=64
        )
    for mod in full:
        assert torch.equal(low[mod].A, full[mod].A) and torch.equal(low[mod].S, full[mod].S)


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_conv_just_below_threshold_ok(bias):
    """Bias-free (or separate-bias) grouped conv whose largest side is 36 < threshold 37: no
    factor would be low-rank, so nothing is unsupported."""
    model = init(nn.Sequential(nn.Conv2d(8, 4, 3, groups=2, bias=bias), nn.Flatten()), seed=21)
    data = make_data(model, "mse", (2, 3), (8, 5, 5), seed=22)
    kw = dict(fisher="type-2", bias="separate")
    full = kronfac.compute_factors(model, nn.MSELoss(), data, **kw)
    assert full["0"].A.shape[-1] == 36
    with pytest.warns(UserWarning, match=r"rank_threshold=37 \(the largest is 36\)"):
        low = kronfac.compute_factors(model, nn.MSELoss(), data, rank=4, rank_threshold=37, **kw)
    assert torch.equal(low["0"].A, full["0"].A) and torch.equal(low["0"].S, full["0"].S)


# ----------------------------------------------------------------------------------------------
# 6. forward-only (S = I) and non-finite inputs on the streamed path


def test_forward_only_lowrank_operator():
    """``fisher="forward-only"``: ``S = I`` of side 30 >= threshold, ``A`` of data rank 7 < 8:
    the operator, its three damped inverses and logdet equal the full-rank ones."""
    model = mlp((40, 30, 1), seed=23)
    data = make_data(model, "mse", (3, 4), (40,), seed=24)
    kw = dict(fisher="forward-only")
    full = kronfac.KFAC(model, nn.MSELoss(), data, **kw)
    K = kronfac.KFAC(model, nn.MSELoss(), data, rank=8, rank_threshold=20, **kw)
    for mod in full.factors:
        for field in ("A", "S"):
            F, ref = getattr(K.factors[mod], field), getattr(full.factors[mod], field)
            F = F.to_dense() if isinstance(F, kronfac.LowRankFactor) else F
            assert_rel_close(F, ref, 1e-10, f"forward-only {mod}.{field}")
    assert_rel_close(K.to_dense(), full.to_dense(), 1e-10, "forward-only operator")
    assert K.logdet(0.0).item() == -math.inf  # A has rank 7 < 41
    assert abs(K.logdet(DAMPING).item() - full.logdet(DAMPING).item()) <= 1e-9 * abs(
        full.logdet(DAMPING).item()
    )
    for inv_kw in (dict(), dict(heuristic=True), dict(exact=True)):
        assert_rel_close(
            K.inverse(DAMPING, **inv_kw).to_dense(),
            full.inverse(DAMPING, **inv_kw).to_dense(),
            1e-9,
            f"forward-only inverse {inv_kw}",
        )


@pytest.mark.parametrize("fisher", ["forward-only", "type-2"])
def test_nonfinite_input_named(fisher):
    """A NaN in a low-rank layer's inputs raises NonFiniteError (as the full-rank path does),
    not a LAPACK error from the incremental SVD."""
    model = mlp((40, 30, 1), seed=25)
    data = make_data(model, "mse", (3, 4), (40,), seed=26)
    data[1][0][2, 5] = float("nan")
    with pytest.raises(kronfac.NonFiniteError):
        kronfac.compute_factors(model, nn.MSELoss(), data, fisher=fisher)
    with pytest.raises(kronfac.NonFiniteError):
        kronfac.compute_factors(model, nn.MSELoss(), data, fisher=fisher, rank=8, rank_threshold=20)
