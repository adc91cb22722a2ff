"""``kronfac.Laplace`` against dense float64 references built here with torch.func.

K-FAC is exact for one data point (type-2): each layer's block of the GGN of one datum is
``(Σ_c g_c g_cᵀ) ⊗ (a aᵀ)``, and EKFAC's corrected eigenvalues equal K-FAC's then. So with one
datum, the posterior precision of the Laplace approximation is exactly
``P = blockdiag(G) / T + diag(δ)``, ``G = Jᵀ H J`` the GGN of the **summed** loss (torch.func),
restricted to the blocks of the selected modules. Every closed form (log det, evidence, its
gradient, ``J Σ Jᵀ``, the probit predictive, samples) is checked against that dense matrix with
``torch.linalg``. Round-off tolerances are relative ``1e-9`` (the factors' eigendecompositions
against a dense Cholesky / inverse, float64); Monte-Carlo checks state their standard errors.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from helpers import gen, mlp, randn
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import kronfac

CE = nn.CrossEntropyLoss()


def one_datum(seed: int = 0, C: int = 3, width: int = 4):
    g = gen(seed)
    X = randn(1, width, g=g)
    y = torch.randint(0, C, (1,), generator=g)
    return X, y


def block_ggn(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, names, separate: bool = False
) -> Tensor:
    """The GGN of the summed loss over ``names`` (flat, in that order), block-diagonal per module
    (the prefix of a parameter's name, ``"0.weight"`` → ``"0"``), or per parameter when the
    biases are ``separate``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out(p):
        return functional_call(model, {**params, **p}, (X,))

    sub = {n: params[n] for n in names}
    J = jacrev(out)(sub)
    f = out(sub).detach()
    J = torch.cat([J[n].reshape(*f.shape, -1) for n in names], dim=-1).reshape(f.numel(), -1)
    summed = type(loss_fn)(reduction="sum")
    H = hessian(lambda o: summed(o, y))(f).reshape(f.numel(), f.numel())
    G = J.T @ H @ J
    modules = list(names) if separate else [n.rsplit(".", 1)[0] for n in names]
    sizes = [params[n].numel() for n in names]
    owner = torch.repeat_interleave(
        torch.tensor([sorted(set(modules)).index(m) for m in modules]), torch.tensor(sizes)
    )
    return G * (owner[:, None] == owner[None, :])


def dense_precision(la: kronfac.Laplace, G: Tensor, deltas: dict[str, float] | float) -> Tensor:
    sizes = {}
    for n in la.param_names:
        m = n.rsplit(".", 1)[0]
        sizes[m] = sizes.get(m, 0) + dict(la.model.named_parameters())[n].numel()
    if isinstance(deltas, dict):
        diag = torch.cat([torch.full((sizes[m],), deltas[m], dtype=G.dtype) for m in sizes])
    else:
        diag = torch.full((G.shape[0],), float(deltas), dtype=G.dtype)
    return G / la.temperature + torch.diag(diag)


def assert_close(actual: Tensor, expected: Tensor, tol: float = 1e-9, what: str = "") -> None:
    actual = torch.as_tensor(actual).detach().double()
    expected = torch.as_tensor(expected).detach().double()
    scale = max(float(expected.abs().max()), 1e-300)
    err = float((actual - expected).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3e}, scale {scale:.3e}"


CASES = {
    "kfac": {},
    "ekfac": {"curvature": "ekfac"},
    "low-rank": {"rank": 3, "rank_threshold": 4},
    "separate-bias": {"bias": "separate"},
    "last-layer": {"modules": ["2"]},
    "tempered": {"temperature": 0.3},
}


def build(case: str, prior=0.7, seed: int = 0):
    model = mlp((4, 5, 3), "tanh", seed=seed)
    X, y = one_datum(seed)
    options = dict(CASES[case])
    la = kronfac.Laplace(model, CE, [(X, y)], prior_precision=prior, **options)
    G = block_ggn(model, CE, X, y, la.param_names, separate=case == "separate-bias")
    return model, X, y, la, G


@pytest.mark.parametrize("case", list(CASES))
def test_log_det_and_evidence_match_the_dense_posterior(case):
    model, X, y, la, G = build(case)
    P = dense_precision(la, G, 0.7)
    assert la.num_params == P.shape[0]
    assert_close(la.log_det_posterior_precision(), torch.linalg.slogdet(P)[1], what="log det")
    theta = torch.cat(
        [dict(model.named_parameters())[n].detach().reshape(-1) for n in la.param_names]
    )
    assert_close(la.mean, theta, tol=0, what="mean")
    log_lik = -float(nn.CrossEntropyLoss(reduction="sum")(model(X), y).detach())
    expected = (
        log_lik / la.temperature
        - 0.5 * 0.7 * theta.square().sum()
        + 0.5 * la.num_params * math.log(0.7)
        - 0.5 * torch.linalg.slogdet(P)[1]
    )
    assert_close(la.log_marginal_likelihood(), expected, what="evidence")


@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
def test_float32_evidence_matches_float64(curvature):
    """Small exact eigenvalues of ``H`` survive in float32 (a tolerance of ``p·q`` entries'
    round-off zeroed those below ~0.5% of the largest: the evidence was 3.8 nats off)."""
    torch.manual_seed(0)
    X = torch.randn(256, 64) * torch.logspace(0, -2, 64)  # an input spectrum over 4 decades
    y = torch.randint(0, 10, (256,))
    model = nn.Sequential(nn.Linear(64, 65), nn.Tanh(), nn.Linear(65, 10))
    evidence = {}
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(model).to(dtype)
        data = [(X[i : i + 64].to(dtype), y[i : i + 64]) for i in range(0, 256, 64)]
        la = kronfac.Laplace(m, nn.CrossEntropyLoss(), data, curvature=curvature, fisher="type-2")
        evidence[dtype] = float(la.log_marginal_likelihood())
    assert abs(evidence[torch.float32] - evidence[torch.float64]) < 0.1


@pytest.mark.parametrize("case", ["kfac", "ekfac", "low-rank"])
def test_evidence_gradient_in_the_prior_precision(case):
    """``∂/∂δ log p(D) = −‖θ‖²/2 + P/(2δ) − tr(P⁻¹)/2`` (autograd through the closed form)."""
    _model, _X, _y, la, G = build(case)
    delta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    la.log_marginal_likelihood(delta).backward()
    P = dense_precision(la, G, 0.7)
    expected = (
        -0.5 * la.mean.square().sum()
        + la.num_params / (2 * 0.7)
        - 0.5 * torch.linalg.inv(P).diagonal().sum()
    )
    assert_close(delta.grad, expected, what="d evidence / d delta")


def test_per_module_priors():
    model, X, y, la, G = build("kfac", prior={"0": 0.3, "2": 4.0})
    P = dense_precision(la, G, {"0": 0.3, "2": 4.0})
    assert_close(la.log_det_posterior_precision(), torch.linalg.slogdet(P)[1], what="log det")
    params = dict(model.named_parameters())
    norms = {
        m: sum(float(params[f"{m}.{k}"].detach().square().sum()) for k in ("weight", "bias"))
        for m in "02"
    }
    counts = {m: sum(params[f"{m}.{k}"].numel() for k in ("weight", "bias")) for m in "02"}
    log_lik = -float(nn.CrossEntropyLoss(reduction="sum")(model(X), y).detach())
    expected = log_lik - 0.5 * torch.linalg.slogdet(P)[1]
    for m, d in (("0", 0.3), ("2", 4.0)):
        expected += -0.5 * d * norms[m] + 0.5 * counts[m] * math.log(d)
    assert_close(la.log_marginal_likelihood(), expected, what="evidence")
    as_vector = torch.tensor([0.3, 4.0], dtype=torch.float64)  # la.modules' order
    assert la.modules == ["0", "2"]
    assert_close(la.log_marginal_likelihood(as_vector), expected, what="evidence (vector)")


def test_per_module_marglik_reaches_the_dense_stationary_point():
    """Per module, ``∂/∂δ_m = −‖θ_m‖²/2 + P_m/(2δ_m) − tr_m(P⁻¹)/2`` (dense) vanishes at the
    tuned priors, to 1e-3 of its terms."""
    model, _, _, la, G = build("kfac", prior={"0": 1.0, "2": 1.0})
    tuned = la.optimize_prior_precision(n_steps=1500, lr=0.05)
    assert isinstance(tuned, dict) and set(tuned) == {"0", "2"}
    Sigma = torch.linalg.inv(dense_precision(la, G, tuned))
    params = dict(model.named_parameters())
    start = 0
    for m in la.modules:
        theta = torch.cat([params[f"{m}.{k}"].detach().reshape(-1) for k in ("weight", "bias")])
        part = slice(start, start + theta.numel())
        start += theta.numel()
        terms = (
            -0.5 * float(theta.square().sum()),
            theta.numel() / (2 * tuned[m]),
            -0.5 * float(Sigma[part, part].diagonal().sum()),
        )
        assert abs(sum(terms)) < 1e-3 * max(abs(t) for t in terms), (m, terms)


@pytest.mark.parametrize("case", ["kfac", "ekfac", "low-rank", "last-layer", "tempered"])
def test_functional_variance_and_probit(case):
    model, _, _, la, G = build(case)
    Sigma = torch.linalg.inv(dense_precision(la, G, 0.7))
    X = randn(6, 4, g=gen(5))
    params = {k: v.detach() for k, v in model.named_parameters()}
    sub = {n: params[n] for n in la.param_names}
    J = jacrev(lambda p: functional_call(model, {**params, **p}, (X,)))(sub)
    J = torch.cat([J[n].reshape(6, 3, -1) for n in la.param_names], dim=-1)
    expected = J @ Sigma @ J.transpose(1, 2)
    assert_close(la.functional_variance(X), expected, what="J Σ Jᵀ")
    mu = model(X).detach()
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * expected.diagonal(dim1=1, dim2=2))
    assert_close(la.predictive(X), torch.softmax(kappa * mu, -1), what="probit")


def test_mc_predictive_against_dense_draws():
    """20,000 draws: each probability's standard error is below 0.5/√20000 = 0.0035; 0.02 is
    more than five of them."""
    model, _, _, la, _G = build("kfac", prior=0.05)
    X = randn(4, 4, g=gen(6))
    fvar = la.functional_variance(X)
    mu = model(X).detach()
    L = torch.linalg.cholesky(fvar)
    z = torch.randn(200_000, 4, 3, 1, generator=gen(7), dtype=torch.float64)
    reference = torch.softmax(mu + (L @ z).squeeze(-1), -1).mean(0)
    probs = la.predictive(X, link="mc", n_samples=20_000, generator=gen(8))
    assert float((probs - reference).abs().max()) < 0.02
    assert not torch.allclose(reference, torch.softmax(mu, -1), atol=0.02)  # Σ_f matters here


@pytest.mark.parametrize("link", ["probit", "mc"])
def test_predictive_tends_to_the_map_as_the_posterior_shrinks(link):
    model, _, _, la, _ = build("kfac", prior=1e12)
    X = randn(4, 4, g=gen(9))
    probs = la.predictive(X, link=link, n_samples=50, generator=gen(10))
    torch.testing.assert_close(probs, torch.softmax(model(X).detach(), -1), rtol=0, atol=1e-5)


def test_samples_have_the_posterior_mean_and_covariance():
    """40,000 draws in 33 dimensions: the sample mean's and covariance's errors are compared
    with six of their standard errors, entry by entry (``√(Σ_ii/n)``,
    ``√((Σ_ii Σ_jj + Σ_ij²)/n)``)."""
    _model, _, _, la, G = build("kfac")
    Sigma = torch.linalg.inv(dense_precision(la, G, 0.7))
    n = 40_000
    draws = la.sample(n, generator=gen(11))
    assert draws.shape == (n, la.num_params)
    sd = Sigma.diagonal().sqrt()
    assert bool(((draws.mean(0) - la.mean).abs() <= 6 * sd / math.sqrt(n)).all())
    cov = torch.cov(draws.T)
    se = ((sd[:, None] * sd[None, :]) ** 2 + Sigma**2).sqrt() / math.sqrt(n)
    assert bool(((cov - Sigma).abs() <= 6 * se).all())


def test_mse_curvature_is_that_of_the_summed_loss():
    """``MSELoss()`` averages over the C outputs: the posterior uses ``C`` times its curvature;
    the evidence holds the Gaussian normaliser of variance ½ per entry."""
    model = mlp((4, 5, 3), "tanh", seed=1)
    g = gen(12)
    X, y = randn(1, 4, g=g), randn(1, 3, g=g)
    la = kronfac.Laplace(model, nn.MSELoss(), [(X, y)], prior_precision=0.7)
    assert la.hessian_scale == 3
    summed = kronfac.Laplace(model, nn.MSELoss(reduction="sum"), [(X, y)], prior_precision=0.7)
    G = block_ggn(model, nn.MSELoss(), X, y, la.param_names)
    P = dense_precision(la, G, 0.7)
    assert_close(la.log_det_posterior_precision(), torch.linalg.slogdet(P)[1], what="log det")
    log_lik = -float(((model(X).detach() - y) ** 2).sum()) - 0.5 * 3 * math.log(math.pi)
    theta = la.mean
    expected = (
        log_lik
        - 0.35 * theta.square().sum()
        + 0.5 * la.num_params * math.log(0.7)
        - 0.5 * torch.linalg.slogdet(P)[1]
    )
    assert_close(la.log_marginal_likelihood(), expected, what="evidence")
    assert_close(summed.log_marginal_likelihood(), expected, what="evidence (sum)")
    mean, var = la.predictive(X)
    assert_close(mean, model(X), what="mean")
    assert_close(var, la.functional_variance(X) + 0.5 * torch.eye(3), what="variance")


def test_a_mean_loss_gives_the_evidence_of_the_summed_loss():
    """Five data points: ``reduction="mean"`` and ``"sum"`` describe the same posterior."""
    model = mlp((4, 5, 3), "tanh", seed=2)
    g = gen(14)
    data = [(randn(5, 4, g=g), torch.randint(0, 3, (5,), generator=g))]
    mean = kronfac.Laplace(model, CE, data, prior_precision=0.7)
    summed = kronfac.Laplace(model, nn.CrossEntropyLoss(reduction="sum"), data, prior_precision=0.7)
    assert (mean.hessian_scale, summed.hessian_scale) == (5, 1)
    assert_close(mean.log_marginal_likelihood(), summed.log_marginal_likelihood(), what="evidence")
    assert_close(mean.functional_variance(data[0][0]), summed.functional_variance(data[0][0]))


class Sequence(nn.Module):
    """Embedding → Linear over positions: a language model's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4).double()
        self.head = nn.Linear(4, 7).double()

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(ids)))  # [B, L, V]


def test_forward_gives_the_predictive_of_the_last_token():
    """``forward=`` picks the last position's logits of three answer tokens. Fitted on one
    datum of one position (where K-FAC is exact: every position of a longer one would enter
    ``A``, not only the last), the predictive on sequences of three."""
    torch.manual_seed(0)
    model = Sequence()
    answers = torch.tensor([1, 4, 6])

    def forward(m: nn.Module, ids: Tensor) -> Tensor:
        return m(ids)[:, -1, answers]

    ids = torch.tensor([[5]])
    y = torch.tensor([2])
    la = kronfac.Laplace(model, CE, [(ids, y)], modules=["head"], forward=forward)
    assert la.param_names == ["head.weight", "head.bias"]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out(p, X):
        return functional_call(model, {**params, **p}, (X,))[:, -1, answers]

    sub = {n: params[n] for n in la.param_names}
    J = jacrev(out)(sub, ids)
    J = torch.cat([J[n].reshape(1, 3, -1) for n in la.param_names], dim=-1)[0]
    f = out(sub, ids).detach()
    H = hessian(lambda o: nn.CrossEntropyLoss(reduction="sum")(o, y))(f).reshape(3, 3)
    P = J.T @ H @ J + torch.eye(J.shape[1], dtype=J.dtype)
    assert_close(la.log_det_posterior_precision(), torch.linalg.slogdet(P)[1], what="log det")
    test_ids = torch.tensor([[1, 1, 2], [6, 0, 3]])
    J2 = jacrev(out)(sub, test_ids)
    J2 = torch.cat([J2[n].reshape(2, 3, -1) for n in la.param_names], dim=-1)
    expected = J2 @ torch.linalg.inv(P) @ J2.transpose(1, 2)
    assert_close(la.functional_variance(test_ids), expected, what="J Σ Jᵀ")


def test_marglik_tuning_reaches_the_dense_optimum():
    """The dense evidence maximised over ``log δ`` by a fine golden-section search."""
    from scipy.optimize import minimize_scalar

    model, X, y, la, G = build("kfac")
    log_lik = -float(nn.CrossEntropyLoss(reduction="sum")(model(X), y).detach())

    def negative(log_delta: float) -> float:
        d = math.exp(log_delta)
        P = dense_precision(la, G, d)
        return -float(
            log_lik
            - 0.5 * d * la.mean.square().sum()
            + 0.5 * la.num_params * log_delta
            - 0.5 * torch.linalg.slogdet(P)[1]
        )

    best = math.exp(
        minimize_scalar(negative, bounds=(-8, 8), method="bounded", options={"xatol": 1e-10}).x
    )
    tuned = la.optimize_prior_precision(n_steps=1000, lr=0.05)
    assert tuned == la.prior_precision
    assert abs(tuned / best - 1) < 1e-3


@pytest.mark.parametrize("grid", [[1e-3, 0.01, 0.1, 1.0, 10.0], [1.0, 10.0, 100.0]])
def test_gridsearch_picks_the_least_validation_nll(grid):
    """Two validation batches; a choice at the grid's edge warns."""
    _model, _, _, la, _ = build("kfac")
    g = gen(13)
    val = [(randn(8, 4, g=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    nll = []
    for d in grid:
        la.prior_precision = d
        nll.append(-sum(float(la.predictive(X).log().gather(1, y[:, None]).sum()) for X, y in val))
    best = grid[nll.index(min(nll))]
    edge = best in (grid[0], grid[-1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert la.optimize_prior_precision("gridsearch", val_data=val, grid=grid) == best
    assert la.prior_precision == best
    assert any("edge of the grid" in str(w.message) for w in caught) == edge
    assert edge == (grid[0] == 1.0)  # both cases exercised: inside the first grid, at an edge


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prior_precision": 0.0}, "prior_precision must be positive"),
        ({"prior_precision": -1.0}, "prior_precision must be positive"),
        ({"prior_precision": {"0": 1.0}}, "missing \\['2'\\]"),
        ({"prior_precision": {"0": 1.0, "2": 1.0, "9": 1.0}}, "unknown \\['9'\\]"),
        ({"prior_precision": {"0": 1.0, "2": 0.0}}, "prior_precision\\['2'\\] must be positive"),
        ({"prior_precision": torch.ones(3)}, "1-d tensor of 2 values"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"temperature": float("nan")}, "temperature must be positive"),
        ({"curvature": "diag"}, "Unknown curvature"),
    ],
)
def test_bad_options(kwargs, match):
    model = mlp((4, 5, 3), "tanh", seed=0)
    with pytest.raises(ValueError, match=match):
        kronfac.Laplace(model, CE, [one_datum()], **kwargs)


def test_bad_calls():
    model, _, _, la, _ = build("kfac")
    X = randn(2, 4, g=gen(1))
    with pytest.raises(ValueError, match="Unknown link"):
        la.predictive(X, link="logit")
    with pytest.raises(ValueError, match="Unknown method"):
        la.optimize_prior_precision("evidence")
    with pytest.raises(ValueError, match="needs val_data"):
        la.optimize_prior_precision("gridsearch")
    with pytest.raises(TypeError, match="one-shot iterator"):
        kronfac.Laplace(model, CE, iter([one_datum()]))


@pytest.mark.parametrize(
    "options",
    [{}, {"curvature": "ekfac", "bias": "separate"}, {"rank": 2, "rank_threshold": 4}],
)
def test_functional_variance_of_a_grouped_cnn_equals_the_covariance_operator(options):
    """Convolutions (one grouped) on several data points: ``J Σ Jᵀ`` through the Jacobians'
    coordinates in the eigenbases equals ``J`` times the dense matrix of the posterior
    covariance operator times ``Jᵀ`` (the blocks' own products)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()
    g = gen(15)
    data = [(randn(5, 2, 6, 6, g=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(2)]
    la = kronfac.Laplace(model, CE, data, prior_precision=0.3, **options)
    Sigma = la.posterior_covariance().to_dense()
    X = randn(3, 2, 6, 6, g=gen(16))
    params = {k: v.detach() for k, v in model.named_parameters()}
    sub = {n: params[n] for n in la.param_names}
    J = jacrev(lambda p: functional_call(model, {**params, **p}, (X,)))(sub)
    J = torch.cat([J[n].reshape(3, 3, -1) for n in la.param_names], dim=-1)
    assert_close(la.functional_variance(X), J @ Sigma @ J.transpose(1, 2), what="J Σ Jᵀ")
    assert_close(la.log_det_posterior_precision(), -torch.linalg.slogdet(Sigma)[1], what="log det")


def test_bce_posterior_and_sigmoid_probit():
    """``BCEWithLogitsLoss`` (mean over the 3 outputs): ``H`` of the summed loss, the evidence
    with the Bernoulli log-likelihood, and ``sigmoid(μ / √(1 + π/8 · diag Σ_f))``."""
    model = mlp((4, 5, 3), "tanh", seed=3)
    g = gen(17)
    X, y = randn(1, 4, g=g), torch.randint(0, 2, (1, 3), generator=g).double()
    bce = nn.BCEWithLogitsLoss()
    la = kronfac.Laplace(model, bce, [(X, y)], prior_precision=0.7)
    assert la.hessian_scale == 3
    G = block_ggn(model, bce, X, y, la.param_names)
    P = dense_precision(la, G, 0.7)
    assert_close(la.log_det_posterior_precision(), torch.linalg.slogdet(P)[1], what="log det")
    log_lik = -float(nn.BCEWithLogitsLoss(reduction="sum")(model(X).detach(), y))
    expected = (
        log_lik
        - 0.35 * la.mean.square().sum()
        + 0.5 * la.num_params * math.log(0.7)
        - 0.5 * torch.linalg.slogdet(P)[1]
    )
    assert_close(la.log_marginal_likelihood(), expected, what="evidence")
    Xt = randn(4, 4, g=gen(18))
    params = {k: v.detach() for k, v in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (Xt,)))(params)
    J = torch.cat([J[n].reshape(4, 3, -1) for n in la.param_names], dim=-1)
    fvar = (J @ torch.linalg.inv(P) @ J.transpose(1, 2)).diagonal(dim1=1, dim2=2)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * fvar)
    assert_close(la.predictive(Xt), torch.sigmoid(kappa * model(Xt).detach()), what="probit")
