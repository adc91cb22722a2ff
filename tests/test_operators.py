"""Operator tests: kronfac's KFAC / EKFAC (and their inverses) against dense matrices.

Every dense reference here is built *in the test*, from the factors (``torch.kron`` blocks,
or the EKFAC eigenbases and corrected eigenvalues) placed into the parameter layout by
:func:`assemble` — never through the library's ``to_dense`` — or from ``tests/reference.py``'s
exact GGN / empirical Fisher (``torch.func``).

1. :class:`OperatorChecks` — one shared mixin: a subclass's ``make()`` returns
   ``(operator, dense_reference)``, and every operation of the operator surface (``@`` on flat /
   list / tuple / dict vectors, ``to_dense``, the damped inverse, ``trace``, ``frobenius_norm``,
   ``diagonal``, ``logdet``, ``det``, ``to_scipy``) is checked against the dense matrix with a
   per-operation tolerance. Subclasses: KFAC, KFAC inverses (default / heuristic / exact),
   EKFAC, EKFAC inverses; each parametrized over a few small float64 cases (``CASES``).
2. EKFAC against exact references: exact where K-FAC is exact, closer than K-FAC to the GGN
   block-diagonal otherwise, and its eigenvalues equal to the defining formula (from the dense
   GGN for ``T = 1``, from per-example gradients for sequences, expand and reduce).
3. Singular operators: ``logdet = -inf`` (not NaN), ``det = exp(logdet)``.
4. Bad input.
5. Save / load of EKFAC's corrections.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
import pytest
import reference as ref
import torch
from helpers import (
    DT,
    PerPosition,
    assert_rel_close,
    damped_inv,
    gen,
    init,
    make_data,
    make_loss,
    mlp,
    pi_damping,
    randn,
)
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import kronfac

DAMPING = 1e-2
SINGULAR = 1e-9  # dense reference singular when λ_min <= SINGULAR · λ_max


# ----------------------------------------------------------------------------------------------
# helpers: models, data, comparisons


class Reordered(nn.Module):
    """Parameters registered in another order than the layers run; ``extra`` left uncovered."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.head = nn.Linear(5, 3)
        self.body = nn.Linear(4, 5)
        self.extra = nn.Linear(3, 3, bias=False)
        init(self, seed)

    def forward(self, x: Tensor) -> Tensor:
        return self.extra(self.head(torch.tanh(self.body(x))))


def rel_fro(M: Tensor, ref_M: Tensor) -> float:
    return (torch.linalg.norm(M - ref_M) / torch.linalg.norm(ref_M)).item()


# ----------------------------------------------------------------------------------------------
# helpers: the parameter layout, written independently of the library


def layout(model: nn.Module, modules) -> tuple[dict[str, slice], list[str]]:
    """Slices of the covered parameters (``named_parameters()`` order) and their names.

    Covered: the weight and bias of every module in ``modules`` (all ``nn.Linear``).
    """
    mods = dict(model.named_modules())
    covered = set()
    for m in modules:
        covered.add(f"{m}.weight")
        if mods[m].bias is not None:
            covered.add(f"{m}.bias")
    slices, start, names = {}, 0, []
    for n, p in model.named_parameters():
        if n in covered:
            slices[n] = slice(start, start + p.numel())
            names.append(n)
            start += p.numel()
    assert len(names) == len(covered)
    return slices, names


def block_indices(model: nn.Module, module: str, slices, joint: bool):
    """Flat parameter indices of a module's block(s), in the block's own (row-major) order.

    ``joint``: the block acts on ``[W | b]`` flattened row-major — entry ``(i, j)`` is
    ``W[i, j]`` for ``j < d_in`` and ``b[i]`` for ``j = d_in``, so weight rows and bias entries
    interleave. Separate (or no bias): ``(W indices, b indices or None)``.
    """
    lin = dict(model.named_modules())[module]
    p, q = lin.out_features, lin.in_features
    w0 = slices[f"{module}.weight"].start
    b0 = slices[f"{module}.bias"].start if lin.bias is not None else None
    if joint and b0 is not None:
        idx = [w0 + i * q + j if j < q else b0 + i for i in range(p) for j in range(q + 1)]
        return torch.tensor(idx), None
    w_idx = torch.arange(w0, w0 + p * q)
    return w_idx, None if b0 is None else torch.arange(b0, b0 + p)


def assemble(model: nn.Module, factors, block_of) -> Tensor:
    """The dense ``[P, P]`` operator from per-module blocks placed in the parameter layout.

    ``block_of(module)`` returns ``(M, M_bias)``: ``M`` acting on ``[W | b]`` (joint) or ``W``
    (row-major), ``M_bias`` on ``b`` (separate bias) or ``None``.
    """
    slices, _ = layout(model, list(factors))
    P = sum(s.stop - s.start for s in slices.values())
    joint = factors.options["bias"] == "joint"
    dense = torch.zeros(P, P, dtype=DT)
    for mod in factors:
        idx, b_idx = block_indices(model, mod, slices, joint)
        M, M_bias = block_of(mod)
        dense[idx[:, None], idx[None, :]] = M
        if b_idx is not None:
            dense[b_idx[:, None], b_idx[None, :]] = M_bias
    return dense


def kfac_blocks(factors, damp=None):
    """``block_of`` for ``S ⊗ A`` (and ``S`` for a separate bias); ``damp(mod, A, S)`` returns
    the factored damped-inverse pair instead when given."""

    def block_of(mod):
        A, S = factors[mod].A, factors[mod].S
        if damp is None:
            return torch.kron(S, A), S
        (A_inv, S_inv), S_bias_inv = damp(A, S)
        return torch.kron(S_inv, A_inv), S_bias_inv

    return block_of


def ekfac_blocks(factors):
    """``block_of`` from the corrections: ``(Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ``."""

    def block_of(mod):
        Q_A, Q_S, lam, bias_lam = factors.corrections[mod][:4]
        Q = torch.kron(Q_S, Q_A)
        M = Q @ torch.diag(lam.reshape(-1)) @ Q.T
        return M, None if bias_lam is None else Q_S @ torch.diag(bias_lam) @ Q_S.T

    return block_of


# ----------------------------------------------------------------------------------------------
# small float64 problems


def problem(kind: str, loss: str, reduction: str = "mean", seed: int = 0):
    """``(model, loss_fn, data)``; P <= ~60."""
    if kind == "reordered":
        model = Reordered(seed=seed)
    else:
        act = {"tanh": "tanh", "relu": "relu", "linear": None}[kind]
        model = mlp((4, 6, 3) if kind == "relu" else (4, 5, 3), act, seed=seed)
    data = make_data(model, loss, (3, 5, 4), (4,), seed=seed + 100)
    return model, make_loss(loss, reduction), data


# ----------------------------------------------------------------------------------------------
# 1. the shared operator checks


def pytest_generate_tests(metafunc):
    """Parametrize the class-scoped ``case`` fixture over the class's ``CASES``."""
    cls = metafunc.cls
    if cls is not None and "case" in metafunc.fixturenames and getattr(cls, "CASES", None):
        ids = list(cls.CASES)
        metafunc.parametrize("case", ids, indirect=True, scope="class", ids=ids)


@pytest.fixture(scope="class")
def case(request):
    """One operator case of the requesting ``OperatorChecks`` subclass, built once per class."""
    checks = request.cls()
    op, dense, model, names = checks.make(**checks.CASES[request.param])
    assert dense.abs().max() > 0
    torch.testing.assert_close(dense, dense.T, rtol=0, atol=1e-13 * dense.abs().max())
    return op, dense, model, names


class OperatorChecks:
    """Checks every operation of an operator against a dense reference (float64).

    Subclasses set ``CASES`` (id → keyword arguments of :meth:`make`) and implement ``make``,
    returning ``(operator, dense_reference, model, covered parameter names)``.
    """

    CASES: ClassVar[dict[str, dict[str, Any]]] = {}
    TOL: ClassVar[dict[str, float]] = {
        "dense": 1e-11,
        "matvec": 1e-11,
        "inverse": 1e-9,
        "trace": 1e-11,
        "frobenius": 1e-11,
        "diagonal": 1e-11,
        "logdet": 1e-10,  # relative to max(1, |logdet|)
        "det": 1e-9,
        "scipy": 1e-11,
    }

    def make(self, **kw):
        raise NotImplementedError

    def tol(self, what: str) -> float:
        return self.TOL[what]

    # -- layout ----------------------------------------------------------------------------
    def test_shape_and_names(self, case):
        op, dense, _, names = case
        assert tuple(op.shape) == tuple(dense.shape)
        assert list(op.param_names) == names

    def test_to_dense(self, case):
        op, dense, _, _ = case
        assert_rel_close(op.to_dense(), dense, self.tol("dense"), "to_dense")

    # -- products ----------------------------------------------------------------------------
    @pytest.mark.parametrize("k", [None, 1, 3])
    def test_matvec_flat(self, case, k):
        op, dense, _, _ = case
        P = dense.shape[0]
        v = randn(P, g=gen(1)) if k is None else randn(P, k, g=gen(1))
        out = op @ v
        assert isinstance(out, Tensor) and out.shape == v.shape and out.dtype == v.dtype
        assert_rel_close(out, dense @ v, self.tol("matvec"), f"op @ v{tuple(v.shape)}")

    @pytest.mark.parametrize("kind", [list, tuple, dict])
    def test_matvec_structured(self, case, kind):
        op, dense, model, names = case
        params = dict(model.named_parameters())
        g = gen(2)
        parts = [randn(*params[n].shape, g=g) for n in names]
        flat = torch.cat([t.reshape(-1) for t in parts])
        expected = (dense @ flat).split([t.numel() for t in parts])
        v = dict(zip(names, parts, strict=True)) if kind is dict else kind(parts)
        out = op @ v
        assert type(out) is kind
        if kind is dict:
            assert list(out) == names
            out = [out[n] for n in names]
        assert len(out) == len(names)
        for n, o, e, t in zip(names, out, expected, parts, strict=True):
            assert o.shape == t.shape, n
            assert_rel_close(o.reshape(-1), e, self.tol("matvec"), f"{kind.__name__} {n}")

    # -- closed forms --------------------------------------------------------------------------
    def test_trace(self, case):
        op, dense, _, _ = case
        assert_rel_close(op.trace(), dense.trace(), self.tol("trace"), "trace")

    def test_frobenius_norm(self, case):
        op, dense, _, _ = case
        expected = torch.linalg.matrix_norm(dense)
        assert_rel_close(op.frobenius_norm(), expected, self.tol("frobenius"), "frobenius")

    def test_diagonal(self, case):
        op, dense, _, _ = case
        out = op.diagonal()
        assert out.shape == (dense.shape[0],)
        assert_rel_close(out, dense.diagonal(), self.tol("diagonal"), "diagonal")

    @pytest.mark.parametrize("damping", [0.0, DAMPING])
    def test_logdet_det(self, case, damping):
        op, dense, _, _ = case
        evals = torch.linalg.eigvalsh(dense + damping * torch.eye(dense.shape[0], dtype=DT))
        logdet, det = op.logdet(damping), op.det(damping)
        assert not torch.isnan(logdet), "logdet is NaN"
        if evals.min() <= SINGULAR * evals.abs().max():
            assert logdet.item() == -math.inf, (
                f"singular reference (λ_min {evals.min():.3e}, λ_max {evals.max():.3e}): "
                f"logdet {logdet.item()!r}, expected -inf"
            )
            assert det.item() == 0.0
            return
        expected = evals.log().sum()
        sign, torch_logdet = torch.linalg.slogdet(dense + damping * torch.eye(len(dense), dtype=DT))
        assert sign.item() == 1.0
        assert_rel_close(torch_logdet, expected, 1e-10, "reference self-check")
        err = abs(logdet.item() - expected.item())
        assert err <= self.tol("logdet") * max(1.0, abs(expected.item())), (
            f"logdet({damping}) {logdet.item():.15g}, dense {expected.item():.15g}"
        )
        assert_rel_close(det, logdet.exp(), 1e-12, "det = exp(logdet)")
        torch_det = torch.linalg.det(dense + damping * torch.eye(len(dense), dtype=DT))
        if torch_det.abs() > 1e-290:
            assert_rel_close(det, torch_det, self.tol("det"), f"det({damping}) vs torch")

    def test_to_scipy(self, case):
        op, dense, _, _ = case
        L = op.to_scipy()
        P = dense.shape[0]
        assert tuple(L.shape) == (P, P)
        D = dense.numpy()
        x = randn(P, g=gen(4)).numpy()
        X = randn(P, 3, g=gen(5)).numpy()
        y = np.asarray(L.matvec(x)).reshape(-1)
        assert_rel_close(torch.from_numpy(y), torch.from_numpy(D @ x), self.tol("scipy"), "matvec")
        Y = np.asarray(L.matmat(X))
        assert_rel_close(torch.from_numpy(Y), torch.from_numpy(D @ X), self.tol("scipy"), "matmat")
        Y2 = np.asarray(L @ X)
        assert_rel_close(torch.from_numpy(Y2), torch.from_numpy(D @ X), self.tol("scipy"), "L @ X")


class InvertibleChecks(OperatorChecks):
    """Also checks the operator's exactly damped inverse against ``(dense + δI)⁻¹``."""

    def exact_inverse(self, op, damping: float):
        raise NotImplementedError

    # -- inverse -----------------------------------------------------------------------------
    def test_exact_inverse(self, case):
        op, dense, _, _ = case
        inverse = self.exact_inverse(op, DAMPING)
        expected = damped_inv(dense, DAMPING)
        assert_rel_close(inverse.to_dense(), expected, self.tol("inverse"), "inverse dense")
        v = randn(dense.shape[0], 2, g=gen(3))
        assert_rel_close(inverse @ v, expected @ v, self.tol("inverse"), "inverse @ v")
        # and it is the inverse: (M + δI) M⁻¹ v = v
        damped = op @ (inverse @ v) + DAMPING * (inverse @ v)
        assert_rel_close(damped, v, self.tol("inverse"), "(M + δI)(M + δI)⁻¹ v")


def _kfac(kind, loss, bias, fisher="type-2", reduction="mean", modules=None, **kw):
    model, loss_fn, data = problem(kind, loss, reduction)
    K = kronfac.KFAC(model, loss_fn, data, fisher=fisher, bias=bias, modules=modules, **kw)
    return model, K


class TestKFAC(InvertibleChecks):
    CASES: ClassVar = {
        "tanh-ce-joint": dict(kind="tanh", loss="ce", bias="joint"),
        "tanh-ce-separate": dict(kind="tanh", loss="ce", bias="separate"),
        "relu-mse-joint": dict(kind="relu", loss="mse", bias="joint"),
        "relu-mse-separate-empirical": dict(
            kind="relu", loss="mse", bias="separate", fisher="empirical"
        ),
        "tanh-mse-sum-mc": dict(
            kind="tanh", loss="mse", bias="joint", fisher="mc", mc_samples=2, reduction="sum"
        ),
        "reordered-subset": dict(
            kind="reordered", loss="ce", bias="separate", modules=["body", "head"]
        ),
    }

    def make(self, **kw):
        model, K = _kfac(**kw)
        f = K.factors
        dense = assemble(model, f, kfac_blocks(f))
        return K, dense, model, layout(model, list(f))[1]

    def exact_inverse(self, op, damping):
        return op.inverse(damping, exact=True)


class TestKFACInverse(OperatorChecks):
    """``K.inverse(δ, ...)``'s full surface against the inverse built in the test."""

    CASES: ClassVar = {
        f"{mode}-{bias}-{loss}": dict(mode=mode, bias=bias, loss=loss)
        for mode in ("default", "heuristic", "exact")
        for bias in ("joint", "separate")
        for loss in ("ce", "mse")
    } | {
        # min_damping above π√δ or √δ/π for some block: the clamp is active
        "heuristic-min-damping": dict(
            mode="heuristic", bias="separate", loss="mse", min_damping=0.05
        ),
        # δ = 0: min_damping on both factors
        "heuristic-zero-damping": dict(
            mode="heuristic", bias="joint", loss="mse", damping=0.0, min_damping=1e-3
        ),
    }
    TOL: ClassVar = OperatorChecks.TOL | {
        k: 1e-9 for k in ("dense", "matvec", "trace", "frobenius", "diagonal", "scipy")
    }

    def make(self, mode, bias, loss, damping=DAMPING, min_damping=1e-8):
        model, K = _kfac("relu" if loss == "mse" else "tanh", loss, bias)
        f = K.factors
        if mode == "exact":
            op = K.inverse(damping, exact=True)

            def block_of(mod):
                A, S = f[mod].A, f[mod].S
                return damped_inv(torch.kron(S, A), damping), damped_inv(S, damping)

            return op, assemble(model, f, block_of), model, layout(model, list(f))[1]

        clamped = []

        def damp(A, S):
            if mode == "heuristic":
                d_S, d_A = pi_damping(S, A, damping, min_damping)
                clamped.append(min_damping in (d_S.item(), d_A.item()))
            else:
                d_A = d_S = damping
            pair = (damped_inv(A, d_A), damped_inv(S, d_S))
            if bias == "joint":
                return pair, None
            return pair, pair[1]  # the separate bias block: the weight's (S + δ_S I)⁻¹

        op = K.inverse(damping, heuristic=mode == "heuristic", min_damping=min_damping)
        dense = assemble(model, f, kfac_blocks(f, damp))
        if min_damping > 1e-8:
            assert any(clamped), "the case does not exercise min_damping"
        return op, dense, model, layout(model, list(f))[1]


def _ekfac(kind, loss, bias, fisher="type-2", reduction="mean", **kw):
    model, loss_fn, data = problem(kind, loss, reduction)
    return model, kronfac.EKFAC(model, loss_fn, data, fisher=fisher, bias=bias, **kw)


class TestEKFAC(InvertibleChecks):
    CASES: ClassVar = {
        "tanh-mse-joint": dict(kind="tanh", loss="mse", bias="joint"),
        "relu-mse-separate": dict(kind="relu", loss="mse", bias="separate", fisher="empirical"),
        "tanh-ce-separate-mc": dict(
            kind="tanh", loss="ce", bias="separate", fisher="mc", mc_samples=3
        ),
        "reordered-subset": dict(
            kind="reordered", loss="mse", bias="joint", modules=["head", "body"]
        ),
    }

    def make(self, **kw):
        model, E = _ekfac(**kw)
        f = E.factors
        assert f.corrections is not None and set(f.corrections) == set(f)
        for mod in f:
            corr = f.corrections[mod]
            assert isinstance(corr, kronfac.EigenCorrection)
            assert (corr.bias_eigenvalues is not None) == (kw["bias"] == "separate")
        return E, assemble(model, f, ekfac_blocks(f)), model, layout(model, list(f))[1]

    def exact_inverse(self, op, damping):
        return op.inverse(damping)


class TestEKFACInverse(OperatorChecks):
    CASES: ClassVar = {
        "tanh-mse-joint": dict(kind="tanh", loss="mse", bias="joint"),
        "relu-ce-separate": dict(kind="relu", loss="ce", bias="separate"),
    }
    TOL: ClassVar = OperatorChecks.TOL | {
        k: 1e-9 for k in ("dense", "matvec", "trace", "frobenius", "diagonal", "scipy")
    }

    def make(self, **kw):
        model, E = _ekfac(**kw)
        f = E.factors
        dense = damped_inv(assemble(model, f, ekfac_blocks(f)), DAMPING)
        return E.inverse(DAMPING), dense, model, layout(model, list(f))[1]


# ----------------------------------------------------------------------------------------------
# 2. EKFAC against exact references


def ggn_blockdiag(model, loss_fn, data, fisher, factors) -> Tensor:
    """The exact GGN (type-2) / empirical Fisher, restricted to the operator's blocks."""
    dense_fn = ref.ggn if fisher == "type-2" else ref.empirical_fisher
    G = dense_fn(model, loss_fn, data)
    mask = assemble(model, factors, lambda mod: (1.0, 1.0)).bool()
    return torch.where(mask, G, torch.zeros_like(G))


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize(
    ("kind", "loss", "reduction", "batches"),
    [
        ("deep-linear", "mse", "mean", (3, 5, 2)),
        ("deep-linear", "mse", "sum", (3, 5, 2)),
        ("tanh", "ce", "mean", (1,)),
        ("relu", "mse", "sum", (1,)),
    ],
)
def test_ekfac_exact_where_kfac_is(kind, loss, reduction, batches, bias):
    """Deep linear + MSE (several data) and one datum: EKFAC = K-FAC = exact block-diagonal."""
    if kind == "deep-linear":
        model = mlp((4, 5, 3, 2), None, seed=11)
    else:
        model = mlp((4, 5, 3), kind, seed=11)
    data = make_data(model, loss, batches, (4,), seed=12)
    loss_fn = make_loss(loss, reduction)
    E = kronfac.EKFAC(model, loss_fn, data, fisher="type-2", bias=bias)
    expected = ggn_blockdiag(model, loss_fn, data, "type-2", E.factors)
    assert expected.abs().max() > 1e-6
    assert_rel_close(E.to_dense(), expected, 1e-10, f"EKFAC {kind} {loss} {reduction} {bias}")
    K = kronfac.KFAC(model, loss_fn, data, fisher="type-2", bias=bias)
    assert_rel_close(K.to_dense(), expected, 1e-10, "K-FAC (sanity: exact here)")


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_ekfac_closer_than_kfac(bias):
    """ReLU MLP, CE, several data: EKFAC is the Frobenius-optimal diagonal in K-FAC's basis."""
    model = mlp((4, 6, 5, 3), "relu", seed=13)
    loss_fn = make_loss("ce")
    data = make_data(model, "ce", (4, 6, 5), (4,), seed=14)
    K = kronfac.KFAC(model, loss_fn, data, fisher="type-2", bias=bias)
    E = kronfac.EKFAC(model, loss_fn, data, fisher="type-2", bias=bias)
    G = ggn_blockdiag(model, loss_fn, data, "type-2", K.factors)
    d_K, d_E = rel_fro(K.to_dense(), G), rel_fro(E.to_dense(), G)
    msg = f"relative Frobenius distance to the GGN block-diagonal: EKFAC {d_E:.6e}, K-FAC {d_K:.6e}"
    print(msg)
    assert d_K > 1e-3, "K-FAC is (nearly) exact here: not a meaningful comparison. " + msg
    assert d_E < d_K, msg
    # the K-FAC blocks are diagonal in the same basis, so the improvement is Pythagorean:
    # ‖K - G‖² = ‖E - G‖² + ‖K - E‖²  (per block, hence overall)
    nG = torch.linalg.norm(G)
    pyth = (torch.linalg.norm(E.to_dense() - K.to_dense()) / nG).item() ** 2 + d_E**2
    assert abs(pyth - d_K**2) <= 1e-10 * d_K**2, f"{pyth:.12e} vs {d_K**2:.12e}; {msg}"


def _check_bases(E, K_factors, tol=1e-10):
    """The corrections' Q_A, Q_S are orthonormal eigenvectors of K-FAC's A and S."""
    for mod, (A, S) in K_factors.items():
        Q_A, Q_S, lam, _ = E.factors.corrections[mod][:4]
        assert Q_A.shape == A.shape and Q_S.shape == S.shape
        assert lam.shape == (S.shape[0], A.shape[0])
        for Q, M, side in ((Q_A, A, "A"), (Q_S, S, "S")):
            eye = torch.eye(Q.shape[0], dtype=DT)
            assert_rel_close(Q.T @ Q, eye, tol, f"Q_{side} of {mod} orthonormal")
            R = Q.T @ M @ Q
            off = R - torch.diag(R.diagonal())
            assert off.abs().max() <= tol * M.abs().max(), f"Q_{side} of {mod}: not eigenvectors"


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
@pytest.mark.parametrize(("loss", "reduction"), [("ce", "mean"), ("mse", "sum")])
def test_ekfac_eigenvalues_from_dense(loss, reduction, fisher, bias):
    """T = 1: eigenvalues = diag(Qᵀ G_block Q), G the exact GGN / empirical Fisher."""
    model = mlp((4, 5, 3), "tanh", seed=15)
    loss_fn = make_loss(loss, reduction)
    data = make_data(model, loss, (3, 4, 2), (4,), seed=16)
    E = kronfac.EKFAC(model, loss_fn, data, fisher=fisher, bias=bias)
    K = kronfac.compute_factors(model, loss_fn, data, fisher=fisher, bias=bias)
    _check_bases(E, K)
    G = (ref.ggn if fisher == "type-2" else ref.empirical_fisher)(model, loss_fn, data)
    slices, _ = layout(model, list(K))
    for mod in K:
        Q_A, Q_S, lam, bias_lam = E.factors.corrections[mod][:4]
        idx, b_idx = block_indices(model, mod, slices, bias == "joint")
        Q = torch.kron(Q_S, Q_A)
        expected = (Q.T @ G[idx[:, None], idx[None, :]] @ Q).diagonal().reshape(lam.shape)
        assert_rel_close(lam, expected, 1e-10, f"eigenvalues of {mod}")
        if bias == "separate":
            expected_b = (Q_S.T @ G[b_idx[:, None], b_idx[None, :]] @ Q_S).diagonal()
            assert_rel_close(bias_lam, expected_b, 1e-10, f"bias eigenvalues of {mod}")
        else:
            assert bias_lam is None


def _per_example_grads(model, loss_fn, data, mod, fisher, joint):
    """``[N, K, p, q(+1)]`` per-example gradients ``G_{n,k}`` of one Linear module.

    empirical: ``K = 1``, the gradient of datum n's summed loss. type-2 (MSE): the summed loss
    has Hessian ``2I`` w.r.t. the output, so ``G_{n,k} = √2 ∂f_{n,k}/∂W`` for every output entry.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    lf = ref.sum_loss(loss_fn)
    out = []
    for X, y in data:
        for n in range(X.shape[0]):

            def f(W, b, n=n, X=X, y=y):
                p = params | {f"{mod}.weight": W, f"{mod}.bias": b}
                pred = functional_call(model, p, (X[n : n + 1],))
                return lf(pred, y[n : n + 1]) if fisher == "empirical" else pred.reshape(-1)

            jW, jb = jacrev(f, argnums=(0, 1))(params[f"{mod}.weight"], params[f"{mod}.bias"])
            if fisher == "empirical":
                jW, jb = jW[None], jb[None]
            else:
                jW, jb = math.sqrt(2) * jW, math.sqrt(2) * jb
            out.append(torch.cat([jW, jb[..., None]], -1) if joint else jW)
    return torch.stack(out)


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_ekfac_eigenvalues_sequence(approx, fisher):
    """Linear layers shared over T = 3 positions, MSE: eigenvalues from per-example gradients
    ``G_n = Σ_t g_t a_tᵀ`` (torch.func), with expand and reduce (K-FAC's basis differs)."""
    N_T_d = (3, 4)  # T = 3 positions, d = 4 features
    model = PerPosition(mlp((4, 5, 2), "tanh", seed=17))
    loss_fn = make_loss("mse")
    data = make_data(model, "mse", (2, 3), N_T_d, seed=18)
    kw = dict(fisher=fisher, approx=approx)
    E = kronfac.EKFAC(model, loss_fn, data, **kw)
    K = kronfac.compute_factors(model, loss_fn, data, **kw)
    _check_bases(E, K)
    D = ref.dataset_divisor(model, loss_fn, data)
    assert D == 5 * 3 * 2
    G = ref.ggn(model, loss_fn, data) if fisher == "type-2" else None
    slices, _ = layout(model, list(K))
    for mod in K:
        Q_A, Q_S, lam, _ = E.factors.corrections[mod][:4]
        Gn = _per_example_grads(model, loss_fn, data, mod, fisher, joint=True)
        expected = (Q_S.T @ Gn @ Q_A).square().sum((0, 1)) / D
        if G is not None:  # the reference is the Frobenius-optimal diagonal of the exact GGN
            idx, _ = block_indices(model, mod, slices, joint=True)
            Q = torch.kron(Q_S, Q_A)
            diag = (Q.T @ G[idx[:, None], idx[None, :]] @ Q).diagonal().reshape(lam.shape)
            assert_rel_close(expected, diag, 1e-10, "test's formula vs diag(Qᵀ GGN Q)")
        assert_rel_close(lam, expected, 1e-10, f"{approx} {fisher} eigenvalues of {mod}")


# ----------------------------------------------------------------------------------------------
# 3. singular operators


def dead_relu_problem():
    """ReLU MLP whose hidden unit 2 never fires: layer 2's A has an exactly zero row / column."""
    model = mlp((4, 5, 3), "relu", seed=19)
    with torch.no_grad():
        model[0].weight[2] = 0.0
        model[0].bias[2] = -1.0
    loss_fn = make_loss("mse")
    data = make_data(model, "mse", (4, 5), (4,), seed=20)
    return model, loss_fn, data


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("cause", ["dead-relu", "ce-null-direction"])
@pytest.mark.parametrize("Op", [kronfac.KFAC, kronfac.EKFAC], ids=["KFAC", "EKFAC"])
def test_logdet_singular(Op, cause, bias):
    if cause == "dead-relu":
        model, loss_fn, data = dead_relu_problem()
    else:
        model, loss_fn, data = problem("tanh", "ce")
    op = Op(model, loss_fn, data, fisher="type-2", bias=bias)
    evals = torch.linalg.eigvalsh(op.to_dense())
    assert evals.min() <= 1e-14 * evals.max(), "the operator is not singular: bad test case"
    logdet = op.logdet()
    assert not torch.isnan(logdet)
    assert logdet.item() == -math.inf, (
        f"{Op.__name__} {cause} {bias}: logdet(0) = {logdet.item()!r}, expected -inf "
        f"(dense λ_min {evals.min().item():.3e}, λ_max {evals.max().item():.3e})"
    )
    assert op.det().item() == 0.0
    for d in (1e-3, 1.0):
        ld, det = op.logdet(d), op.det(d)
        assert torch.isfinite(ld)
        assert_rel_close(det, ld.exp(), 1e-12, f"det({d}) = exp(logdet({d}))")


# ----------------------------------------------------------------------------------------------
# 4. bad input


@pytest.fixture(scope="module")
def small_ops():
    model, loss_fn, data = problem("tanh", "mse")
    K = kronfac.KFAC(model, loss_fn, data, fisher="type-2", bias="separate")
    E = kronfac.EKFAC(model, loss_fn, data, fisher="type-2", bias="separate")
    return model, K, E


@pytest.mark.parametrize("which", ["K", "E", "K.inverse", "E.inverse"])
def test_bad_vectors(small_ops, which):
    model, K, E = small_ops
    op = {"K": K, "E": E, "K.inverse": K.inverse(0.1), "E.inverse": E.inverse(0.1)}[which]
    P = op.shape[0]
    params = dict(model.named_parameters())
    names = list(op.param_names)
    parts = [torch.zeros_like(params[n]) for n in names]
    bad = {
        "short": torch.zeros(P - 1, dtype=DT),
        "long": torch.zeros(P + 1, 2, dtype=DT),
        "3d": torch.zeros(P, 2, 2, dtype=DT),
        "0d": torch.zeros((), dtype=DT),
        "list-short": parts[:-1],
        "tuple-long": (*parts, parts[0]),
        "list-shape": [p.reshape(-1) for p in parts],
        "dict-missing": dict(zip(names[:-1], parts, strict=False)),
        "dict-extra": dict(zip(names, parts, strict=True)) | {"nope": parts[0]},
        "dict-shape": {n: p.reshape(-1) for n, p in zip(names, parts, strict=True)},
    }
    for what, v in bad.items():
        with pytest.raises(ValueError, match=r"\S") as info:
            op @ v
        if what == "dict-missing":
            assert names[-1] in str(info.value), str(info.value)
        if what == "dict-extra":
            assert "nope" in str(info.value), str(info.value)


def test_bad_damping(small_ops):
    _, K, E = small_ops
    calls = {
        "K.inverse": lambda: K.inverse(-1e-3),
        "K.inverse heuristic": lambda: K.inverse(-1e-3, heuristic=True),
        "K.inverse exact": lambda: K.inverse(-1e-3, exact=True),
        "E.inverse": lambda: E.inverse(-1e-3),
        "K.logdet": lambda: K.logdet(-1e-3),
        "K.det": lambda: K.det(-1e-3),
        "E.logdet": lambda: E.logdet(-1e-3),
        "E.det": lambda: E.det(-1e-3),
    }
    for what, call in calls.items():
        try:
            call()
        except ValueError as e:
            assert "damping" in str(e), f"{what}: {e}"
        else:
            pytest.fail(f"{what} accepted a negative damping")
    with pytest.raises(ValueError, match=r"heuristic.*exact|exact.*heuristic"):
        K.inverse(1e-2, heuristic=True, exact=True)
    with pytest.raises(TypeError):
        E.inverse(1e-2, heuristic=True)
    with pytest.raises(TypeError):
        E.inverse(1e-2, exact=True)


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_not_psd_names_module(bias):
    """Hidden unit 2 is exactly 0 (tanh(0)): only fc2's A is singular (zero row / column)."""
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 5), act=nn.Tanh(), fc2=nn.Linear(5, 3)))
    init(model, seed=22)
    with torch.no_grad():
        model.fc1.weight[2] = 0.0
        model.fc1.bias[2] = 0.0
    loss_fn = make_loss("mse")
    data = make_data(model, "mse", (4, 5), (4,), seed=23)
    K = kronfac.KFAC(model, loss_fn, data, fisher="type-2", bias=bias)
    for mod in ("fc1", "fc2"):  # the test's premise
        for M in K.factors[mod]:
            singular = torch.linalg.eigvalsh(M).min() <= 1e-14 * M.abs().max()
            assert singular == (mod == "fc2" and M.shape[0] != 3), (mod, M.shape)
    with pytest.raises(kronfac.NotPSDError, match="fc2") as info:
        K.inverse(0.0)
    assert isinstance(info.value, ValueError)
    assert "fc1" not in str(info.value), str(info.value)
    # damping makes it invertible
    assert torch.isfinite(K.inverse(1e-3).to_dense()).all()


def test_ekfac_from_factors_without_corrections():
    model, loss_fn, data = problem("tanh", "mse")
    factors = kronfac.compute_factors(model, loss_fn, data, fisher="type-2")
    assert factors.corrections is None
    with pytest.raises(ValueError, match="correction"):
        kronfac.EKFAC.from_factors(factors, model)
    # but KFAC takes them, and EKFAC's factors work for KFAC too
    K = kronfac.KFAC.from_factors(factors, model)
    E = kronfac.EKFAC(model, loss_fn, data, fisher="type-2")
    assert_rel_close(kronfac.KFAC.from_factors(E.factors, model).to_dense(), K.to_dense(), 1e-12)


# ----------------------------------------------------------------------------------------------
# 5. save / load


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_ekfac_save_load(tmp_path, bias):
    model, loss_fn, data = problem("relu", "ce")
    E = kronfac.EKFAC(model, loss_fn, data, fisher="empirical", bias=bias)
    path = tmp_path / "ekfac.safetensors"
    E.factors.save(path)
    loaded = kronfac.KroneckerFactors.load(path)
    assert loaded.corrections is not None and set(loaded.corrections) == set(E.factors)
    for mod in E.factors:
        for a, b in zip(loaded.corrections[mod], E.factors.corrections[mod], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b), mod
    E2 = kronfac.EKFAC.from_factors(loaded, model)
    # same numbers; only round-off may differ (the loaded Q's are C-contiguous, eigh's are not)
    assert_rel_close(E2.to_dense(), E.to_dense(), 1e-14, "to_dense after load")
    v = randn(E.shape[0], g=gen(21))
    assert_rel_close(E2.inverse(DAMPING) @ v, E.inverse(DAMPING) @ v, 1e-13, "inverse after load")
    assert_rel_close(E2.logdet(DAMPING), E.logdet(DAMPING), 1e-14, "logdet after load")
