"""``kronfac.optim``: ``KFACPreconditioner`` and ``KFAC`` against dense float64 references.

Every reference is built here, from the layers' inputs and the output gradients that autograd
leaves on ``out.retain_grad()`` tensors, with ``torch.linalg`` (never from kronfac code), as
the module docstring of ``kronfac/optim/preconditioner.py`` states it: per step with ``N``
data points and ``T`` positions per data point,

- ``Â = 1/N Σ_n 1/T Σ_t ã ãᵀ`` (``ã = [a, 1]`` for a joint bias), ``Ŝ = c Σ_{n,t} g gᵀ``
  with ``c = N`` (a loss averaged over the ``N`` data points) or ``1`` (summed): the scale of
  ``kronfac.compute_factors``, ``S = 1/D Σ g_sum g_sumᵀ`` with the gradients of the summed loss;
- π-damping ``(S + δ_S I)⁻¹ G (A + δ_A I)⁻¹``, Tikhonov ``(S ⊗ A + δI)⁻¹ vec G``, EKFAC
  ``Q_S [(Q_Sᵀ G Q_A) ⊘ (Λ + δ)] Q_Aᵀ``.

Tolerance: the dense references solve damped systems with condition numbers below ~1e4
(damping >= 1e-2 against factors of order one), so float64 round-off stays below ~1e-12
relative; ``TOL = 1e-10`` leaves a margin while any error in a formula (a wrong ``c``, a
missing bias column, a stale factor, a wrong ``π``) is orders of magnitude larger.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DT,
    LOSSES,
    PerPosition,
    assert_rel_close,
    called_twice,
    gen,
    init,
    make_data,
    mlp,
    padded,
    padding_mask,
    pi_damping,
    randn,
    sequences,
)
from torch import Tensor, nn

import kronfac
from kronfac.likelihoods.categorical import CategoricalLikelihood
from kronfac.optim import KFAC, KFACPreconditioner

TOL = 1e-10  # float64, damped systems of condition number <~1e4 (module docstring)
CE = nn.CrossEntropyLoss()  # the loss the preconditioners watch
# KFAC with a fixed learning rate and momentum, the plain update for uncovered parameters and
# the empirical Fisher: the dense references of sections 6 and 7 are built for that step; and
# the preconditioner's own factor_every and inverse_method (KFAC's defaults: 2 and Cholesky)
FIXED = {
    "adaptive": False,
    "uncovered": "sgd",
    "fisher": "empirical",
    "factor_every": 1,
    "inverse_method": "eigen",
}


# -- dense references ---------------------------------------------------------------------------
class Tap:
    """Records every call of the model's Linear / Conv2d modules (inputs, retained outputs)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.modules = {
            name: mod
            for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, nn.Conv2d))
        }
        for name, mod in self.modules.items():
            mod.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, args, out):
            if torch.is_grad_enabled() and out.requires_grad:
                out.retain_grad()
                self.calls.setdefault(name, []).append((args[0].detach(), out))

        return hook

    def clear(self) -> None:
        self.calls = {}

    def positions(self, name: str) -> tuple[Tensor, Tensor]:
        """``(a [N, T, q], g [N, T, p])``: the inputs and output gradients at every position."""
        mod, a, g = self.modules[name], [], []
        for x, out in self.calls[name]:
            if isinstance(mod, nn.Conv2d):
                patches = F.unfold(
                    x,
                    mod.kernel_size,
                    dilation=mod.dilation,
                    padding=mod.padding,
                    stride=mod.stride,
                )
                a.append(patches.transpose(1, 2))  # [N, L, C_in·kh·kw]
                g.append(out.grad.flatten(2).transpose(1, 2))  # [N, L, C_out]
            else:
                a.append(x[:, None])
                g.append(out.grad[:, None])
        return torch.cat(a, 1), torch.cat(g, 1)

    def stats(self, name: str, joint: bool, c: float | None = None):
        """``(Â, Ŝ, G_n)`` of one step; ``c = N`` by default (a mean loss)."""
        a, g = self.positions(name)
        N, T = a.shape[:2]
        if joint:
            a = torch.cat([a, a.new_ones(N, T, 1)], dim=-1)
        c = N if c is None else c
        A = torch.einsum("ntq,ntr->qr", a, a) / (N * T)
        S = c * torch.einsum("ntp,nto->po", g, g)
        Gn = torch.einsum("ntp,ntq->npq", g, a)
        return A, S, Gn


def grad_matrix(mod: nn.Module, joint: bool) -> Tensor:
    """``[∇W | ∇b]`` (joint) or ``∇W`` as ``[p, q]`` (conv weights flattened)."""
    W = mod.weight.grad.reshape(mod.weight.shape[0], -1)
    if joint and mod.bias is not None:
        W = torch.cat([W, mod.bias.grad[:, None]], dim=1)
    return W.clone()


def eye(n: int) -> Tensor:
    return torch.eye(n, dtype=DT)


def dense_pi(A, S, G, damping, min_damping=1e-8):
    """``(S + δ_S I)⁻¹ G (A + δ_A I)⁻¹``."""
    d_S, d_A = pi_damping(S, A, damping, min_damping)
    X = torch.linalg.solve(S + d_S * eye(S.shape[0]), G)
    return torch.linalg.solve(A + d_A * eye(A.shape[0]), X.T).T


def dense_tikhonov(A, S, G, damping):
    """``(S ⊗ A + δI)⁻¹ vec G`` with the row-major ``vec``."""
    K = torch.kron(S, A) + damping * eye(S.shape[0] * A.shape[0])
    return torch.linalg.solve(K, G.reshape(-1)).reshape(G.shape)


def dense_ekfac(A, S, Gn, G, damping, eps, c):
    """EKFAC's first step: ``Λ = ε s aᵀ + (1 − ε) c Σ_n (Q_Sᵀ G_n Q_A)²``."""
    s, Q_S = torch.linalg.eigh(S)
    a, Q_A = torch.linalg.eigh(A)
    lam = eps * torch.outer(s, a) + (1 - eps) * c * (Q_S.T @ Gn @ Q_A).square().sum(0)
    return Q_S @ ((Q_S.T @ G @ Q_A) / (lam + damping)) @ Q_A.T


def preconditioned(mod: nn.Module) -> Tensor:
    """The weight's (and bias's) ``.grad`` as one ``[p, q (+1)]`` matrix."""
    return grad_matrix(mod, joint=True)


# -- 1. one step against the dense formulas -----------------------------------------------------
ONE_STEP_CASES = {
    "pi": {},
    "pi-separate": {"bias": "separate"},
    "pi-min-damping": {"damping": 1e-4, "min_damping": 0.3},
    "tikhonov": {"damping_mode": "tikhonov"},
    "tikhonov-separate": {"damping_mode": "tikhonov", "bias": "separate"},
    "cholesky": {"inverse_method": "cholesky"},
    "cholesky-separate": {"inverse_method": "cholesky", "bias": "separate"},
    "ekfac": {"ekfac": True, "factor_decay": 0.8},
    "ekfac-separate": {"ekfac": True, "factor_decay": 0.8, "bias": "separate"},
    "sum": {"reduction": "sum"},
    "ekfac-sum": {"ekfac": True, "reduction": "sum"},
    "tikhonov-sum": {"damping_mode": "tikhonov", "reduction": "sum"},
}


@pytest.mark.parametrize("case", list(ONE_STEP_CASES))
def test_one_step_matches_dense_formula(case):
    opts = {"damping": 0.1, **ONE_STEP_CASES[case]}
    N = 8
    model = mlp((5, 3), seed=1)
    lin = model[0]
    tap = Tap(model)
    reduction = opts.pop("reduction", "mean")
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    precond = KFACPreconditioner(model, loss_fn=loss_fn, **opts)
    X, y = make_data(3, "ce", (N,), (5,), seed=2)[0]
    loss_fn(model(X), y).backward()
    joint = opts.get("bias", "joint") == "joint"
    c = N if reduction == "mean" else 1  # S of the summed loss: divided by D = N for the mean
    A, S, Gn = tap.stats("0", joint, c)
    G = grad_matrix(lin, joint)
    b = lin.bias.grad.clone()
    torch.testing.assert_close(Gn.sum(0), G, rtol=1e-12, atol=0)  # the tap sees ∇W

    assert precond.step() is True
    state = precond.state_dict()["layers"]["0"]
    assert_rel_close(state["A"], A, what="A")
    assert_rel_close(state["S"], S, what="S")

    damping, mode = opts["damping"], opts.get("damping_mode", "pi")
    if opts.get("ekfac"):
        eps = opts.get("factor_decay", 0.95)
        V = dense_ekfac(A, S, Gn, G, damping, eps, c)
        if not joint:  # the bias: A = [1], G_n = Σ_t g_nt
            s, Q_S = torch.linalg.eigh(S)
            gb = torch.einsum("ntp->np", tap.positions("0")[1])
            lam = eps * s + (1 - eps) * c * (gb @ Q_S).square().sum(0)
            vb = Q_S @ ((Q_S.T @ b) / (lam + damping))
    elif mode == "tikhonov":
        V = dense_tikhonov(A, S, G, damping)
        vb = torch.linalg.solve(S + damping * eye(3), b)
    else:
        min_damping = opts.get("min_damping", 1e-8)
        V = dense_pi(A, S, G, damping, min_damping)
        d_S, _ = pi_damping(S, A, damping, min_damping)
        vb = torch.linalg.solve(S + d_S * eye(3), b)
        if case == "pi-min-damping":  # the bound is active, and it matters
            free_S, free_A = pi_damping(S, A, damping, 0.0)
            assert free_S < 0.3 and free_A < 0.3
            unbounded = dense_pi(A, S, G, damping, 0.0)
            assert (unbounded - V).abs().max() > 1e-3 * V.abs().max()
    if joint:
        assert_rel_close(preconditioned(lin), V, what=case)
    else:
        assert_rel_close(lin.weight.grad, V, what=f"{case} weight")
        assert_rel_close(lin.bias.grad, vb, what=f"{case} bias")


# -- 2. running factors and stale decompositions ------------------------------------------------
@pytest.mark.parametrize("factor_every", [1, 2])
def test_running_factors_are_the_ema_of_the_batch_factors(factor_every):
    eps, N = 0.8, 6
    model = mlp((6, 8, 3), seed=3)
    tap = Tap(model)
    precond = KFACPreconditioner(model, loss_fn=CE, factor_decay=eps, factor_every=factor_every)
    expected: dict[str, tuple[Tensor, Tensor]] = {}
    for k in range(5):
        tap.clear()
        X, y = make_data(3, "ce", (N,), (6,), seed=10 + k)[0]
        CE(model(X), y).backward()
        before = copy.deepcopy(precond.state_dict()["layers"])
        assert precond.step() is True
        state = precond.state_dict()["layers"]
        for name in ("0", "2"):
            if k % factor_every:  # no update on this step
                assert torch.equal(state[name]["A"], before[name]["A"])
                assert torch.equal(state[name]["S"], before[name]["S"])
                continue
            A, S, _ = tap.stats(name, joint=True)
            if name in expected:
                A = eps * expected[name][0] + (1 - eps) * A
                S = eps * expected[name][1] + (1 - eps) * S
            expected[name] = (A, S)
            assert_rel_close(state[name]["A"], A, what=f"A {name} step {k}")
            assert_rel_close(state[name]["S"], S, what=f"S {name} step {k}")
        model.zero_grad()
    assert precond.steps == 5


@pytest.mark.parametrize(
    ("inverse_method", "scheduled"),
    [
        ("eigen", True),
        ("eigen", False),
        ("cholesky", True),
        ("cholesky", False),
    ],
)
def test_stale_decomposition_between_refreshes(inverse_method, scheduled):
    """``inverse_every=3``: steps 1, 2, 4, 5 reuse the factors of the refreshes at steps 0, 3.

    The reference is built from the factors saved at the last refresh; the damping is the
    current one for eigen (the damping enters after the decomposition), the refresh step's for
    Cholesky (which inverts the damped factors).
    """

    def damping(k: int) -> float:
        return 0.05 * (k + 1) if scheduled else 0.05

    model = mlp((6, 8, 3), seed=4)
    tap = Tap(model)
    precond = KFACPreconditioner(
        model,
        loss_fn=CE,
        damping=damping if scheduled else 0.05,
        factor_decay=0.7,
        inverse_every=3,
        inverse_method=inverse_method,
    )
    refresh: dict[str, tuple[Tensor, Tensor]] = {}
    for k in range(6):
        tap.clear()
        X, y = make_data(3, "ce", (6,), (6,), seed=20 + k)[0]
        CE(model(X), y).backward()
        G = {name: grad_matrix(tap.modules[name], True) for name in ("0", "2")}
        assert precond.step() is True
        state = precond.state_dict()["layers"]
        r = 3 * (k // 3)
        if k == r:
            refresh = {n: (state[n]["A"].clone(), state[n]["S"].clone()) for n in ("0", "2")}
        for name in ("0", "2"):
            A, S = refresh[name]
            d = damping(k) if inverse_method == "eigen" else damping(r)
            expected = dense_pi(A, S, G[name], d)
            actual = preconditioned(tap.modules[name])
            assert_rel_close(actual, expected, what=f"{name} step {k}")
            if k != r:  # the current factors would give another answer
                current = dense_pi(state[name]["A"], state[name]["S"], G[name], d)
                assert (current - actual).abs().max() > 1e-6 * actual.abs().max()
        model.zero_grad()


# -- 3. schedules and KL clipping ---------------------------------------------------------------
def test_damping_and_lr_schedules_are_called_with_the_step_index():
    calls: dict[str, list[int]] = {"damping": [], "lr": []}

    def damping(k: int) -> float:
        calls["damping"].append(k)
        return 0.02 * (k + 1)

    def lr(k: int) -> float:
        calls["lr"].append(k)
        return 0.1

    model = mlp((6, 8, 3), seed=5)
    tap = Tap(model)
    # ε = 0, inverse_every = 1: every step's factors are that step's batch factors
    precond = KFACPreconditioner(
        model, loss_fn=CE, damping=damping, lr=lr, kl_clip=1e6, factor_decay=0.0, inverse_every=1
    )
    for k in range(3):
        tap.clear()
        X, y = make_data(3, "ce", (6,), (6,), seed=30 + k)[0]
        CE(model(X), y).backward()
        G = {name: grad_matrix(tap.modules[name], True) for name in ("0", "2")}
        assert precond.step() is True
        for name in ("0", "2"):
            A, S, _ = tap.stats(name, joint=True)
            expected = dense_pi(A, S, G[name], 0.02 * (k + 1))
            assert_rel_close(preconditioned(tap.modules[name]), expected, what=f"step {k}")
        model.zero_grad()
    assert calls["damping"] == [0, 1, 2]
    assert calls["lr"] == [0, 1, 2]


@pytest.mark.parametrize("clipped", [True, False])
def test_kl_clipping_scales_by_nu(clipped):
    """``ν = min(1, √(κ / |Σ η² ⟨v, g⟩|))`` over both layers; κ is set to make ``ν = ½`` or 1."""
    X, y = make_data(3, "ce", (8,), (6,), seed=40)[0]
    lr = 0.3
    free_model = mlp((6, 8, 3), seed=6)
    free = KFACPreconditioner(free_model, loss_fn=CE, damping=0.05, kl_clip=None, lr=lr)
    CE(free_model(X), y).backward()
    raw = [p.grad.clone() for p in free_model.parameters()]
    assert free.step() is True
    v = [p.grad.clone() for p in free_model.parameters()]
    vg = lr**2 * sum(float((a * b).sum()) for a, b in zip(v, raw, strict=True))
    kappa = abs(vg) / 4 if clipped else 4 * abs(vg)
    nu = min(1.0, math.sqrt(kappa / abs(vg)))
    assert nu == (0.5 if clipped else 1.0)

    model = mlp((6, 8, 3), seed=6)
    precond = KFACPreconditioner(model, loss_fn=CE, damping=0.05, kl_clip=kappa, lr=lambda k: lr)
    CE(model(X), y).backward()
    assert precond.step() is True
    for p, expected in zip(model.parameters(), v, strict=True):
        assert_rel_close(p.grad, nu * expected, tol=1e-12, what="clipped")


# -- 4. gradient accumulation -------------------------------------------------------------------
@pytest.mark.parametrize("ekfac", [False, True])
def test_gradient_accumulation_equals_one_batch(ekfac):
    X, y = make_data(3, "ce", (8,), (6,), seed=50)[0]
    results = []
    for halves in (False, True):
        model = mlp((6, 8, 3), seed=7)
        precond = KFACPreconditioner(model, loss_fn=CE, damping=0.05, ekfac=ekfac, factor_decay=0.9)
        if halves:
            for part in (slice(0, 4), slice(4, 8)):
                (CE(model(X[part]), y[part]) / 2).backward()
        else:
            CE(model(X), y).backward()
        assert precond.step() is True
        results.append((precond.state_dict()["layers"], [p.grad for p in model.parameters()]))
    (one, g_one), (two, g_two) = results
    for name in ("0", "2"):
        for key in ("A", "S"):
            assert_rel_close(two[name][key], one[name][key], tol=1e-12, what=f"{key} {name}")
        if ekfac:
            assert_rel_close(two[name]["scales"][0], one[name]["scales"][0], tol=1e-12)
    for a, b in zip(g_two, g_one, strict=True):
        assert_rel_close(a, b, tol=1e-12, what="preconditioned gradient")


# -- 5. GradScaler --------------------------------------------------------------------------------
def test_grad_scaler_gives_the_unscaled_step():
    X, y = make_data(3, "ce", (8,), (6,), seed=60)[0]
    grads = {}
    for mode in ("plain", "scaled", "scaled-unknown"):
        model = mlp((6, 8, 3), seed=8)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        assert scaler.is_enabled() and scaler.get_scale() == 1024.0  # enabled on CPU
        opts = {"grad_scaler": scaler} if mode == "scaled" else {}
        precond = KFACPreconditioner(model, loss_fn=CE, damping=0.05, **opts)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = CE(model(X), y)
        if mode == "plain":
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        assert precond.step() is True
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["scaled"], grads["plain"], strict=True):
        assert_rel_close(a, b, tol=1e-12, what="with grad_scaler")
    # without grad_scaler=..., Ŝ carries scale²: the step differs (the option matters)
    ratios = [
        float((a - b).abs().max() / b.abs().max())
        for a, b in zip(grads["scaled-unknown"], grads["plain"], strict=True)
    ]
    assert max(ratios) > 1e-3


def test_grad_scaler_overflow_skips_the_step_without_a_warning():
    """With a GradScaler, non-finite statistics are its usual overflow: skipped silently."""
    model = mlp((6, 8, 3), seed=8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    precond = KFACPreconditioner(model, loss_fn=CE, damping=0.05, grad_scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X, y = make_data(3, "ce", (8,), (6,), seed=60)[0]
    X[1, 1] = float("inf")
    scaler.scale(CE(model(X), y)).backward()
    scaler.unscale_(opt)
    grads = [p.grad.clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precond.step() is False
    assert precond.steps == 0
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)


# -- 6. the KFAC optimizer ------------------------------------------------------------------------
@pytest.mark.parametrize("kl_clip", [None, 1e-3])
def test_kfac_steps_are_momentum_sgd_on_the_preconditioned_gradients(kl_clip):
    """Two steps of ``KFAC`` against a ``KFACPreconditioner`` and a hand-written update.

    The LayerNorm is not covered: it gets the same update with its plain gradient.
    """
    lr, mu, wd = 0.1, 0.9, 0.01
    opts = {"damping": 0.05, "kl_clip": kl_clip, "inverse_every": 1}
    model = mlp((6, 8, 3), layernorm=True, seed=9)
    ref_model = copy.deepcopy(model)
    opt = KFAC(model, lr, loss_fn=CE, momentum=mu, weight_decay=wd, **FIXED, **opts)
    precond = KFACPreconditioner(ref_model, loss_fn=CE, lr=lr, **opts)
    assert precond.modules == ["0", "3"]
    covered = {id(p) for p in precond.parameters()}
    assert all(id(p) not in covered for p in ref_model[1].parameters())
    buffers: list[Tensor | None] = [None] * len(list(ref_model.parameters()))
    for k in range(2):
        X, y = make_data(3, "ce", (8,), (6,), seed=70 + k)[0]
        opt.zero_grad()
        CE(model(X), y).backward()
        opt.step()
        ref_model.zero_grad()
        CE(ref_model(X), y).backward()
        raw = [p.grad.clone() for p in ref_model.parameters()]
        assert precond.step() is True
        with torch.no_grad():
            for i, p in enumerate(ref_model.parameters()):
                if id(p) in covered:
                    assert not torch.allclose(p.grad, raw[i])  # preconditioned
                else:
                    assert torch.equal(p.grad, raw[i])  # plain
                d = p.grad + wd * p
                buffers[i] = d.clone() if buffers[i] is None else mu * buffers[i] + d
                p -= lr * buffers[i]
        pairs = zip(model.named_parameters(), ref_model.parameters(), buffers, strict=True)
        for (name, p), q, buf in pairs:
            assert_rel_close(p, q, tol=1e-12, what=f"{name} after step {k}")
            assert_rel_close(opt.state[p]["momentum_buffer"], buf, tol=1e-12, what=name)
    assert opt.preconditioner.steps == 2


@pytest.mark.parametrize(
    ("options", "method"),
    [
        ({}, "cholesky"),
        ({"adaptive": False, "lr": 0.1}, "cholesky"),
        ({"ekfac": True}, "eigen"),
        ({"damping_mode": "tikhonov"}, "eigen"),
        ({"inverse_method": "eigen"}, "eigen"),
    ],
)
def test_kfac_inverts_by_cholesky_unless_the_eigenbasis_is_needed(options, method):
    opt = KFAC(mlp((4, 5, 3), seed=0), loss_fn=CE, **options)
    assert opt.preconditioner.inverse_method == method
    assert (opt.preconditioner.factor_every, opt.preconditioner.inverse_every) == (2, 10)


def test_kfac_lr_schedule_sets_the_step_size():
    etas = {0: 0.1, 1: 0.05, 2: 0.02}
    seen: list[int] = []

    def lr(k: int) -> float:
        seen.append(k)
        return etas[k]

    model = mlp((6, 8, 3), seed=10)
    opt = KFAC(model, lr, loss_fn=CE, momentum=0.0, kl_clip=None, damping=0.05, **FIXED)
    seen.clear()  # the constructor checks lr(0)
    for k in range(3):
        X, y = make_data(3, "ce", (8,), (6,), seed=80 + k)[0]
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        CE(model(X), y).backward()
        opt.step()
        assert opt.param_groups[0]["lr"] == etas[k]
        for p, b in zip(model.parameters(), before, strict=True):  # p.grad: the preconditioned v
            assert_rel_close(p.detach(), b - etas[k] * p.grad, tol=1e-12, what=f"step {k}")
    assert seen == [0, 1, 2]


def test_kfac_reduces_the_training_loss():
    g = gen(90)
    X, W = randn(64, 6, g=g), randn(6, 3, g=g)
    y = (X @ W).argmax(1)
    model = mlp((6, 8, 3), seed=11)
    opt = KFAC(model, 0.1, loss_fn=CE, damping=0.05, inverse_every=5, **FIXED)
    with torch.no_grad():
        start = CE(model(X), y).item()
    for _ in range(30):
        opt.zero_grad()
        CE(model(X), y).backward()
        opt.step()
    with torch.no_grad():
        end = CE(model(X), y).item()
    assert end < 0.5 * start, (start, end)


# -- 7. checkpoints -------------------------------------------------------------------------------
def _train(model, opt, batches, fisher):
    for X, y in batches:
        opt.zero_grad()
        CE(model(X), y).backward()  # fisher="mc": the labels are drawn at the loss call
        opt.step()


def _round_trip(state, how):
    if how == "deepcopy":
        return copy.deepcopy(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("ekfac", [False, True])
def test_checkpoint_resumes_bit_identically(ekfac, fisher, how):
    batches = make_data(3, "ce", [8] * 40, (6,), seed=100, dtype=torch.float32)
    opts = {
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "damping": 1e-2,
        "inverse_every": 3,
        "ekfac": ekfac,
        "fisher": fisher,
        "seed": 7,
    }

    def fresh(seed):
        model = mlp((6, 8, 3), seed=seed, dtype=torch.float32)
        return model, KFAC(model, 0.05, loss_fn=CE, adaptive=False, uncovered="sgd", **opts)

    model, opt = fresh(0)
    _train(model, opt, batches[:20], fisher)
    model_state = _round_trip(model.state_dict(), how)
    opt_state = _round_trip(opt.state_dict(), how)
    _train(model, opt, batches[20:], fisher)

    model2, opt2 = fresh(1)
    model2.load_state_dict(model_state)
    opt2.load_state_dict(opt_state)
    assert opt2.preconditioner.steps == 20
    _train(model2, opt2, batches[20:], fisher)
    for (name, p1), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert p1.dtype == torch.float32
        assert torch.equal(p1, p2), name


# -- 8. fisher="mc" -------------------------------------------------------------------------------
def _mc_step(seed=0, fisher="mc", preset_grads=False):
    model = mlp((6, 8, 3), seed=12)
    loss_fn = nn.CrossEntropyLoss()
    precond = KFACPreconditioner(model, loss_fn=loss_fn, fisher=fisher, seed=seed, damping=0.05)
    X, y = make_data(3, "ce", (16,), (6,), seed=110)[0]
    if preset_grads:
        for i, p in enumerate(model.parameters()):
            p.grad = torch.full_like(p, float(i + 1))
    out = model(X)
    if fisher == "mc":
        before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        precond.mc_backward(out, loss_fn, y)  # as the loss call would: draws the labels
        for p, b in zip(model.parameters(), before, strict=True):
            assert (p.grad is None) if b is None else torch.equal(p.grad, b)
    if preset_grads:
        model.zero_grad()
    loss_fn(out, y).backward()  # the output is recorded already: no second draw
    assert precond.step() is True
    return precond.state_dict()["layers"], [p.grad for p in model.parameters()]


@pytest.mark.parametrize("preset_grads", [False, True])
def test_mc_backward_leaves_the_parameter_gradients_alone(preset_grads):
    _mc_step(preset_grads=preset_grads)  # asserts inside


def test_mc_factors_differ_from_empirical_and_are_reproducible():
    emp, g_emp = _mc_step(fisher="empirical")
    mc, g_mc = _mc_step(seed=3)
    mc_again, g_again = _mc_step(seed=3)
    other, _ = _mc_step(seed=4)
    for name in ("0", "2"):
        assert_rel_close(mc[name]["A"], emp[name]["A"], what="A does not depend on the labels")
        assert (mc[name]["S"] - emp[name]["S"]).abs().max() > 1e-3 * emp[name]["S"].abs().max()
        assert (other[name]["S"] - mc[name]["S"]).abs().max() > 1e-6 * mc[name]["S"].abs().max()
        for key in ("A", "S"):
            assert torch.equal(mc_again[name][key], mc[name][key])
    for a, b in zip(g_again, g_mc, strict=True):
        assert torch.equal(a, b)
    assert not all(torch.allclose(a, b) for a, b in zip(g_mc, g_emp, strict=True))


def test_mc_backward_misuse():
    model = mlp((6, 8, 3), seed=13)
    X, y = make_data(3, "ce", (4,), (6,), seed=120)[0]
    empirical = KFACPreconditioner(model, loss_fn=CE)
    with pytest.raises(RuntimeError, match="fisher='mc'"):
        empirical.mc_backward(model(X), CE)
    empirical.remove()
    mc = KFACPreconditioner(model, loss_fn=CE, fisher="mc")
    with pytest.raises(ValueError, match="another loss_fn"):
        mc.mc_backward(model(X), nn.CrossEntropyLoss(), y)
    with pytest.raises(ValueError, match="needs the targets"):
        mc.mc_backward(model(X), CE)


# -- 9. bad input ---------------------------------------------------------------------------------
BAD_OPTIONS = [
    ({"lr": -0.1}, "lr must be positive"),
    ({"lr": 0.0}, "lr must be positive"),
    ({"damping": -1e-3}, "damping must be >= 0"),
    ({"factor_decay": 1.0}, r"factor_decay must be in \[0, 1\)"),
    ({"factor_decay": -0.1}, r"factor_decay must be in \[0, 1\)"),
    ({"inverse_every": 0}, "inverse_every must be a positive integer"),
    ({"factor_every": 0}, "factor_every must be a positive integer"),
    ({"damping_mode": "levenberg"}, "Unknown damping_mode 'levenberg'"),
    ({"fisher": "type-3"}, "Invalid fisher 'type-3'"),
    ({"inverse_method": "svd"}, "Unknown inverse_method 'svd'"),
    ({"inverse_method": "cholesky", "ekfac": True}, "cholesky"),
    ({"inverse_method": "cholesky", "damping_mode": "tikhonov"}, "cholesky"),
    ({"kl_clip": 0.0}, "kl_clip must be positive"),
]


@pytest.mark.parametrize(("options", "match"), BAD_OPTIONS)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        KFACPreconditioner(mlp((6, 8, 3)), loss_fn=CE, **options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"reduction": "sum"}, r"Unknown option\(s\) reduction"),
        ({"forward": lambda m, X: m(X)}, "forward: options of a pass over data"),
        ({"num_data": 4}, "num_data: options of a pass over data"),
        ({"loss_fn": nn.L1Loss()}, "Unsupported loss L1Loss"),
    ],
)
def test_options_of_other_kinds_raise(options, match):
    options = {"loss_fn": CE, **options}
    error = NotImplementedError if "L1Loss" in match else TypeError
    with pytest.raises(error, match=match):
        KFACPreconditioner(mlp((6, 8, 3)), **options)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((-0.1,), {}, "lr must be positive"),
        ((0.1,), {"momentum": 1.0}, "momentum"),
        ((0.1,), {"weight_decay": -1.0}, "weight_decay"),
        ((0.1,), {"damping": -1.0}, "damping"),
    ],
)
def test_kfac_bad_arguments_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFAC(mlp((6, 8, 3)), *args, loss_fn=CE, **FIXED, **kwargs)


def test_kfac_lr_passed_twice_is_a_type_error():
    with pytest.raises(TypeError, match="lr"):
        KFAC(mlp((6, 8, 3)), 0.1, loss_fn=CE, **{"lr": 0.2})


def test_step_before_any_backward_raises():
    model = mlp((6, 8, 3))
    precond = KFACPreconditioner(model, loss_fn=CE)
    with torch.no_grad():
        model(torch.zeros(2, 6, dtype=DT))
    with pytest.raises(RuntimeError, match="before any recorded batch"):
        precond.step()
    model(torch.zeros(2, 6, dtype=DT))  # a forward pass alone records nothing
    with pytest.raises(RuntimeError, match="before any recorded batch"):
        precond.step()
    assert precond.steps == 0


@pytest.mark.parametrize(
    ("model", "kfac_match"),
    [
        (nn.Sequential(nn.ReLU()), "no parameter that requires a gradient"),
        (nn.Sequential(nn.LayerNorm(4)), "No supported layer"),
    ],
    ids=["relu", "layernorm"],
)
def test_model_without_a_covered_layer_raises(model, kfac_match):
    with pytest.raises(ValueError, match="No supported layer"):
        KFACPreconditioner(model, loss_fn=CE)
    with pytest.raises(ValueError, match=kfac_match):
        KFAC(model, 0.1, loss_fn=CE)


def test_load_state_of_another_model_or_options_raises():
    def trained(model, **options):
        precond = KFACPreconditioner(model, loss_fn=CE, **options)
        X, y = make_data(3, "ce", (4,), (model[0].in_features,), seed=130)[0]
        CE(model(X), y).backward()
        precond.step()
        return precond

    state = trained(mlp((6, 8, 3))).state_dict()
    other_model = init(
        nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3)), 0
    )
    with pytest.raises(ValueError, match="covers modules"):
        KFACPreconditioner(other_model, loss_fn=CE).load_state_dict(state)
    with pytest.raises(ValueError, match="options"):
        KFACPreconditioner(mlp((6, 8, 3)), loss_fn=CE, ekfac=True).load_state_dict(state)
    with pytest.raises(ValueError, match="options"):
        KFACPreconditioner(mlp((6, 8, 3)), loss_fn=CE, bias="separate").load_state_dict(state)
    opt = KFAC(mlp((6, 8, 3)), 0.1, loss_fn=CE)
    with pytest.raises(ValueError, match="'kfac' entry is missing"):
        opt.load_state_dict(torch.optim.SGD(mlp((6, 8, 3)).parameters(), lr=0.1).state_dict())
    KFACPreconditioner(mlp((6, 8, 3)), loss_fn=CE).load_state_dict(state)  # the matching one loads
    # S of forward-only is the identity: not interchangeable with a running S matrix
    identity = trained(mlp((6, 8, 3)), fisher="forward-only").state_dict()
    with pytest.raises(ValueError, match=r"S of module '0' is the identity"):
        KFACPreconditioner(mlp((6, 8, 3)), loss_fn=CE, fisher="mc").load_state_dict(identity)
    with pytest.raises(ValueError, match=r"S of module '0' is a matrix"):
        KFACPreconditioner(mlp((6, 8, 3)), loss_fn=CE, fisher="forward-only").load_state_dict(state)
    KFACPreconditioner(mlp((6, 8, 3)), loss_fn=CE, fisher="mc").load_state_dict(state)


# -- 10. non-finite statistics --------------------------------------------------------------------
def test_non_finite_statistics_skip_the_preconditioner_step():
    model = mlp((6, 8, 3), seed=14)
    precond = KFACPreconditioner(model, loss_fn=CE, damping=0.05)
    X, y = make_data(3, "ce", (8,), (6,), seed=140)[0]
    CE(model(X), y).backward()
    assert precond.step() is True
    state = copy.deepcopy(precond.state_dict())
    model.zero_grad()
    X[3, 2] = float("nan")
    CE(model(X), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="module '0'"):
        assert precond.step() is False
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    assert precond.steps == 1
    after = precond.state_dict()["layers"]
    for name in ("0", "2"):
        for key in ("A", "S"):
            assert torch.equal(after[name][key], state["layers"][name][key])


def test_non_finite_statistics_skip_the_kfac_step():
    model = mlp((6, 8, 3), layernorm=True, seed=15)
    opt = KFAC(model, 0.1, loss_fn=CE, damping=0.05, **FIXED)
    X, y = make_data(3, "ce", (8,), (6,), seed=150)[0]
    CE(model(X), y).backward()
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.zero_grad()
    X[0, 0] = float("inf")
    CE(model(X), y).backward()
    with pytest.warns(RuntimeWarning, match="module '0'"):
        opt.step()
    for p, before, buf in zip(model.parameters(), params, buffers, strict=True):
        assert torch.equal(p.detach(), before)
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)
    assert opt.preconditioner.steps == 1


# -- 11. Conv2d -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ekfac", [False, True])
def test_conv2d_step_matches_the_unfolded_dense_formula(ekfac):
    """A conv is a Linear layer over its patches: ``T`` = the number of output locations."""
    N, damping, eps = 4, 0.05, 0.9
    model = init(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)
        ),
        seed=16,
    )
    tap = Tap(model)
    precond = KFACPreconditioner(model, loss_fn=CE, damping=damping, ekfac=ekfac, factor_decay=eps)
    g = gen(160)
    X, y = randn(N, 2, 5, 5, g=g), torch.randint(0, 4, (N,), generator=g)
    CE(model(X), y).backward()
    assert tap.positions("0")[0].shape == (N, 9, 18)  # 3x3 locations, 2·3·3 patch entries
    stats = {name: tap.stats(name, joint=True) for name in ("0", "3")}
    G = {name: grad_matrix(tap.modules[name], True) for name in ("0", "3")}
    assert precond.step() is True
    state = precond.state_dict()["layers"]
    for name, (A, S, Gn) in stats.items():
        assert_rel_close(state[name]["A"], A, what=f"A {name}")
        assert_rel_close(state[name]["S"], S, what=f"S {name}")
        if ekfac:
            expected = dense_ekfac(A, S, Gn, G[name], damping, eps, N)
        else:
            expected = dense_pi(A, S, G[name], damping)
        assert_rel_close(preconditioned(tap.modules[name]), expected, what=name)


# -- 12. a module called twice --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reduction", "ekfac"),
    [
        ("mean", False),
        ("sum", False),
        ("mean", True),
    ],
)
def test_module_called_twice_is_one_block_over_two_positions(reduction, ekfac):
    """Â averages over both calls' inputs, Ŝ sums both calls' output gradients (times c)."""
    N, damping, eps = 8, 0.05, 0.8
    model = called_twice(4, 3, seed=17)  # head(tanh(lin(tanh(lin(x))))): lin over two positions
    tap = Tap(model)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    precond = KFACPreconditioner(
        model, loss_fn=loss_fn, damping=damping, ekfac=ekfac, factor_decay=eps
    )
    assert precond.modules == ["lin", "head"]
    X, y = make_data(3, "ce", (N,), (4,), seed=170)[0]
    loss_fn(model(X), y).backward()
    c = N if reduction == "mean" else 1
    A, S, Gn = tap.stats("lin", joint=True, c=c)
    assert tap.positions("lin")[0].shape == (N, 2, 4)
    G = grad_matrix(model.lin, True)
    assert precond.step() is True
    state = precond.state_dict()["layers"]["lin"]
    assert_rel_close(state["A"], A, what="A")
    assert_rel_close(state["S"], S, what="S")
    expected = dense_ekfac(A, S, Gn, G, damping, eps, c) if ekfac else dense_pi(A, S, G, damping)
    assert_rel_close(preconditioned(model.lin), expected, what="step")


def test_failed_refresh_keeps_the_last_good_decomposition(monkeypatch):
    model = mlp((4, 3), seed=3)
    pre = KFACPreconditioner(model, loss_fn=CE, inverse_every=2, damping=0.1, kl_clip=None)
    g = gen(5)

    def one_step() -> bool:  # a new batch every step: the running factors move
        X, y = randn(8, 4, g=g), torch.randint(0, 3, (8,), generator=g)
        model.zero_grad()
        CE(model(X), y).backward()
        return pre.step()

    def decomposition() -> list[Tensor]:
        parts = pre.state_dict()["layers"]["0"]["decomposed"]  # per slot: (S, A) factor states
        return [t.clone() for part in parts for F in part for t in F if isinstance(t, Tensor)]

    one_step()  # step 0 decomposes
    good = decomposition()
    one_step()  # step 1 moves the running factors on

    from kronfac.errors import NotPSDError
    from kronfac.linalg import DenseFactor

    def fail(self):
        raise NotPSDError("planted failure")

    monkeypatch.setattr(DenseFactor, "eigenbasis", fail)
    with pytest.warns(RuntimeWarning, match=r"'0'.*planted failure.*last good"):
        assert one_step()  # step 2 refreshes: the failure keeps the step-0 decomposition
    kept = decomposition()
    assert all(torch.equal(a, b) for a, b in zip(kept, good, strict=True))
    monkeypatch.undo()
    one_step()  # step 3: no refresh due
    one_step()  # step 4 refreshes again
    assert not all(torch.equal(a, b) for a, b in zip(decomposition(), good, strict=True))


# -- 11. the optimizer on the engine: the factors of compute_factors ----------------------------
def seq_batch(loss: str, seed: int = 150):
    """``({"x", "attention_mask"}, y)``: 3 sequences of 4 positions, the last padded twice."""
    lengths, T = (4, 4, 2), 4
    xs, ys, cls = sequences(lengths, seed=seed)
    X = {"x": padded(xs, T, 3.0), "attention_mask": padding_mask(lengths, T)}
    if loss == "ce":  # [N, V, T] logits; padded and one ignored target are ignore_index
        y = padded(cls, T, -100)
        y[0, 1] = -100
    elif loss == "mse":
        y = padded(ys, T, 7.0)
    else:
        y = padded([(t > 0).to(DT) for t in ys], T, 1.0)
    return X, y


def optimizer_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """``compute_factors`` draws the optimizer's MC labels: the likelihood's ``sample_fast``.

    The optimizer samples cross-entropy's labels by the inverse CDF, ``compute_factors`` (for
    curvlinops' labels per seed) with ``torch.multinomial``; with this, the same seed draws the
    same labels in both, and their factors must agree exactly.
    """
    monkeypatch.setattr(CategoricalLikelihood, "sample", CategoricalLikelihood.sample_fast)


def seq_forward(loss: str):
    if loss == "ce":
        return lambda m, X: m(**X).transpose(1, 2)
    return lambda m, X: m(**X)


@pytest.mark.parametrize("fisher", ["empirical", "mc", "type-2"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_factors_after_one_step_equal_compute_factors(loss, reduction, fisher, monkeypatch):
    """``factor_decay=0``: the running factors are those of ``compute_factors`` on the batch.

    Sequences with an attention mask (padded positions leave the factors and ``D``) and, for
    cross-entropy, ``ignore_index`` targets; the same seed draws the same MC labels (the
    optimizer's sampler in both: :func:`optimizer_labels`).
    """
    if loss != "ce" and fisher == "empirical":  # padded MSE / BCE terms are in the user's loss
        X, y = seq_batch(loss)
        X = {"x": X["x"]}
    else:
        X, y = seq_batch(loss)
    model = PerPosition(mlp((4, 5, 3), seed=16))
    loss_fn = LOSSES[loss](reduction=reduction, **({"ignore_index": -100} if loss == "ce" else {}))
    forward = seq_forward(loss)
    precond = KFACPreconditioner(
        model, loss_fn=loss_fn, fisher=fisher, factor_decay=0.0, seed=5, damping=0.1
    )
    loss_fn(forward(model, X), y).backward()
    assert precond.step() is True
    optimizer_labels(monkeypatch)
    ref = kronfac.compute_factors(model, loss_fn, [(X, y)], fisher=fisher, forward=forward, seed=5)
    ours = precond.factors()
    for name in ("net.0", "net.2"):
        assert_rel_close(ours[name].A, ref[name].A, what=f"A {name}")
        assert_rel_close(ours[name].S, ref[name].S, what=f"S {name}")


def _grouped_conv_case():
    model = init(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten()), seed=17)
    model.append(init(nn.Linear(6 * 9, 3), seed=18))
    g = gen(160)
    return model, nn.CrossEntropyLoss(), randn(5, 4, 5, 5, g=g), torch.randint(0, 3, (5,))


def _embedding_case():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4, padding_idx=0)
            self.out = nn.Linear(4, 3)

        def forward(self, idx):
            return self.out(torch.tanh(self.emb(idx))).transpose(1, 2)

    g = gen(170)
    idx = torch.randint(0, 7, (4, 5), generator=g)
    return init(Tokens(), seed=19), nn.CrossEntropyLoss(), idx, torch.randint(0, 3, (4, 5))


def _low_rank_case():
    model = mlp((24, 20, 3), seed=20)
    g = gen(180)
    return model, nn.CrossEntropyLoss(), randn(30, 24, g=g), torch.randint(0, 3, (30,))


CASES = {
    "grouped-conv": _grouped_conv_case,
    "embedding": _embedding_case,
    "low-rank": _low_rank_case,
}


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_conv_embedding_and_low_rank_are_preconditioned(case, fisher, monkeypatch):
    """Covered like every layer: the factors are compute_factors' (with the optimizer's MC
    labels, :func:`optimizer_labels`), and the step applies the damped inverse of
    ``kronfac.KFAC.from_factors(precond.factors(), model)``."""
    model, loss_fn, X, y = CASES[case]()
    options = {"rank": 4, "rank_threshold": 20} if case == "low-rank" else {}
    precond = KFACPreconditioner(
        model,
        loss_fn=loss_fn,
        fisher=fisher,
        factor_decay=0.0,
        inverse_every=1,
        kl_clip=None,
        damping=0.1,
        seed=3,
        **options,
    )
    assert precond.modules == [
        n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear, nn.Embedding)
    ]
    loss_fn(model(X), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert precond.step() is True
    optimizer_labels(monkeypatch)
    ref = kronfac.compute_factors(model, loss_fn, [(X, y)], fisher=fisher, seed=3, **options)
    ours = precond.factors()
    for name in ref:
        for a, b in zip(ours[name], ref[name], strict=True):
            if isinstance(b, kronfac.LowRankFactor):
                a, b = a.to_dense(), b.to_dense()
            assert_rel_close(a, b, what=f"{case} {name}")
    K_inv = kronfac.KFAC.from_factors(ours, model).inverse(0.1, heuristic=True)
    expected = K_inv @ {n: grads[n] for n in K_inv.param_names}
    for n, v in expected.items():
        assert_rel_close(dict(model.named_parameters())[n].grad, v, what=f"{case} step {n}")


@pytest.mark.parametrize("mode", ["pi", "tikhonov"])
def test_the_step_is_the_operator_of_its_factors(mode):
    """Over a few steps (EMA, stale refreshes), the step applies ``K⁻¹`` of the factors as last
    decomposed: π-damping is ``KFAC.inverse(δ, heuristic=True)``, Tikhonov ``exact=True``."""
    model = mlp((6, 8, 3), seed=21)
    precond = KFACPreconditioner(
        model, loss_fn=CE, damping_mode=mode, damping=0.05, inverse_every=2, kl_clip=None
    )
    for k in range(4):
        X, y = make_data(3, "ce", (8,), (6,), seed=190 + k)[0]
        model.zero_grad()
        CE(model(X), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        refresh = k % 2 == 0
        assert precond.step() is True
        if refresh:
            K = kronfac.KFAC.from_factors(precond.factors(), model)
        K_inv = K.inverse(0.05, heuristic=mode == "pi", exact=mode == "tikhonov")
        for n, v in (K_inv @ grads).items():
            assert_rel_close(dict(model.named_parameters())[n].grad, v, what=f"step {k} {n}")


def test_ekfac_scales_are_updated_every_scale_every_steps():
    model = mlp((6, 8, 3), seed=22)
    precond = KFACPreconditioner(
        model, loss_fn=CE, ekfac=True, scale_every=2, inverse_every=10, factor_decay=0.5
    )
    seen = []
    for k in range(4):
        X, y = make_data(3, "ce", (8,), (6,), seed=200 + k)[0]
        model.zero_grad()
        CE(model(X), y).backward()
        assert precond.step() is True
        seen.append(precond.state_dict()["layers"]["0"]["scales"][0].clone())
    # steps 0 and 2 update the scales (step 0 after the reset to s aᵀ), steps 1 and 3 do not
    assert torch.equal(seen[1], seen[0]) and torch.equal(seen[3], seen[2])
    assert (seen[2] - seen[1]).abs().max() > 1e-3 * seen[1].abs().max()
