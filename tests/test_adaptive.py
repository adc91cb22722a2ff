"""The adaptive K-FAC step against dense references: the quadratic model, its damping, guards.

The reference of a step is built here with ``torch.func``: the Jacobian of the loss input with
respect to the covered parameters, the loss's Hessian in output space, ``G = Jᵀ H J`` (float64),
and the 2x2 system ``Q c = −b`` with ``Q_ij = t_iᵀ (G + λI) t_j``, ``b_i = gᵀ t_i`` over the
directions the optimizer used (its preconditioned gradient ``Δ`` and previous step ``v``).

Tolerances: with exact forward-mode products (``ggn_products="jvp"``) the optimizer solves the
same float64 system, so only round-off separates them (``1e-8`` relative leaves a wide margin
over the ~1e-12 measured). Finite differences in float64 perturb by
``ε = 3·√(machine ε)·‖θ‖/‖t‖``; their relative error is ``O(ε‖t‖·curvature)``, measured
~1e-7 here, checked against ``1e-5``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import DT, assert_rel_close, gen, make_data, mlp, randn
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from kronfac.optim import KFAC
from kronfac.optim.adaptive import AdaptiveStep
from kronfac.optim.quadratic import RecordedBatch

CE = nn.CrossEntropyLoss()


def batches(n: int, seed: int, width: int = 4, classes: int = 3, count: int = 4):
    g = gen(seed)
    return [
        (randn(n, width, g=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(count)
    ]


def dense_ggn(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``Jᵀ H J`` of the batch's (mean) loss in the flat layout of ``named_parameters()``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out(p):
        return functional_call(model, p, (X,))

    J = jacrev(out)(params)
    J = torch.cat([J[k].reshape(*J[k].shape[:2], -1) for k in params], dim=-1)  # [N, C, P]
    f = out(params).detach()
    H = hessian(lambda o: loss_fn(o, y))(f)  # [N, C, N, C]
    return torch.einsum("ncp,ncmd,mdq->pq", J, H, J)


def flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize(("products", "tol"), [("jvp", 1e-8), ("fd", 1e-5)])
def test_step_is_the_dense_solve_of_the_quadratic_model(products, tol):
    model = mlp((4, 6, 3), "tanh", seed=1)
    opt = KFAC(model, loss_fn=CE, ggn_products=products, damping=0.1, damping_every=100)
    params = dict(model.named_parameters())
    for k, (X, y) in enumerate(batches(10, seed=2)):
        opt.zero_grad()
        CE(model(X), y).backward()
        g = flat(p.grad for p in params.values()).clone()
        theta = flat(p.detach() for p in params.values()).clone()
        v = opt.adaptive_step.velocity
        lam = opt.adaptive_step.damping
        G = dense_ggn(model, CE, X, y)
        opt.step()
        delta = -flat(p.grad for p in params.values())  # the preconditioned direction
        directions = [delta] + ([v] if v is not None else [])
        T = torch.stack(directions)
        Q = T @ G @ T.T + lam * T @ T.T
        c = -torch.linalg.solve(Q, T @ g)
        last = opt.adaptive_step.last
        got = torch.tensor([last["alpha"], last["beta"]][: len(directions)], dtype=DT)
        assert_rel_close(got, c, tol, f"step {k}: (α, β)")
        moved = flat(p.detach() for p in params.values()) - theta
        assert_rel_close(moved, c @ T, tol, f"step {k}: δ = αΔ + βv")
        assert (k == 0) == (len(directions) == 1)  # the momentum direction from step 1 on


class _Scripted:
    """A quadratic model whose loss after the step follows a script (the LM rule's input)."""

    def __init__(self, losses, param):
        self.losses, self.params = iter(losses), [param]

    def loss(self, batches, shift=None):
        return next(self.losses)

    def mean_loss(self, values):  # one process: the entries-weighted mean
        return sum(v * n for v, n in values) / sum(n for _, n in values)

    def agreed(self, value):  # one process: the value itself
        return value

    def views(self, flat):
        return [flat.view(self.params[0].shape)]


def _batch(loss: float) -> RecordedBatch:
    rng = (torch.get_rng_state(), [])
    t = torch.zeros(1)
    return RecordedBatch((), {}, t, t, loss, 1, None, rng)


def test_levenberg_marquardt_rule_on_scripted_reduction_ratios():
    """``ρ = (L(θ + δ) − L(θ)) / M``: > ¾ lowers λ by ω, < ¼ raises it, else it stays;
    only every ``damping_every`` steps; within the bounds; a non-finite loss undoes the step."""
    p = nn.Parameter(torch.zeros(2, dtype=DT))
    M = -1.0  # the model's predicted change
    # L(θ) = 1: after-losses giving ρ = 0.9, 0.5, 0.1, 0.9 (at the adapting steps 0, 2, 4, 6)
    script = _Scripted([1 - 0.9, 1 - 0.5, 1 - 0.1, 1 - 0.9, math.nan], p)
    step = AdaptiveStep(
        script,  # type: ignore[arg-type]
        damping=1.0,
        damping_every=2,
        decay=0.5,
        min_damping=0.2,
        max_damping=3.0,
        momentum=True,
        weight_decay=0.0,
    )
    omega = 0.5**2
    seen = []
    for _ in range(8):
        step.adapt([_batch(1.0)], torch.zeros(2, dtype=DT), M)
        seen.append(step.damping)
    expected = [omega, omega, omega, omega, 1.0, 1.0, max(omega, 0.2), max(omega, 0.2)]
    assert seen == pytest.approx(expected)
    assert step.last["rho"] == pytest.approx(0.9)
    # a non-finite loss after the step: undone, λ raised by ω⁴ (capped), momentum dropped
    step.velocity = torch.ones(2, dtype=DT)
    with torch.no_grad():
        p.add_(1.0)
    step.adapt([_batch(1.0)], torch.ones(2, dtype=DT), M)
    assert torch.equal(p.detach(), torch.zeros(2, dtype=DT))
    assert step.damping == 3.0 and step.velocity is None


class _Curvature(_Scripted):
    """A quadratic model with a given Gauss-Newton matrix in the directions' space."""

    def __init__(self, G, param):
        super().__init__([], param)
        self.G = G

    def curvature(self, batches, directions):
        return directions.double() @ self.G @ directions.double().T


def test_a_decrease_below_the_loss_floor_raises_the_damping():
    """Every supported loss is >= 0: a model predicting ``−M > L(θ) + ½w‖θ‖²`` is outside its
    trust region; λ rises by ``1/ω`` until ``−M`` is within it (the 1-D case in closed form:
    ``M(λ) = −½ (gᵀt)² / (tᵀGt + λ tᵀt)``)."""
    p = nn.Parameter(torch.full((2,), 3.0, dtype=DT))
    G = torch.diag(torch.tensor([1e-6, 1e-6], dtype=DT))  # nearly flat: a huge predicted drop
    g = torch.tensor([1.0, 0.0], dtype=DT)
    t = -g
    w, loss = 0.01, 0.2
    floor = loss + 0.5 * w * 18.0  # L + ½ w ‖θ‖², ‖θ‖² = 18
    step = AdaptiveStep(
        _Curvature(G, p),  # type: ignore[arg-type]
        damping=1e-4,
        damping_every=1,
        decay=0.5,
        min_damping=1e-8,
        max_damping=1e4,
        momentum=False,
        weight_decay=w,
    )

    def M(lam):
        return -0.5 / (1e-6 + lam + w)

    assert -M(1e-4) > floor  # the guard has work to do
    found = step.coefficients([_batch(loss)], g, t)
    assert found is not None
    _, c, change = found
    lam = step.damping
    assert float(c[0]) == pytest.approx(1 / (1e-6 + lam + w), rel=1e-12)
    assert change == pytest.approx(M(lam), rel=1e-12)
    assert -change <= floor < -M(lam * 0.5)  # the smallest λ·2^k within the floor
    assert math.log2(lam / 1e-4) == pytest.approx(round(math.log2(lam / 1e-4)))
    # within the floor already: λ unchanged
    step.damping = 10.0
    step.coefficients([_batch(loss)], g, t)
    assert step.damping == 10.0


def test_non_finite_loss_leaves_the_parameters_and_raises_the_damping():
    model = mlp((4, 6, 3), "tanh", seed=3)
    opt = KFAC(model, loss_fn=CE, damping=0.1)
    (X, y), (X2, y2) = batches(8, seed=4, count=2)
    opt.zero_grad()
    CE(model(X), y).backward()
    opt.step()
    before = copy.deepcopy(model.state_dict())
    lam = opt.adaptive_step.damping
    X2[0, 0] = math.nan
    opt.zero_grad()
    CE(model(X2), y2).backward()
    with pytest.warns(RuntimeWarning, match="Non-finite"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert opt.adaptive_step.damping > lam and opt.adaptive_step.velocity is None


def test_no_predicted_decrease_is_rejected():
    """A zero gradient: the model predicts no decrease, the step is rejected."""
    model = mlp((4, 6, 3), "tanh", seed=5)
    opt = KFAC(model, loss_fn=CE, damping=0.1)
    X, y = batches(8, seed=6, count=1)[0]
    opt.zero_grad()
    loss = CE(model(X), y)
    (0 * loss).backward()
    before = copy.deepcopy(model.state_dict())
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert opt.adaptive_step.damping > 0.1


def test_uncovered_parameters_get_adams_update():
    model = mlp((4, 6, 3), "tanh", seed=7, layernorm=True)
    norm = model[1]
    assert isinstance(norm, nn.LayerNorm)
    reference = copy.deepcopy(norm)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    opt = KFAC(model, loss_fn=CE, uncovered_lr=1e-2, damping=0.1)
    assert set(opt.preconditioner.modules) == {"0", "3"}
    for X, y in batches(8, seed=8, count=3):
        opt.zero_grad()
        CE(model(X), y).backward()
        for q, p in zip(reference.parameters(), norm.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt.step()
        adam.step()
        for q, p in zip(reference.parameters(), norm.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("ekfac", [False, True])
def test_resume_is_bit_identical(ekfac):
    data = batches(8, seed=9, count=30)

    def fresh(seed):
        model = mlp((4, 8, 3), "tanh", seed=seed, layernorm=True).float()
        return model, KFAC(model, loss_fn=CE, ekfac=ekfac, damping=0.1, inverse_every=3)

    def train(model, opt, part):
        for X, y in part:
            opt.zero_grad()
            CE(model(X.float()), y).backward()
            opt.step()

    model, opt = fresh(0)
    train(model, opt, data[:15])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, data[15:])
    model2, opt2 = fresh(1)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    train(model2, opt2, data[15:])
    for (name, p1), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(p1, p2), name
    assert opt.adaptive_step.damping == opt2.adaptive_step.damping


def test_a_loss_on_a_transformed_output_needs_forward():
    """The adaptive step re-runs the batch: it needs the function to the loss input."""

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 5)

        def forward(self, x):
            return self.lin(x)  # [N, T, 5]

    torch.manual_seed(0)
    model = Seq().double()
    X, y = randn(3, 6, 4, g=gen(10)), torch.randint(0, 5, (3, 6))
    opt = KFAC(model, loss_fn=CE)
    CE(model(X).reshape(-1, 5), y.reshape(-1)).backward()
    with pytest.raises(ValueError, match=r"loss input is not the model's output.*forward="):
        opt.step()
    opt = KFAC(model, loss_fn=CE, forward=lambda m, X: m(X).reshape(-1, 5))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = CE(model(X).reshape(-1, 5), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_training_reduces_the_loss_with_the_defaults():
    X, y = make_data(3, "ce", (64,), (6,), seed=11)[0]
    y = (X @ randn(6, 3, g=gen(12))).argmax(1)
    model = mlp((6, 16, 3), "tanh", seed=13)
    opt = KFAC(model, loss_fn=CE)
    with torch.no_grad():
        start = float(CE(model(X), y))
    for _ in range(20):
        opt.zero_grad()
        CE(model(X), y).backward()
        opt.step()
    with torch.no_grad():
        assert float(CE(model(X), y)) < 0.3 * start


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"adaptive": False}, ValueError, "lr is required with adaptive=False"),
        ({"damping": lambda k: 0.1}, ValueError, "damping must be a number"),
        ({"damping": 0.0}, ValueError, "damping must be positive"),
        ({"damping_every": 0}, ValueError, "damping_every must be a positive integer"),
        ({"damping_decay": 1.0}, ValueError, r"damping_decay must be in \(0, 1\)"),
        ({"damping_range": (1.0, 2.0)}, ValueError, "damping_range must hold the damping"),
        ({"damping_ratio": 0.0}, ValueError, "damping_ratio must be positive"),
        ({"ggn_products": "exact"}, ValueError, "Unknown ggn_products 'exact'"),
        ({"uncovered": "lion"}, ValueError, "Unknown uncovered 'lion'"),
        ({"uncovered_lr": -1.0}, ValueError, "uncovered_lr must be positive"),
        ({"kl_clip": 0.1}, ValueError, "kl_clip applies to adaptive=False"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        KFAC(mlp((4, 6, 3)), loss_fn=CE, **options)


def test_step_without_a_recorded_batch():
    model = mlp((4, 6, 3))
    opt = KFAC(model, loss_fn=CE)
    with pytest.raises(RuntimeError, match="without a recorded batch"):
        opt.step()


def test_accumulated_micro_batches_step_as_their_whole_batch():
    """Two half batches (each loss halved) take the step of the whole batch.

    Type-2 (no labels drawn) and exact products: only round-off separates the two runs.
    """
    data = batches(8, seed=12, count=3)
    models = [mlp((4, 6, 3), "tanh", seed=13) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [
        KFAC(m, loss_fn=CE, fisher="type-2", damping_every=1, ggn_products="jvp") for m in models
    ]
    for X, y in data:
        for k, (model, opt) in enumerate(zip(models, opts, strict=True)):
            opt.zero_grad()
            parts = [(X, y)] if k == 0 else [(X[:4], y[:4]), (X[4:], y[4:])]
            for Xp, yp in parts:
                (CE(model(Xp), yp) / len(parts)).backward()
            opt.step()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert_rel_close(q, p, tol=1e-10, what=name)
    assert math.isclose(opts[0].adaptive_step.damping, opts[1].adaptive_step.damping)


def test_a_grad_scaler_leaves_the_steps_unchanged():
    """``scaler.scale(loss).backward(); scaler.step(opt)``: the unscaled run's steps (a power of
    two scales and unscales exactly)."""
    data = batches(8, seed=14, count=4)
    models = [mlp((4, 6, 3), "tanh", seed=15).float() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plain = KFAC(models[0], loss_fn=CE)
    scaled = KFAC(models[1], loss_fn=CE, grad_scaler=scaler)
    for X, y in data:
        plain.zero_grad()
        CE(models[0](X.float()), y).backward()
        plain.step()
        scaled.zero_grad()
        scaler.scale(CE(models[1](X.float()), y)).backward()
        scaler.step(scaled)
        scaler.update()
    assert scaler.get_scale() == 2.0**10  # no step overflowed
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert_rel_close(q, p, tol=1e-6, what=name)
