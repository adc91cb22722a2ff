"""``kronfac.compat.bayesian_lora.model_evidence`` / ``variance`` against dense references.

1. Dense float64 references built here with ``torch.func``: a LoRA-shaped model (a frozen base
   plus ``lora_A`` → tanh → ``lora_B``) at one datum, where K-FAC is exact (one position per
   layer, type-2: ``A = a aᵀ``, ``S = J_sᵀ Λ J_s`` with ``Λ = diag p − p pᵀ``), so each diagonal
   block of the GGN ``Jᵀ Λ J`` equals ``S ⊗ A`` (checked). The factors are passed as bayesian-lora
   passes them — roots ``F`` with ``F Fᵀ`` the factor, one ``[n_lora, n_lora]`` and one
   ``[side, n_kfac]`` per module — and the evidence ``LL − ½δ‖θ‖² + ½P log δ − ½ log det(H + δI)``,
   its gradient in ``s2`` and the predictive covariance ``J (H + δI)⁻¹ Jᵀ`` are compared with
   dense ``logdet`` / ``inv`` of ``H = diag_l(G_ll)``.
2. bayesian-lora 0.0.6 (where installed): ``variance`` agrees by design (the same exact
   posterior); ``model_evidence`` differs by the documented
   ``δ Σ_p (‖θ_p‖ + ½‖θ_p‖²) + log det(I + s2·H) − ½ n_lora d_L log s2``, checked exactly.
3. Clear errors on bad input.

Tolerances: float64 round-off only (``1e-10`` relative; a ``P ≤ 40`` dense ``logdet`` / ``inv``
of a matrix with condition number below ``1e4`` loses well under ``1e-12``).
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import DT, assert_rel_close, gen, init, randn, require_peer
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from kronfac.compat import bayesian_lora as kb

TOL = 1e-10
D_IN, N_LORA, C, N_KFAC = 5, 2, 3, 3
NAMES = ("lora_A.weight", "lora_B.weight")


class LoraToy(nn.Module):
    """``f(x) = base(x) + lora_B(tanh(lora_A(x)))`` with the base frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(D_IN, C)
        self.lora_A = nn.Linear(D_IN, N_LORA, bias=False)
        self.lora_B = nn.Linear(N_LORA, C, bias=False)
        self.base.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(torch.tanh(self.lora_A(x)))


@pytest.fixture
def model() -> nn.Module:
    return init(LoraToy(), 7).to(DT)


@pytest.fixture
def peer():
    return require_peer("bayesian_lora.main")


def root(M: Tensor, cols: int) -> Tensor:
    """``F: [side, cols]`` with ``F Fᵀ = M`` (exact when ``rank M ≤ cols ≤ side``)."""
    lam, Q = torch.linalg.eigh(M)
    return (Q * lam.clamp(min=0).sqrt())[:, -cols:]


def jacobians(model: nn.Module, X: Tensor) -> dict[str, Tensor]:
    """Parameter name → ``[batch, C, *shape]``, as ``torch.func.jacrev`` over the LoRA weights."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in NAMES}
    return jacrev(lambda p: functional_call(model, p, (X,)))(params)


def flat(J: dict[str, Tensor]) -> Tensor:
    """``[batch, C, P]`` in ``NAMES`` order, each weight row-major."""
    return torch.cat([J[n].flatten(2) for n in NAMES], dim=2)


def exact_case(model: nn.Module):
    """One datum: the roots, the block-diagonal GGN ``H``, ``θ*`` and ``LL`` (checked exact)."""
    x, y = randn(1, D_IN, g=gen(3)), 1
    logits = model(x)[0].detach()
    p = logits.softmax(-1)
    Lam = torch.diag(p) - torch.outer(p, p)
    J = flat(jacobians(model, x))[0]  # [C, P]
    G = J.T @ Lam @ J
    a_A = x[0]
    s_A = model.lora_A(x)[0].detach()
    a_B = torch.tanh(s_A)
    J_s = model.lora_B.weight.detach() * (1 - a_B.square())  # ∂f/∂s_A, [C, N_LORA]
    S_A, A_A = J_s.T @ Lam @ J_s, torch.outer(a_A, a_A)
    S_B, A_B = Lam, torch.outer(a_B, a_B)
    P_A = N_LORA * D_IN
    H = torch.block_diag(torch.kron(S_A, A_A), torch.kron(S_B, A_B))
    assert_rel_close(G[:P_A, :P_A], H[:P_A, :P_A], TOL, "K-FAC exact, lora_A")
    assert_rel_close(G[P_A:, P_A:], H[P_A:, P_A:], TOL, "K-FAC exact, lora_B")
    factors = {
        "lora_A": (root(A_A, N_KFAC), root(S_A, N_LORA)),
        "lora_B": (root(A_B, N_LORA), root(S_B, N_KFAC)),
    }
    theta = torch.cat([dict(model.named_parameters())[n].detach().flatten() for n in NAMES])
    LL = logits.log_softmax(-1)[y]
    return factors, H, theta, LL


def dense_evidence(LL: Tensor, theta: Tensor, H: Tensor, s2: Tensor) -> Tensor:
    delta, P = 1 / s2, H.shape[0]
    return (
        LL
        - 0.5 * delta * theta.square().sum()
        + 0.5 * P * delta.log()
        - 0.5 * torch.logdet(H + delta * torch.eye(P, dtype=DT))
    )


def test_signatures_match_bayesian_lora(peer):
    for fn in ("model_evidence", "variance"):
        ours = inspect.signature(getattr(kb, fn)).parameters
        theirs = inspect.signature(getattr(peer, fn)).parameters
        assert list(ours) == list(theirs), fn
        assert all(p.default is inspect.Parameter.empty for p in ours.values()), fn


# --------------------------------------------------------------------------------------------
# 1. Dense references


@pytest.mark.parametrize("s2", [0.05, 0.5, 20.0])
def test_evidence_equals_dense_laplace(model, s2):
    factors, H, theta, LL = exact_case(model)
    s2 = torch.tensor(s2, dtype=DT)
    got = kb.model_evidence(model, LL, factors, N_LORA, N_KFAC, s2)
    assert got.shape == () and got.dtype == DT
    assert_rel_close(got, dense_evidence(LL, theta, H, s2), TOL, "evidence")


def test_evidence_gradient_in_s2_equals_dense(model):
    factors, H, theta, LL = exact_case(model)
    s2 = torch.tensor(0.3, dtype=DT, requires_grad=True)
    (grad,) = torch.autograd.grad(kb.model_evidence(model, LL, factors, N_LORA, N_KFAC, s2), s2)
    s2_ref = s2.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(dense_evidence(LL, theta, H, s2_ref), s2_ref)
    assert_rel_close(grad, want, TOL, "d evidence / d s2")


def test_evidence_follows_shape_and_dtype_of_inputs(model):
    factors, H, theta, LL = exact_case(model)
    got = kb.model_evidence(model, LL.float(), factors, N_LORA, N_KFAC, torch.tensor([0.5]))
    assert got.shape == (1,) and got.dtype == torch.float32
    want = dense_evidence(LL, theta, H, torch.tensor(0.5, dtype=DT))
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))


@pytest.mark.parametrize("s2", [0.05, 0.5, 20.0])
def test_variance_equals_dense_predictive(model, s2):
    factors, H, _, _ = exact_case(model)
    X = randn(4, D_IN, g=gen(5))
    J = jacobians(model, X)
    Sigma = torch.linalg.inv(H + torch.eye(H.shape[0], dtype=DT) / s2)
    Jf = flat(J)
    want = Jf @ Sigma @ Jf.mT
    got = kb.variance(
        {"input_ids": X}, J, factors, torch.tensor(s2, dtype=DT), C, N_LORA, N_KFAC, "cpu"
    )
    assert got.shape == (4, C, C) and got.dtype == DT
    assert_rel_close(got, want, TOL, "variance")


def test_variance_transposed_and_prefixed_jacobians(model):
    """A ``Conv1D``-layout ``[B, C, d_in, d_out]`` Jacobian and a prefixed parameter name."""
    factors, _, _, _ = exact_case(model)
    X = randn(2, D_IN, g=gen(6))
    J = jacobians(model, X)
    inputs = SimpleNamespace(input_ids=X)
    want = kb.variance(inputs, J, factors, 0.5, C, N_LORA, N_KFAC, "cpu")
    other = {"base_model.model.lora_A.weight": J["lora_A.weight"].mT, "lora_B.weight": J[NAMES[1]]}
    got = kb.variance(inputs, other, factors, 0.5, C, N_LORA, N_KFAC, "cpu")
    assert_rel_close(got, want, TOL, "transposed / prefixed")


def test_variance_keeps_float32(model):
    factors, _, _, _ = exact_case(model)
    X = randn(2, D_IN, g=gen(8))
    J = jacobians(model, X)
    want = kb.variance({"input_ids": X}, J, factors, 0.5, C, N_LORA, N_KFAC, "cpu")
    J32 = {k: v.float() for k, v in J.items()}
    got = kb.variance({"input_ids": X}, J32, factors, 0.5, C, N_LORA, N_KFAC, "cpu")
    assert got.dtype == torch.float32
    assert_rel_close(got.double(), want, 1e-5, "float32")


# --------------------------------------------------------------------------------------------
# 2. bayesian-lora 0.0.6


def random_factors(g: torch.Generator) -> dict[str, tuple[Tensor, Tensor]]:
    """Random roots in bayesian-lora's layout (Cholesky factors lower-triangular)."""
    return {
        "lora_A": (randn(D_IN, N_KFAC, g=g), randn(N_LORA, N_LORA, g=g).tril()),
        "lora_B": (randn(N_LORA, N_LORA, g=g).tril(), randn(C, N_KFAC, g=g)),
    }


def dense_H(factors) -> Tensor:
    return torch.block_diag(*[torch.kron(S @ S.T, A @ A.T) for A, S in factors.values()])


@pytest.fixture
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("s2", [0.1, 2.0])
def test_variance_equals_bayesian_lora(model, peer, s2):
    factors = random_factors(gen(9))
    X = randn(3, D_IN, g=gen(10))
    J = jacobians(model, X)
    inputs = SimpleNamespace(input_ids=X)
    s2 = torch.tensor(s2)
    want = peer.variance(inputs, J, factors, s2, C, N_LORA, N_KFAC, "cpu")
    got = kb.variance(inputs, J, factors, s2, C, N_LORA, N_KFAC, "cpu")
    assert got.shape == want.shape == (3, C, C)
    assert_rel_close(got, want, TOL, "variance vs bayesian-lora")


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("s2", [0.1, 2.0])
def test_evidence_differs_from_bayesian_lora_as_documented(model, peer, s2):
    """``E_0.0.6 − E = δ Σ_p(‖θ_p‖ + ½‖θ_p‖²) + log det(I + s2·H) − ½ n_lora d_L log s2``."""
    factors = random_factors(gen(12))
    LL, s2 = torch.tensor(-3.0), torch.tensor(s2)
    want = peer.model_evidence(model, LL, factors, N_LORA, N_KFAC, s2)
    got = kb.model_evidence(model, LL, factors, N_LORA, N_KFAC, s2)
    H = dense_H(factors)
    norms = torch.stack([model.get_parameter(n).detach().norm() for n in NAMES])
    d_L = max(*factors["lora_B"][0].shape, *factors["lora_B"][1].shape)  # the last module's
    difference = (
        (norms + 0.5 * norms.square()).sum() / s2
        + torch.logdet(torch.eye(H.shape[0]) + s2 * H)
        - 0.5 * N_LORA * d_L * math.log(s2)
    )
    assert_rel_close(want - got, difference, TOL, "evidence difference")
    theta = torch.cat([model.get_parameter(n).detach().flatten() for n in NAMES])
    assert_rel_close(got, dense_evidence(LL, theta, H, s2), TOL, "evidence")


# --------------------------------------------------------------------------------------------
# 3. Errors


@pytest.mark.parametrize("s2", [0.0, -1.0, math.nan, math.inf, torch.tensor([1.0, 2.0])])
def test_bad_prior_variance(model, s2):
    factors, _, _, LL = exact_case(model)
    with pytest.raises(ValueError, match="s2"):
        kb.model_evidence(model, LL, factors, N_LORA, N_KFAC, s2)
    X = randn(2, D_IN, g=gen(1))
    with pytest.raises(ValueError, match="s2"):
        kb.variance({"input_ids": X}, jacobians(model, X), factors, s2, C, N_LORA, N_KFAC, "cpu")


@pytest.mark.parametrize(("n_lora", "n_kfac"), [(3, N_KFAC), (N_LORA, 4)])
def test_factor_layout_must_fit_ranks(model, n_lora, n_kfac):
    factors, _, _, LL = exact_case(model)
    with pytest.raises(ValueError, match="Factors of module 'lora_A' have shapes"):
        kb.model_evidence(model, LL, factors, n_lora, n_kfac, 1.0)
    X = randn(2, D_IN, g=gen(1))
    with pytest.raises(ValueError, match="Factors of module 'lora_A' have shapes"):
        kb.variance({"input_ids": X}, jacobians(model, X), factors, 1.0, C, n_lora, n_kfac, "cpu")


def test_evidence_module_errors(model):
    factors, _, _, LL = exact_case(model)
    with pytest.raises(ValueError, match="'lora_C' of the factors is not in the model"):
        kb.model_evidence(model, LL, {"lora_C": factors["lora_A"]}, N_LORA, N_KFAC, 1.0)
    wrong = (randn(D_IN + 1, N_KFAC, g=gen(2)), factors["lora_A"][1])  # a bias column
    with pytest.raises(ValueError, match=r"cover 12 parameters.*has 10"):
        kb.model_evidence(model, LL, {"lora_A": wrong}, N_LORA, N_KFAC, 1.0)
    with pytest.raises(ValueError, match="no module"):
        kb.model_evidence(model, LL, {}, N_LORA, N_KFAC, 1.0)


def test_variance_input_errors(model):
    factors, _, _, _ = exact_case(model)
    X = randn(2, D_IN, g=gen(1))
    J = jacobians(model, X)
    args = (factors, 1.0, C, N_LORA, N_KFAC, "cpu")
    with pytest.raises(ValueError, match="input_ids"):
        kb.variance({"ids": X}, J, *args)
    with pytest.raises(ValueError, match=r"\[batch, n_logits, d_out, d_in\] = \[3, 3, 2, 5\]"):
        kb.variance({"input_ids": randn(3, D_IN, g=gen(1))}, J, *args)
    with pytest.raises(ValueError, match=r"= \[2, 4, 2, 5\]"):
        kb.variance({"input_ids": X}, J, factors, 1.0, C + 1, N_LORA, N_KFAC, "cpu")
    with pytest.raises(ValueError, match=r"module 'lora_B'.*found none"):
        kb.variance({"input_ids": X}, {"lora_A.weight": J["lora_A.weight"]}, *args)
    doubled = {**J, "a.lora_B.weight": J["lora_B.weight"], "b.lora_B.weight": J["lora_B.weight"]}
    del doubled["lora_B.weight"]
    with pytest.raises(ValueError, match="found several"):
        kb.variance({"input_ids": X}, doubled, *args)
