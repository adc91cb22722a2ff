"""The layer and loss registries: a custom adapter and a custom likelihood, in and out again.

- ``TransposedLinear`` (``y = x W + b`` with ``W`` stored as ``[d_in, d_out]``) with an adapter
  written from :class:`~kronfac.layers.LayerAdapter` gives the factors of the equivalent
  ``nn.Linear`` model, and operators equal under the transposition of the weights;
- ``FixedVarianceGaussianNLL`` (``ℓ = (f − y)² / (2σ²)`` per entry, reduced like ``nn.MSELoss``)
  with a likelihood of Hessian ``I/σ²`` gives MSE's factors scaled by ``1/(2σ²)`` (MSE's
  Hessian is ``2 I``), and type-2 K-FAC equal to the exact GGN on deep linear networks;
- unregistered, both are unsupported again; registering twice is a no-op for the same class and
  an error for another one.

Every registration is undone by a fixture after the test, failed or not, and
:func:`registries_unchanged` checks that the registries end as they began.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import reference as ref
import torch
from helpers import DT, assert_rel_close, gen, init, make_data, mlp, randn
from torch import Tensor, nn

import kronfac
from kronfac.layers import (
    LayerAdapter,
    get_adapter,
    register_layer,
    supported_layers,
    unregister_layer,
)
from kronfac.layers.linear import LinearAdapter
from kronfac.likelihoods import (
    get_likelihood,
    register_likelihood,
    supported_losses,
    unregister_likelihood,
)
from kronfac.likelihoods.base import EntrywiseLikelihood

SIGMA = 0.7
TRANSPOSED_NAME = f"{__name__}.TransposedLinear"


# ----------------------------------------------------------------------------------------------
# the custom layer and loss


class TransposedLinear(nn.Module):
    """``y = x W + b`` with the weight stored as ``[d_in, d_out]``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_in, d_out, dtype=DT))
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class TransposedLinearAdapter(LayerAdapter):
    """Every leading dimension after the first a position; the matrix is the stored ``Wᵀ``."""

    module: TransposedLinear

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1]

    def input_rows(self, x: Tensor) -> Tensor:
        return x.reshape(-1, self.in_features)

    def output_grad_rows(self, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], -1, self.out_features)

    def weight_to_matrix(self, w: Tensor) -> Tensor:
        return w.reshape(self.in_features, self.out_features, -1).transpose(0, 1)

    def matrix_to_weight(self, m: Tensor) -> Tensor:
        return m.transpose(0, 1).reshape(-1, m.shape[-1])


class FixedVarianceGaussianNLL(nn.Module):
    """``ℓ = (f − y)² / (2σ²)`` per entry (``y ~ N(f, σ²)``), summed or averaged like MSE."""

    def __init__(self, sigma: float = SIGMA, reduction: str = "mean") -> None:
        super().__init__()
        self.sigma, self.reduction = sigma, reduction

    def forward(self, f: Tensor, y: Tensor) -> Tensor:
        loss = (f - y).square() / (2 * self.sigma**2)
        return loss.mean() if self.reduction == "mean" else loss.sum()


class FixedVarianceGaussianLikelihood(EntrywiseLikelihood):
    """Gradient ``(f − y)/σ²``, Hessian ``I/σ²`` (``B = I/σ``), samples ``f + σ ε``."""

    loss_fn: FixedVarianceGaussianNLL

    def gradient(self, terms: Tensor, targets: Tensor) -> Tensor:
        return (terms - targets) / self.loss_fn.sigma**2

    def hessian_sqrt(self, terms: Tensor) -> Tensor:
        M, C = terms.shape
        eye = torch.eye(C, dtype=terms.dtype, device=terms.device) / self.loss_fn.sigma
        return eye.expand(M, C, C)

    def sample(self, terms: Tensor, num_samples: int, generator: torch.Generator) -> Tensor:
        noise = torch.randn(
            (num_samples, *terms.shape), generator=generator, dtype=terms.dtype, device=terms.device
        )
        return terms + self.loss_fn.sigma * noise


# ----------------------------------------------------------------------------------------------
# fixtures: every registration is undone after the test


@pytest.fixture(autouse=True)
def registries_unchanged() -> Iterator[None]:
    """Fail a test that leaves the registries other than it found them."""
    layers, losses = supported_layers(), supported_losses()
    yield
    assert supported_layers() == layers, "the layer registry was not restored"
    assert supported_losses() == losses, "the loss registry was not restored"


@pytest.fixture
def transposed_linear() -> Iterator[None]:
    """``TransposedLinear`` registered for the test (and unregistered after it, if still in)."""
    register_layer(TransposedLinear)(TransposedLinearAdapter)
    yield  # pytest resumes here after the test, whether it passed or failed
    if TRANSPOSED_NAME in supported_layers():
        unregister_layer(TransposedLinear)


@pytest.fixture
def gaussian_nll() -> Iterator[None]:
    """``FixedVarianceGaussianNLL`` registered for the test (and unregistered after it)."""
    register_likelihood(FixedVarianceGaussianNLL)(FixedVarianceGaussianLikelihood)
    yield
    if FixedVarianceGaussianNLL.__name__ in supported_losses():
        unregister_likelihood(FixedVarianceGaussianNLL)


# ----------------------------------------------------------------------------------------------
# helpers


def linear_pair(widths: tuple[int, ...], act: bool, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """An ``nn.Linear`` network and the same network of ``TransposedLinear`` (``W`` → ``Wᵀ``)."""
    linear = mlp(widths, "tanh" if act else None, seed=seed)
    transposed = copy.deepcopy(linear)
    with torch.no_grad():
        for i, lin in enumerate(linear):
            if isinstance(lin, nn.Linear):
                transposed[i] = TransposedLinear(lin.in_features, lin.out_features)
                transposed[i].weight.copy_(lin.weight.T)
                transposed[i].bias.copy_(lin.bias)
    return linear, transposed


def transposition(model: nn.Module) -> Tensor:
    """``perm`` with ``flat_linear[perm] == flat_transposed`` for :func:`linear_pair` models."""
    parts, start = [], 0
    for p in model.parameters():
        index = torch.arange(start, start + p.numel()).reshape(p.shape)
        parts.append(index.T.reshape(-1) if p.ndim == 2 else index)
        start += p.numel()
    return torch.cat(parts)


def block_sizes(model: nn.Module) -> list[int]:
    """One diagonal block per layer (weight and bias jointly), in parameter order."""
    return [
        m.weight.numel() + m.bias.numel()
        for m in model.modules()
        if isinstance(m, (nn.Linear, TransposedLinear))
    ]


# ----------------------------------------------------------------------------------------------
# 1. a custom layer


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
def test_custom_layer_gives_the_factors_of_linear(transposed_linear, fisher, bias, approx) -> None:
    linear, transposed = linear_pair((4, 5, 3), act=True)
    data = make_data(3, "bce", (4, 3), (2, 4), seed=2)  # [n, T, 4] → 0 / 1 [n, T, 3]
    loss_fn = nn.BCEWithLogitsLoss()
    options = {"fisher": fisher, "bias": bias, "approx": approx}
    expected = kronfac.compute_factors(linear, loss_fn, data, **options)
    actual = kronfac.compute_factors(transposed, loss_fn, data, **options)
    assert list(actual) == list(expected) == ["0", "2"]
    assert actual.param_names == expected.param_names
    assert (actual.num_data, actual.num_per_example_loss_terms) == (7, 2)
    for name, (A, S) in expected.items():
        assert_rel_close(actual[name].A, A, what=f"A of {name}")
        assert_rel_close(actual[name].S, S, what=f"S of {name}")


@pytest.mark.parametrize("operator", [kronfac.KFAC, kronfac.EKFAC])
def test_custom_layer_operator_is_linear_one_transposed(transposed_linear, operator) -> None:
    linear, transposed = linear_pair((4, 5, 3), act=True)
    data = make_data(3, "bce", (4, 3), (2, 4), seed=2)  # [n, T, 4] → 0 / 1 [n, T, 3]
    loss_fn = nn.BCEWithLogitsLoss()
    K_linear = operator(linear, loss_fn, data, fisher="type-2")
    K = operator(transposed, loss_fn, data, fisher="type-2")
    perm = transposition(linear)
    assert_rel_close(K.to_dense(), K_linear.to_dense()[perm][:, perm], what=operator.__name__)
    # products in the weights' own layouts: K (Wᵀ-shaped v) == (K_linear (W-shaped v))ᵀ
    v = {n: randn(*p.shape, g=gen(3)) for n, p in transposed.named_parameters()}
    Kv = K @ v
    Kv_linear = K_linear @ {n: t.T if t.ndim == 2 else t for n, t in v.items()}
    for n, t in Kv_linear.items():
        assert_rel_close(Kv[n], t.T if t.ndim == 2 else t, what=f"{operator.__name__} @ {n}")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_custom_layer_and_loss_type2_exact_on_deep_linear(
    transposed_linear, gaussian_nll, reduction
) -> None:
    _, model = linear_pair((4, 5, 3, 2), act=False, seed=4)
    loss_fn = FixedVarianceGaussianNLL(reduction=reduction)
    data = make_data(2, "mse", (3, 5, 2), (4,), seed=1)
    G = ref.ggn(model, FixedVarianceGaussianNLL(reduction="sum"), data)
    if reduction == "mean":
        G = G / sum(y.numel() for _, y in data)
    expected = ref.block_diagonal(G, block_sizes(model))
    actual = kronfac.KFAC(model, loss_fn, data, fisher="type-2").to_dense()
    assert_rel_close(actual, expected, what=f"deep linear, custom layer and loss, {reduction}")


def test_unregistered_custom_layer_is_unsupported(transposed_linear) -> None:
    layer = TransposedLinear(4, 3)
    assert isinstance(get_adapter(layer), TransposedLinearAdapter)
    assert TRANSPOSED_NAME in supported_layers()

    assert unregister_layer(TransposedLinear) is TransposedLinearAdapter
    assert get_adapter(layer) is None
    assert TRANSPOSED_NAME not in supported_layers()
    data = make_data(2, "mse", (3, 5, 2), (4,), seed=1)
    # beside a supported layer: left out with a warning naming its parameters
    mixed = init(nn.Sequential(TransposedLinear(4, 3), nn.Linear(3, 2)), seed=9)
    with pytest.warns(
        kronfac.UncoveredParameterWarning, match=r"not covered .*: 0\.weight, 0\.bias"
    ):
        factors = kronfac.compute_factors(mixed, nn.MSELoss(), data, fisher="type-2")
    assert list(factors) == ["1"]
    # alone: nothing to cover
    alone = init(nn.Sequential(TransposedLinear(4, 2)), seed=9)
    with pytest.raises(ValueError, match="No supported layer with trainable weights"):
        kronfac.compute_factors(alone, nn.MSELoss(), data)
    with pytest.raises(KeyError, match=rf"No layer adapter is registered for {TRANSPOSED_NAME}"):
        unregister_layer(TransposedLinear)


def test_registering_a_layer_twice(transposed_linear) -> None:
    # the same adapter again: nothing changes
    layers = supported_layers()
    assert register_layer(TransposedLinear)(TransposedLinearAdapter) is TransposedLinearAdapter
    assert supported_layers() == layers

    # another adapter for a registered type: refused, the first one stays
    class OtherAdapter(TransposedLinearAdapter):
        pass

    with pytest.raises(ValueError, match="already has the adapter TransposedLinearAdapter"):
        register_layer(TransposedLinear)(OtherAdapter)
    with pytest.raises(ValueError, match=r"nn\.Linear already has the adapter LinearAdapter"):
        register_layer(nn.Linear)(OtherAdapter)
    assert type(get_adapter(TransposedLinear(2, 2))) is TransposedLinearAdapter
    assert type(get_adapter(nn.Linear(2, 2))) is LinearAdapter

    # replaced after unregistering
    unregister_layer(TransposedLinear)
    register_layer(TransposedLinear)(OtherAdapter)
    assert type(get_adapter(TransposedLinear(2, 2))) is OtherAdapter

    # subclasses are covered through the MRO
    class Subclass(TransposedLinear):
        pass

    assert type(get_adapter(Subclass(2, 2))) is OtherAdapter

    with pytest.raises(TypeError, match="expects a LayerAdapter subclass"):
        register_layer(TransposedLinear)(TransposedLinear)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# 2. a custom loss


# S against MSE's: Hessians 1/σ² against 2 (type-2), gradients (f − y)/σ² against 2(f − y)
MSE_SCALE = {"type-2": 1 / (2 * SIGMA**2), "empirical": 1 / (4 * SIGMA**4)}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("fisher", list(MSE_SCALE))
def test_custom_loss_gives_scaled_mse_factors(gaussian_nll, fisher, reduction) -> None:
    model = mlp((4, 5, 2), seed=5)
    data = make_data(2, "mse", (3, 5, 2), (4,), seed=1)
    options = {"fisher": fisher, "bias": "joint"}
    mse = kronfac.compute_factors(model, nn.MSELoss(reduction=reduction), data, **options)
    loss_fn = FixedVarianceGaussianNLL(reduction=reduction)
    factors = kronfac.compute_factors(model, loss_fn, data, **options)
    assert factors.options["loss"] == "FixedVarianceGaussianNLL"
    assert list(factors) == list(mse) == ["0", "2"]
    for name, (A, S) in mse.items():
        assert_rel_close(factors[name].A, A, what=f"A of {name}")
        assert_rel_close(factors[name].S, MSE_SCALE[fisher] * S, what=f"S of {name}")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_custom_loss_type2_exact_on_deep_linear(gaussian_nll, reduction) -> None:
    model = mlp((4, 5, 3, 2), None, seed=6)
    data = make_data(2, "mse", (3, 5, 2), (4,), seed=1)
    loss_fn = FixedVarianceGaussianNLL(reduction=reduction)
    factors = kronfac.compute_factors(model, loss_fn, data, fisher="type-2")
    # S = Bᵀ (I/σ²) B / D summed over the N data: closed form for the last layer (B = I)
    N, C = 10, 2
    D = 1 if reduction == "sum" else N * C
    assert_rel_close(factors["2"].S, N / (SIGMA**2 * D) * torch.eye(C, dtype=DT))
    G = ref.ggn(model, FixedVarianceGaussianNLL(reduction="sum"), data) / D
    expected = ref.block_diagonal(G, block_sizes(model))
    actual = kronfac.KFAC.from_factors(factors, model).to_dense()
    assert_rel_close(actual, expected, what=f"deep linear, custom loss, {reduction}")


def test_custom_loss_samples_its_predictive(gaussian_nll) -> None:
    """MC: ``E[g gᵀ]`` over the sampled labels is the type-2 ``S`` (statistically)."""
    model = mlp((4, 3), seed=7)
    data = make_data(3, "mse", (6,), (4,), seed=1)
    loss_fn = FixedVarianceGaussianNLL()
    type2 = kronfac.compute_factors(model, loss_fn, data, fisher="type-2")
    mc = kronfac.compute_factors(model, loss_fn, data, fisher="mc", mc_samples=4000)
    assert_rel_close(mc["0"].S, type2["0"].S, tol=0.1, what="MC S")


def test_unregistered_custom_loss_is_unsupported(gaussian_nll) -> None:
    model = mlp((4, 2), seed=8)
    data = make_data(2, "mse", (3, 5, 2), (4,), seed=1)
    loss_fn = FixedVarianceGaussianNLL()
    assert isinstance(get_likelihood(loss_fn), FixedVarianceGaussianLikelihood)

    assert unregister_likelihood(FixedVarianceGaussianNLL) is FixedVarianceGaussianLikelihood
    assert "FixedVarianceGaussianNLL" not in supported_losses()
    supported = ", ".join(supported_losses())
    assert {"CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss"} <= set(supported_losses())
    message = rf"Unsupported loss FixedVarianceGaussianNLL\. Supported: {supported}\."
    with pytest.raises(NotImplementedError, match=message):
        kronfac.compute_factors(model, loss_fn, data)
    with pytest.raises(NotImplementedError, match=message):
        kronfac.KFAC(model, loss_fn, data)
    with pytest.raises(KeyError, match="No likelihood is registered for FixedVarianceGaussianNLL"):
        unregister_likelihood(FixedVarianceGaussianNLL)


def test_registering_a_loss_twice(gaussian_nll) -> None:
    losses = supported_losses()
    registered = register_likelihood(FixedVarianceGaussianNLL)(FixedVarianceGaussianLikelihood)
    assert registered is FixedVarianceGaussianLikelihood
    assert supported_losses() == losses

    class OtherLikelihood(FixedVarianceGaussianLikelihood):
        pass

    with pytest.raises(ValueError, match="already has the likelihood FixedVarianceGaussian"):
        register_likelihood(FixedVarianceGaussianNLL)(OtherLikelihood)
    with pytest.raises(ValueError, match="MSELoss already has the likelihood GaussianLikelihood"):
        register_likelihood(nn.MSELoss)(OtherLikelihood)
    assert type(get_likelihood(FixedVarianceGaussianNLL())) is FixedVarianceGaussianLikelihood

    unregister_likelihood(FixedVarianceGaussianNLL)
    register_likelihood(FixedVarianceGaussianNLL)(OtherLikelihood)
    assert type(get_likelihood(FixedVarianceGaussianNLL())) is OtherLikelihood

    # by exact type: a subclass of a registered loss is not covered
    class Subclass(FixedVarianceGaussianNLL):
        pass

    with pytest.raises(NotImplementedError, match="Unsupported loss Subclass"):
        get_likelihood(Subclass())
    with pytest.raises(TypeError, match="expects a Likelihood subclass"):
        register_likelihood(FixedVarianceGaussianNLL)(FixedVarianceGaussianNLL)  # type: ignore[arg-type]
