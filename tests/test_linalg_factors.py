"""The factor protocol and the one Kronecker block against dense matrices built here.

Every reference is a dense matrix the test builds itself — a factor's ``[g, d, d]`` matrices
from its stored tensors, a block as ``torch.block_diag`` of ``torch.kron`` products — and every
inverse, spectrum and log-determinant comes from ``torch.linalg`` on it; nothing is compared
with kronfac itself.

1. Factors: every kind (dense, diagonal, low-rank, shifted low-rank, complete low-rank,
   identity), grouped and ungrouped, through every protocol method; damped inverses with one
   ``δ`` and one per group, the complete low-rank basis at ``δ = 1e-10``; ``NotPSDError``
   naming the module; :func:`as_factor` and the public :class:`LowRankFactor`.
2. Blocks: every pair of kinds (absent ``A`` included) grouped and ungrouped: products, closed
   forms, log-determinants and the three damped inverses; the plain-tensor path the optimizer
   uses; errors.
3. The operator on grouped low-rank factors.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DT,
    assert_rel_close,
    damped_inv,
    factors_like,
    gen,
    init,
    pi_damping,
    randn,
)
from torch import Tensor, nn

import kronfac
from kronfac.linalg import (
    DenseFactor,
    DiagonalFactor,
    EigenBlock,
    IdentityFactor,
    KroneckerBlock,
    LowRankFactor,
    ShiftedLowRankFactor,
    as_factor,
)

P, Q, G, RANK = 4, 5, 3, 2  # sides of S and A, groups, rank of the low-rank factors
DAMPING = 0.1
KINDS = ("dense", "diagonal", "lowrank", "shifted", "complete", "identity")
CLASSES = {
    "dense": DenseFactor,
    "diagonal": DiagonalFactor,
    "lowrank": ShiftedLowRankFactor,
    "shifted": ShiftedLowRankFactor,
    "complete": ShiftedLowRankFactor,
    "identity": IdentityFactor,
}
GROUPS = pytest.mark.parametrize("groups", [None, G], ids=["ungrouped", "grouped"])


# ----------------------------------------------------------------------------------------------
# helpers


def stored(
    kind: str, side: int, groups: int | None, seed: int, growth: float = 2.0
) -> tuple[Tensor | LowRankFactor, Tensor]:
    """A factor as ``KroneckerFactors`` stores it and its dense matrices ``[g, d, d]``.

    Without ``groups`` the stored factor has no group dimension (``g = 1``). Group ``j`` is
    scaled by ``growth^j`` (``S`` and ``A`` grow differently: π-damping differs per group).
    """
    n, g = groups or 1, gen(seed)
    scale = growth ** torch.arange(n, dtype=DT)
    eye = torch.eye(side, dtype=DT)
    if kind == "dense":
        B = randn(n, side, side, g=g)
        F = (B @ B.mT / side + 0.5 * eye) * scale[:, None, None]
        M = F
    elif kind == "diagonal":
        F = (torch.rand(n, side, generator=g, dtype=DT) + 0.5) * scale[:, None]
        M = torch.diag_embed(F)
    elif kind == "identity":  # forward-only's S: no columns, shift 1.5
        F = LowRankFactor(torch.zeros(n, side, 0, dtype=DT), torch.zeros(n, 0, dtype=DT), 1.5)
        M = 1.5 * eye.expand(n, side, side)
    else:
        k = side if kind == "complete" else RANK
        shift = 0.3 if kind == "shifted" else 0.0
        U = torch.linalg.qr(randn(n, side, k, g=g))[0]
        lam = (torch.rand(n, k, generator=g, dtype=DT) + 0.5) * scale[:, None]
        lam = lam.sort(dim=-1, descending=True).values
        F = LowRankFactor(U, lam, shift)
        M = (U * lam[:, None, :]) @ U.mT + shift * eye
    if groups is None:
        F = (
            LowRankFactor(F.U[0], F.eigenvalues[0], F.shift)
            if isinstance(F, LowRankFactor)
            else F[0]
        )
    return F, M


def factor(kind: str, side: int, groups: int | None, seed: int = 0, growth: float = 2.0):
    """``(Factor, dense [g, d, d])`` of a kind, for the module ``"mod"``."""
    F, M = stored(kind, side, groups, seed, growth)
    return as_factor(F, "mod", diagonal=kind == "diagonal"), M


def kron_blocks(MS: Tensor, MA: Tensor | None) -> Tensor:
    """``block_diag_j(S_j ⊗ A_j)``; ``block_diag_j(S_j)`` without ``A``."""
    if MA is None:
        return torch.block_diag(*MS)
    return torch.block_diag(*[torch.kron(S, A) for S, A in zip(MS, MA, strict=True)])


# ----------------------------------------------------------------------------------------------
# 1. factors


@GROUPS
@pytest.mark.parametrize("kind", KINDS)
def test_factor_products_and_closed_forms(kind, groups):
    F, M = factor(kind, Q, groups)
    n = groups or 1
    assert isinstance(F, CLASSES[kind])
    assert (F.side, F.groups, F.dtype) == (Q, n, DT)
    assert_rel_close(F.to_dense(), M, what="to_dense")
    X, Y = randn(n, 2, Q, 3, g=gen(1)), randn(n, 2, 3, Q, g=gen(2))
    assert_rel_close(F.matmul(X), M[:, None] @ X, what="F X")
    assert_rel_close(F.rmatmul(Y), Y @ M[:, None], what="X F")
    X1 = randn(1, Q, 3, g=gen(3))  # one stack broadcast over the groups
    assert_rel_close(F.matmul(X1), M @ X1, what="F X broadcast")
    assert_rel_close(F.trace(), M.diagonal(dim1=-2, dim2=-1).sum(-1), what="trace")
    assert_rel_close(F.frobenius_sq(), torch.linalg.matrix_norm(M) ** 2, what="Frobenius")
    assert_rel_close(F.diagonal(), M.diagonal(dim1=-2, dim2=-1), what="diagonal")
    evals = torch.linalg.eigvalsh(M)
    assert_rel_close(F.mean_eigenvalue(), evals.mean(-1), what="mean eigenvalue")
    assert_rel_close(F.spectrum().sort(dim=-1).values, evals, what="spectrum")
    assert F.spectrum() is F.spectrum()  # cached


@GROUPS
@pytest.mark.parametrize("kind", KINDS)
def test_factor_eigenbasis(kind, groups):
    F, M = factor(kind, Q, groups)
    basis = F.eigenbasis()
    assert basis is F.eigenbasis()  # cached
    k = basis.values.shape[-1]
    assert k == (RANK if kind in ("lowrank", "shifted") else Q)
    if kind in ("diagonal", "identity"):
        assert basis.vectors is None  # the identity basis, never a matrix
        V = torch.eye(Q, dtype=DT).expand(M.shape[0], Q, Q)
    else:
        V = basis.vectors
        assert_rel_close(V.mT @ V, torch.eye(k, dtype=DT).expand(M.shape[0], k, k), what="QᵀQ")
    complement = basis.complement[:, None, None] * (torch.eye(Q, dtype=DT) - V @ V.mT)
    rebuilt = (V * basis.values[:, None, :]) @ V.mT + complement
    assert_rel_close(rebuilt, M, what="Q diag(λ) Qᵀ + c (I − Q Qᵀ)")
    expected_c = 0.3 if kind == "shifted" else 0.0
    assert torch.equal(basis.complement, torch.full((M.shape[0],), expected_c, dtype=DT))


@GROUPS
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("per_group", [False, True], ids=["one-delta", "per-group-delta"])
def test_factor_damped_inverse(kind, groups, per_group):
    F, M = factor(kind, Q, groups)
    n = M.shape[0]
    delta = torch.linspace(0.05, 0.4, n, dtype=DT) if per_group else DAMPING
    F_inv = F.damped_inverse(delta)
    assert type(F_inv) is type(F) and F_inv.groups == n
    expected = damped_inv(M, delta)
    assert_rel_close(F_inv.to_dense(), expected, what="(F + δI)⁻¹")
    X = randn(n, 1, Q, 2, g=gen(4))
    assert_rel_close(F_inv.matmul(X), expected[:, None] @ X, what="(F + δI)⁻¹ X")


@GROUPS
def test_complete_lowrank_inverse_stays_accurate_for_tiny_damping(groups):
    """``k = d``: no ``1/δ`` terms (they would cancel to ~``ε/δ`` ≈ 1e-6 at ``δ = 1e-10``)."""
    F, M = factor("complete", Q, groups)
    F_inv = F.damped_inverse(1e-10)
    assert not bool(F_inv.shift.any())
    assert_rel_close(F_inv.to_dense(), damped_inv(M, 1e-10), what="complete low-rank at δ = 1e-10")


def singular(kind: str) -> object:
    """A stored factor of side ``Q`` whose ``F + 0·I`` is singular."""
    F, _ = stored(kind, Q, None, 5)
    if kind == "dense":
        F = F.clone()
        F[0, :] = F[:, 0] = 0.0  # a zero pivot: Cholesky fails in float64 too
    elif kind == "diagonal":
        F = F.clone()
        F[1] = 0.0
    elif kind == "complete":
        F = LowRankFactor(F.U, torch.cat([F.eigenvalues[:-1], F.eigenvalues.new_zeros(1)]))
    elif kind == "identity":
        F = LowRankFactor(F.U, F.eigenvalues, 0.0)
    return F  # "lowrank": the complement of U has eigenvalue 0


@pytest.mark.parametrize("kind", ["dense", "diagonal", "lowrank", "complete", "identity"])
def test_factor_singular_damped_inverse_names_module(kind):
    F = as_factor(singular(kind), "blocks.7.mlp", diagonal=kind == "diagonal")
    with pytest.raises(kronfac.NotPSDError, match=r"blocks\.7\.mlp"):
        F.damped_inverse(0.0)
    F.damped_inverse(1e-3)  # damping makes it invertible


@pytest.mark.parametrize("kind", ["dense", "diagonal"])
def test_factor_not_psd_names_module(kind):
    """An eigenvalue −1: ``spectrum`` refuses it, and so does ``F + 0.5·I``."""
    g = gen(6)
    evals = torch.tensor([-1.0, 1.0, 2.0, 3.0, 4.0], dtype=DT)
    Qm = torch.linalg.qr(randn(Q, Q, g=g))[0]
    stored_F = evals if kind == "diagonal" else (Qm * evals) @ Qm.T
    F = as_factor(stored_F, "head", diagonal=kind == "diagonal")
    with pytest.raises(kronfac.NotPSDError, match="head"):
        F.damped_inverse(0.5)
    with pytest.raises(kronfac.NotPSDError, match="head"):
        F.spectrum()


def test_as_factor_shapes():
    g = gen(7)
    assert isinstance(as_factor(randn(Q, Q, g=g)), DenseFactor)
    D = as_factor(randn(2, Q, g=g).abs(), diagonal=True)  # 2-D: grouped diagonal when said so
    assert isinstance(D, DiagonalFactor) and (D.groups, D.side) == (2, Q)
    assert as_factor(D) is D
    with pytest.raises(ValueError, match="dense factor of m"):
        as_factor(randn(2, Q, g=g), "m")  # not square
    with pytest.raises(ValueError, match="diagonal factor"):
        as_factor(randn(2, Q, Q, g=g), diagonal=True)
    with pytest.raises(ValueError, match="Low-rank factor of m"):
        as_factor(LowRankFactor(randn(Q, 2, g=g), randn(3, g=g)), "m")


@GROUPS
def test_public_lowrank_factor(groups):
    F, M = stored("shifted", Q, groups, 8)
    lead = () if groups is None else (groups,)
    assert F.side == Q
    dense = M if groups else M[0]
    assert_rel_close(F.to_dense(), dense, what="to_dense")
    X = randn(*lead, Q, 3, g=gen(9))
    assert_rel_close(F.matmul(X), dense @ X, what="matmul")
    expected = torch.cat([F.eigenvalues + 0.3, torch.full((*lead, Q - RANK), 0.3, dtype=DT)], -1)
    assert torch.equal(F.spectrum(), expected)
    assert F.to(torch.float32).U.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# 2. blocks

PAIRS = [
    ("dense", "dense"),
    ("lowrank", "dense"),
    ("dense", "lowrank"),
    ("lowrank", "lowrank"),
    ("dense", "diagonal"),
    ("complete", "diagonal"),
    ("dense", "shifted"),
    ("identity", "dense"),
    ("identity", "lowrank"),
    ("dense", None),
    ("lowrank", None),
    ("identity", None),
]


def block_case(s_kind: str, a_kind: str | None, groups: int | None):
    """``(block, dense S ⊗ A, MS, MA or None, MA of heuristic_A)``."""
    fS, MS = factor(s_kind, P, groups, seed=10)
    fA, MA = factor(a_kind or "dense", Q, groups, seed=11, growth=5.0)
    if a_kind is None:  # a separate bias: π from its weight's A
        return KroneckerBlock(fS, None, "mod", heuristic_A=fA), kron_blocks(MS, None), MS, None, MA
    return KroneckerBlock(fS, fA, "mod"), kron_blocks(MS, MA), MS, MA, MA


def pairs_ids(pair) -> str:
    return f"{pair[0]}x{pair[1] or 'absent'}"


@GROUPS
@pytest.mark.parametrize("pair", PAIRS, ids=pairs_ids)
def test_block_products_and_closed_forms(pair, groups):
    block, K, *_ = block_case(*pair, groups)
    rows, q = (groups or 1) * P, 1 if pair[1] is None else Q
    assert block.shape == (rows, q)
    assert_rel_close(block.to_dense(), K, what="to_dense")
    for k in (1, 3):  # one vector (the fast path without groups) and a stack
        V = randn(rows, q, k, g=gen(12 + k))
        expected = (K @ V.reshape(rows * q, k)).reshape(rows, q, k)
        assert_rel_close(block.matmat(V), expected, what=f"matmat k={k}")
    assert_rel_close(block.trace(), K.trace(), what="trace")
    assert_rel_close(block.frobenius_norm_sq(), torch.linalg.matrix_norm(K) ** 2, what="fro")
    assert_rel_close(block.diagonal(), K.diagonal().reshape(rows, q), what="diagonal")
    eye = torch.eye(K.shape[0], dtype=DT)
    assert_rel_close(block.logdet(DAMPING), torch.logdet(K + DAMPING * eye), what="logdet(δ)")
    logdet0 = block.logdet(0.0)
    if "lowrank" in pair:  # rank-deficient factors: singular
        assert logdet0.item() == -math.inf
    else:
        assert_rel_close(logdet0, torch.logdet(K), what="logdet(0)")


@GROUPS
@pytest.mark.parametrize("pair", PAIRS, ids=pairs_ids)
@pytest.mark.parametrize("mode", ["plain", "heuristic", "exact"])
def test_block_inverses(pair, groups, mode):
    block, K, MS, MA, MA_pi = block_case(*pair, groups)
    if mode == "exact":
        if "shifted" in pair:  # a partial basis whose complement is not 0: no EigenBlock
            with pytest.raises(ValueError, match="Exact damping of mod needs low-rank factors"):
                block.inverse(DAMPING, exact=True)
            return
        expected = damped_inv(K, DAMPING)
        inverse = block.inverse(DAMPING, exact=True)
        assert isinstance(inverse, EigenBlock)
    else:
        d_S = d_A = torch.full((MS.shape[0],), DAMPING, dtype=DT)
        if mode == "heuristic":
            d_S, d_A = pi_damping(MS, MA_pi, DAMPING)
            assert groups is None or not torch.allclose(d_S, d_S[:1].expand_as(d_S))
        expected = kron_blocks(damped_inv(MS, d_S), None if MA is None else damped_inv(MA, d_A))
        inverse = block.inverse(DAMPING, heuristic=mode == "heuristic")
        assert isinstance(inverse, KroneckerBlock)
        kinds = (type(block.factor_S), type(block.factor_A))
        assert (type(inverse.factor_S), type(inverse.factor_A)) == kinds
    assert_rel_close(inverse.to_dense(), expected, 1e-9, f"{mode} inverse")
    assert_rel_close(inverse.diagonal().reshape(-1), expected.diagonal(), 1e-9, "diagonal")
    assert_rel_close(inverse.trace(), expected.trace(), 1e-9, f"{mode} inverse trace")
    rows, q = inverse.shape
    V = randn(rows, q, 2, g=gen(16))
    out = inverse.matmat(V).reshape(rows * q, 2)
    assert_rel_close(out, expected @ V.reshape(rows * q, 2), 1e-9, f"{mode} inverse matmat")


@GROUPS
@pytest.mark.parametrize("a_kind", ["dense", "diagonal", None])
def test_plain_tensor_block(a_kind, groups):
    """Plain tensors as the optimizer passes them: eigenbases and factored inverses as tensors."""
    S, MS = stored("dense", P, groups, 17)
    A, MA = stored(a_kind or "dense", Q, groups, 18)
    n = MS.shape[0]
    block = (
        KroneckerBlock(S, None, "m", heuristic_A=A) if a_kind is None else KroneckerBlock(S, A, "m")
    )
    s, Q_S, a, Q_A = block.eigen()
    assert s.shape == (n, P) and Q_S.shape == (n, P, P)
    assert_rel_close((Q_S * s[:, None, :]) @ Q_S.mT, MS, what="Q_S diag(s) Q_Sᵀ")
    if a_kind == "dense":
        assert a.shape == (n, Q) and Q_A.shape == (n, Q, Q)
        assert_rel_close((Q_A * a[:, None, :]) @ Q_A.mT, MA, what="Q_A diag(a) Q_Aᵀ")
    else:
        assert Q_A is None
        expected_a = torch.ones(n, 1, dtype=DT) if a_kind is None else MA.diagonal(dim1=-2, dim2=-1)
        assert torch.equal(a, expected_a)
    inverse = block.inverse(DAMPING, heuristic=True)
    d_S, d_A = pi_damping(MS, MA, DAMPING)
    assert isinstance(inverse.S, Tensor) and inverse.S.shape == (n, P, P)
    assert_rel_close(inverse.S, damped_inv(MS, d_S), what="inverse.S")
    MA_inv = None if a_kind is None else damped_inv(MA, d_A)
    if a_kind is None:
        assert inverse.A is None
    elif a_kind == "diagonal":
        assert inverse.A.shape == (n, Q)
        assert_rel_close(inverse.A, MA_inv.diagonal(dim1=-2, dim2=-1), what="inverse.A")
    else:
        assert_rel_close(inverse.A, MA_inv, what="inverse.A")
    again = KroneckerBlock(inverse.S, inverse.A, "m")  # [g, ...] tensors, as the optimizer does
    rows, q = block.shape
    V = randn(rows, q, 1, g=gen(19))
    expected = kron_blocks(damped_inv(MS, d_S), MA_inv) @ V.reshape(-1)
    assert_rel_close(again.matmat(V).reshape(-1), expected, what="block of .S / .A")


def test_damping_split_falls_back_to_plain():
    S, _ = stored("dense", P, G, 20)
    zero_A = torch.zeros(G, Q, Q, dtype=DT)  # mean eigenvalue 0: π undefined
    for block in (KroneckerBlock(S, zero_A, "m"), KroneckerBlock(S, None, "m")):
        d_S, d_A = block.damping_split(DAMPING, True, 1e-8)
        assert torch.equal(d_S, torch.full((G,), DAMPING, dtype=DT)) and torch.equal(d_S, d_A)


@pytest.mark.parametrize("exact", [False, True])
def test_block_singular_inverse_names_module(exact):
    S, _ = stored("dense", P, None, 21)
    block = KroneckerBlock(S, singular("dense"), "encoder.fc2")
    with pytest.raises(kronfac.NotPSDError, match=r"encoder\.fc2"):
        block.inverse(0.0, exact=exact)


def test_block_errors():
    S, _ = stored("dense", P, G, 22)
    A, _ = stored("dense", Q, 2, 23)
    with pytest.raises(ValueError, match="3 and 2 groups"):
        KroneckerBlock(S, A, "m")
    bad = torch.diag_embed(torch.tensor([-1.0, 1.0, 2.0, 3.0], dtype=DT))
    with pytest.raises(kronfac.NotPSDError, match="m"):
        KroneckerBlock(bad, None, "m").logdet(1.0)


# ----------------------------------------------------------------------------------------------
# 3. the operator on grouped low-rank factors


def test_operator_with_grouped_lowrank_factors():
    """A bias-free grouped conv (weight ``[g·p, q]`` row-major = its flattening) whose factors are
    replaced by grouped :class:`LowRankFactor` s: the top 5 of ``A`` (side 18), all of ``S``."""
    model = init(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.Flatten()), seed=24)
    g = gen(25)
    X = randn(6, 4, 5, 5, g=g)
    data = [(X, randn(6, 54, g=g))]
    full = kronfac.compute_factors(model, nn.MSELoss(), data, fisher="type-2")
    A, S = full["0"]
    assert A.shape == (2, 18, 18) and S.shape == (2, 3, 3)

    def top(M: Tensor, k: int) -> LowRankFactor:
        evals, evecs = torch.linalg.eigh(M)
        return LowRankFactor(evecs[..., -k:].flip(-1), evals[..., -k:].flip(-1))

    lowA, lowS = top(A, 5), top(S, 3)
    factors = factors_like(full, {"0": (lowA, lowS)})
    K = kronfac.KFAC.from_factors(factors, model)
    dense_A = (lowA.U * lowA.eigenvalues[:, None, :]) @ lowA.U.mT
    dense_S = (lowS.U * lowS.eigenvalues[:, None, :]) @ lowS.U.mT
    ref = kron_blocks(dense_S, dense_A)
    eye = torch.eye(ref.shape[0], dtype=DT)
    assert_rel_close(K.to_dense(), ref, what="operator")
    assert_rel_close(K.logdet(DAMPING), torch.logdet(ref + DAMPING * eye), what="logdet")
    exact = damped_inv(ref, DAMPING)
    assert_rel_close(K.inverse(DAMPING, exact=True).to_dense(), exact, 1e-9, "exact inverse")
    expected = kron_blocks(damped_inv(dense_S, DAMPING), damped_inv(dense_A, DAMPING))
    assert_rel_close(K.inverse(DAMPING).to_dense(), expected, 1e-9, "default inverse")
    wrong = factors_like(full, {"0": (top(A[:1], 5), lowS)})
    with pytest.raises(ValueError, match=r"A\(1, 18, 18\)"):
        kronfac.KFAC.from_factors(wrong, model)


def test_eigen_block_keeps_small_exact_eigenvalues_in_float32():
    """``Λ``'s entries are products / sums, not one ``[p·q]`` decomposition's eigenvalues.

    A tolerance of ``10·p·q·ε·max`` (4160 entries: 5e-3 of the largest in float32) would zero
    eigenvalues that are exact, and the damped inverse would be wrong by orders of magnitude.
    """
    s = torch.logspace(0, -3, 64)
    a = torch.logspace(0, -1, 65)
    block = EigenBlock(None, None, torch.outer(s, a), name="fc")
    lam = block.spectrum()
    assert torch.equal(lam, torch.outer(s, a).reshape(-1))
    inv = block.inverse(1e-6).matmat(torch.ones(64, 65, 1))  # [p, q, k]
    assert_rel_close(inv[..., 0], 1 / (torch.outer(s, a) + 1e-6), 1e-6, "inverse")
    with pytest.raises(kronfac.NotPSDError, match="fc"):
        EigenBlock(None, None, -torch.outer(s, a), name="fc").spectrum()
    tiny = torch.outer(s, a)
    tiny[0, 1] = -1e-7  # round-off below zero becomes 0
    assert EigenBlock(None, None, tiny, name="fc").spectrum()[1] == 0
