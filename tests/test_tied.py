"""Weight tying: a module called several times, and one weight held by several modules."""

import pytest
import torch
from helpers import DT, CalledTwice, gen, randn
from reference import ggn
from torch import nn

import kronfac


class OneCall(nn.Module):
    """The same function written as one call over 2 positions."""

    def __init__(self, shared: nn.Linear) -> None:
        super().__init__()
        self.lin = shared

    def forward(self, x):
        return self.lin(x.reshape(x.shape[0], 2, 3)).reshape(x.shape[0], -1)


def make(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(3, 2).to(DT)


def data(n=5, seed=1):
    g = gen(seed)
    X, y = randn(n, 6, g=g), randn(n, 4, g=g)
    return [(X[:2], y[:2]), (X[2:], y[2:])]


@pytest.mark.parametrize("fisher", ["type-2", "empirical", "mc"])
@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_two_calls_equal_one_call_over_two_positions(fisher, bias):
    lin = make()
    loss = nn.MSELoss()
    twice = kronfac.compute_factors(CalledTwice(lin), loss, data(), fisher=fisher, bias=bias)
    once = kronfac.compute_factors(OneCall(lin), loss, data(), fisher=fisher, bias=bias)
    torch.testing.assert_close(twice["lin"].A, once["lin"].A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(twice["lin"].S, once["lin"].S, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_tied_block_is_exact_for_one_datum(reduction):
    """Both outputs feed the MSE directly: K-FAC-expand is exact (Eschenhagen et al., 2023)."""
    model = CalledTwice(make())
    loss = nn.MSELoss(reduction=reduction)
    one = data(n=1)[:1]
    K = kronfac.KFAC(model, loss, one, fisher="type-2")
    torch.testing.assert_close(K.to_dense(), ggn(model, loss, one), rtol=1e-10, atol=1e-12)


def test_two_modules_sharing_weight_and_bias_are_one_block():
    lin = make()
    other = nn.Linear(3, 2).to(DT)
    other.weight, other.bias = lin.weight, lin.bias
    model = CalledTwice(lin, other=other)
    shared = kronfac.compute_factors(model, nn.MSELoss(), data(), fisher="type-2")
    assert list(shared) == ["lin"]
    once = kronfac.compute_factors(OneCall(lin), nn.MSELoss(), data(), fisher="type-2")
    torch.testing.assert_close(shared["lin"].A, once["lin"].A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(shared["lin"].S, once["lin"].S, rtol=1e-12, atol=1e-14)
    one = data(n=1)[:1]
    K = kronfac.KFAC(model, nn.MSELoss(), one, fisher="type-2")
    torch.testing.assert_close(K.to_dense(), ggn(model, nn.MSELoss(), one), rtol=1e-10, atol=1e-12)


def test_mixed_tied_outputs_are_not_claimed_exact():
    """When later layers mix the tied outputs, the block is no Kronecker product: K-FAC differs."""
    lin = make()
    model = nn.Sequential(CalledTwice(lin), nn.Linear(4, 2).to(DT))
    loss = nn.MSELoss()
    one = [(data(n=1)[0][0], torch.randn(1, 2, dtype=DT))]
    K = kronfac.KFAC(model, loss, one, fisher="type-2", modules=["0.lin"])
    G = ggn(model, loss, one, param_names=["0.lin.weight", "0.lin.bias"])
    assert (K.to_dense() - G).norm() > 1e-3 * G.norm()
