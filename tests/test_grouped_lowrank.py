"""Low-rank factors of grouped convolutions: one sketch per group, exact where the data's rank fits.

A grouped convolution's block is block-diagonal with one ``S_j ⊗ A_j`` per group. With
``rank=k`` a side of at least ``rank_threshold`` keeps, per group, the top ``k`` eigen-pairs
of a one-pass sketch. When each group's data has rank at most ``k`` the sketch is exact, so
the factors, the operators (products, damped inverses), EKFAC and the factor file must equal
the full-rank ones; beyond it, EKFAC's complement keeps the total second moment (its trace).
"""

from __future__ import annotations

import pytest
import torch
from helpers import DT, assert_rel_close, gen, init, randn
from torch import nn

import kronfac
from kronfac.optim import KFACPreconditioner

TOL = 1e-9  # float64; the sketch's Cholesky / SVD in float64 leave ~1e-12 relative


def grouped_model(bias: bool = True) -> nn.Module:
    """Conv2d(8 → 6, 3x3, groups=2): per group A of side 4·9 (+1), S of side 3."""
    return init(nn.Sequential(nn.Conv2d(8, 6, 3, groups=2, bias=bias), nn.Flatten()), seed=31)


def grouped_data(n: int, size: int = 5, seed: int = 32):
    """``n`` images ``[8, size, size]``: ``(size − 2)²`` positions each, MSE targets."""
    g = gen(seed)
    X = randn(n, 8, size, size, g=g)
    return [(X, randn(n, 6 * (size - 2) ** 2, g=g))]


OPTIONS = {"fisher": "type-2", "rank_threshold": 20}


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_factors_equal_full_rank_when_the_data_rank_fits(bias):
    """One image, 9 positions: every group's A has rank <= 9 < k = 10 (exact sketch)."""
    model, data = grouped_model(), grouped_data(1)
    full = kronfac.compute_factors(model, nn.MSELoss(), data, bias=bias, **OPTIONS)
    low = kronfac.compute_factors(model, nn.MSELoss(), data, bias=bias, rank=10, **OPTIONS)
    A = low["0"].A
    assert isinstance(A, kronfac.LowRankFactor) and A.U.shape == (
        2,
        37 if bias == "joint" else 36,
        10,
    )
    assert_rel_close(A.to_dense(), full["0"].A, TOL, "A per group")
    assert torch.equal(low["0"].S, full["0"].S)  # side 3: dense


def test_truncation_keeps_each_groups_top_eigenpairs():
    """More data than the rank: each group's factor is its own optimal rank-k truncation."""
    model, data = grouped_model(), grouped_data(3, size=7)
    full = kronfac.compute_factors(model, nn.MSELoss(), data, **OPTIONS)
    low = kronfac.compute_factors(model, nn.MSELoss(), data, rank=3, **OPTIONS)
    for j in range(2):
        lam, Q = torch.linalg.eigh(full["0"].A[j])
        best = (Q[:, -3:] * lam[-3:]) @ Q[:, -3:].T
        # the sketch has 3·3 + 10 = 19 columns: near-optimal, not exact
        err = torch.linalg.matrix_norm(low["0"].A.to_dense()[j] - full["0"].A[j])
        optimal = torch.linalg.matrix_norm(best - full["0"].A[j])
        assert optimal <= err <= 1.10 * optimal, (j, float(err), float(optimal))


def test_operators_of_grouped_low_rank_factors():
    model, data = grouped_model(), grouped_data(1)
    full = kronfac.KFAC(model, nn.MSELoss(), data, **OPTIONS)
    low = kronfac.KFAC(model, nn.MSELoss(), data, rank=10, **OPTIONS)
    assert_rel_close(low.to_dense(), full.to_dense(), TOL, "K")
    v = randn(low.shape[0], 3, g=gen(33))
    for kw in ({"heuristic": True}, {"exact": True}):
        assert_rel_close(low.inverse(0.1, **kw) @ v, full.inverse(0.1, **kw) @ v, TOL, str(kw))
    assert_rel_close(low.logdet(0.1), full.logdet(0.1), TOL, "logdet")


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_ekfac_with_grouped_low_rank_factors(bias, tmp_path):
    model, loss = grouped_model(), nn.MSELoss()
    exact_data, more_data = grouped_data(1), grouped_data(3, size=7)
    options = {**OPTIONS, "bias": bias}
    full = kronfac.EKFAC(model, loss, exact_data, **options)
    low = kronfac.EKFAC(model, loss, exact_data, rank=10, **options)
    assert_rel_close(low.to_dense(), full.to_dense(), TOL, "EKFAC, exact sketch")
    # beyond the rank, the complement carries the second moment outside the partial bases
    full = kronfac.EKFAC(model, loss, more_data, **options)
    low = kronfac.EKFAC(model, loss, more_data, rank=3, **options)
    assert_rel_close(low.trace(), full.trace(), TOL, "EKFAC trace")
    low.factors.save(tmp_path / "grouped.safetensors")
    loaded = kronfac.KroneckerFactors.load(tmp_path / "grouped.safetensors")
    assert_rel_close(
        kronfac.EKFAC.from_factors(loaded, model).to_dense(), low.to_dense(), 1e-12, "file"
    )


def test_optimizer_with_grouped_low_rank_factors():
    model, loss_fn = grouped_model(), nn.MSELoss()
    ((X, y),) = grouped_data(2, size=6)
    precond = KFACPreconditioner(
        model, loss_fn=loss_fn, fisher="mc", factor_decay=0.0, rank=4, rank_threshold=20
    )
    loss_fn(model(X), y).backward()
    assert precond.step() is True
    ours = precond.factors()["0"].A
    ref = kronfac.compute_factors(
        model, loss_fn, [(X, y)], fisher="mc", seed=0, rank=4, rank_threshold=20
    )["0"].A
    assert isinstance(ours, kronfac.LowRankFactor)
    assert_rel_close(ours.to_dense(), ref.to_dense(), 1e-10, "A")
    assert ours.U.dtype == DT
