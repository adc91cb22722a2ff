"""Exactness tests: kronfac's K-FAC against dense references computed with ``torch.func``.

K-FAC (``S ⊗ A`` per layer, block-diagonal over layers) equals the exact curvature's
block-diagonal in these cases, which is what we check:

- one datum, ``T = 1``, any network: ``J_l = B ⊗ aᵀ`` (row-major), so the block
  ``J_lᵀ H J_l = (Bᵀ H B) ⊗ (a aᵀ)`` (type-2 / GGN; empirical with ``H`` → ``∇ℓ∇ℓᵀ``);
- deep linear networks with MSE: ``B`` and ``H = 2I`` do not depend on the datum, so
  ``Σ_n (BᵀHB) ⊗ a_n a_nᵀ = (N·BᵀHB) ⊗ (1/N Σ_n a_n a_nᵀ) = S ⊗ A`` (and per position for
  ``expand``, with the pooled inputs for ``reduce``: Eschenhagen et al., 2023);
- any network, any number of data, ``T = 1`` (or ``reduce``): type-2 ``S`` is *exactly* the GGN
  block of the layer's bias (``∂f_n/∂b = B_n``), and empirical ``S`` the empirical Fisher's bias
  block. So the weight block of K-FAC must equal ``kron(G_bb, A)`` with ``G_bb`` read off the
  dense reference and ``A`` from forward hooks.

All models are float64; tolerances are relative to the largest entry of the reference.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from helpers import (
    DT,
    PerPosition,
    assert_factors_close,
    assert_rel_close,
    gen,
    init,
    kfac_block,
    make_data,
    make_loss,
    make_targets,
    mlp,
    param_slices,
    randn,
    split_batches,
)
from torch import Tensor, nn

import kronfac

# ----------------------------------------------------------------------------------------------
# helpers


class PoolNet(nn.Module):
    """``[N, T, d] -> fc1 -> (act) -> mean over T -> fc2 -> (act) -> fc3 -> [N, C]``."""

    def __init__(self, widths=(4, 5, 3, 2), act: str | None = None, seed: int = 0):
        super().__init__()
        d, h1, h2, c = widths
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, h1), nn.Linear(h1, h2), nn.Linear(h2, c)
        self.act = {None: nn.Identity, "tanh": nn.Tanh, "relu": nn.ReLU}[act]()
        init(self.to(DT), seed)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(x)).mean(dim=1)
        return self.fc3(self.act(self.fc2(h)))


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def dense_kfac(model, loss_fn, data, **kw) -> Tensor:
    return kronfac.KFAC(model, loss_fn, data, **kw).to_dense()


# ----------------------------------------------------------------------------------------------
# 1. deep linear networks with MSE: type-2 K-FAC == block-diagonal of the exact GGN


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_deep_linear_mse_type2_exact(reduction, bias):
    model = mlp((4, 5, 3, 2), None)
    loss_fn = make_loss("mse", reduction)
    data = make_data(model, "mse", (3, 5, 2), (4,))
    G = ref.ggn(model, loss_fn, data)
    expected = ref.block_diagonal(G, ref.linear_block_sizes(model, bias))
    actual = dense_kfac(model, loss_fn, data, fisher="type-2", bias=bias)
    assert_rel_close(actual, expected, what=f"deep linear MSE {reduction} {bias}")


# ----------------------------------------------------------------------------------------------
# 2. one datum, nonlinear MLP: type-2 == GGN block-diag, empirical == empirical Fisher block-diag


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_one_datum_exact(fisher, loss, act, reduction, bias):
    model = mlp((4, 5, 3), act, seed=1)
    loss_fn = make_loss(loss, reduction)
    data = make_data(model, loss, (1,), (4,), seed=2)
    dense = ref.ggn if fisher == "type-2" else ref.empirical_fisher
    expected = ref.block_diagonal(dense(model, loss_fn, data), ref.linear_block_sizes(model, bias))
    assert expected.abs().max() > 1e-6  # non-degenerate case
    actual = dense_kfac(model, loss_fn, data, fisher=fisher, bias=bias)
    assert_rel_close(actual, expected, what=f"one datum {fisher} {loss} {act} {reduction} {bias}")


# 2b. many data, nonlinear MLP: S is exactly the bias block of the dense reference, A is the
#     second moment of the layer inputs, and every block is S ⊗ A in the parameter layout.


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_many_data_bias_block_and_structure(fisher, loss, reduction, bias):
    model = mlp((4, 5, 3), "tanh", seed=3)
    loss_fn = make_loss(loss, reduction)
    data = make_data(model, loss, (3, 4, 2), (4,), seed=4)
    dense = (ref.ggn if fisher == "type-2" else ref.empirical_fisher)(model, loss_fn, data)
    K = kronfac.KFAC(model, loss_fn, data, fisher=fisher, bias=bias)
    actual = K.to_dense()
    factors = kronfac.compute_factors(model, loss_fn, data, fisher=fisher, bias=bias)
    sl = param_slices(model)
    names = linear_names(model)
    inputs = ref.layer_inputs(model, data, names)
    expected = torch.zeros_like(dense)
    for name in names:
        bsl, wsl = sl[f"{name}.bias"], sl[f"{name}.weight"]
        S_exact = dense[bsl, bsl]
        A_exact = ref.input_factor(inputs[name], bias=bias == "joint")
        assert_rel_close(factors[name].S, S_exact, what=f"S of {name}")
        assert_rel_close(factors[name].A, A_exact, what=f"A of {name}")
        start, stop = wsl.start, bsl.stop
        expected[start:stop, start:stop] = kfac_block(S_exact, A_exact, bias == "joint")
    assert_rel_close(actual, expected, what="to_dense vs kron(S_exact, A_exact)")
    # with separate bias the bias blocks of K-FAC are exact
    if bias == "separate":
        for name in names:
            bsl = sl[f"{name}.bias"]
            assert_rel_close(actual[bsl, bsl], dense[bsl, bsl], what=f"bias block {name}")


# ----------------------------------------------------------------------------------------------
# 3. Monte-Carlo Fisher
#
# The one-sample MC estimate of a layer's S is Ŝ = (1/D) Σ_n u_n u_nᵀ with u_n = B_nᵀ∇_fℓ(f_n, ŷ)
# and ŷ ~ p(y|f_n): E[Ŝ] = (1/D) Σ_n B_nᵀ H_n B_n = type-2 S (the exact GGN bias block), and
# with M independent samples per datum (each scaled by 1/√M) E‖Ŝ_M - S‖²_F = V / M, where
# V = E‖Ŝ_1 - S‖²_F is computed *exactly* by ref.mc_variance (enumerating every label for CE /
# BCE, closed form for the Gaussian of MSE). So the error has RMS σ_M = √(V/M) and, by
# Chebyshev, P(err > k·σ_M) <= 1/k² whatever the distribution; with many independent samples
# the error is close to Gaussian and err/σ_M concentrates near 1, so k = 4 is a generous bound
# (failure probability far below Chebyshev's 1/16). Conversely err < 0.05·σ_M would mean the
# estimator is (nearly) deterministic — e.g. the exact Hessian used instead of sampling — which
# for a sum of squared, roughly Gaussian entries has negligible probability.
# The seed is fixed, so the test is deterministic once it passes.

MC_BIG = 500


def _mc_setup(loss: str, reduction: str):
    model = mlp((3, 4, 3), "tanh", seed=5)
    loss_fn = make_loss(loss, reduction)
    data = make_data(model, loss, (4,), (3,), seed=6)
    return model, loss_fn, data


def _mc_reference(model, loss_fn, data, name):
    outs, Bs = [], []
    for X, _ in data:
        out, B = ref.bias_jacobians(model, X, f"{name}.bias")
        outs.append(out)
        Bs.append(B)
    D = ref.dataset_divisor(model, loss_fn, data)
    return ref.mc_variance(loss_fn, torch.cat(outs), torch.cat(Bs), D)


@pytest.mark.parametrize(
    ("loss", "reduction"), [("ce", "mean"), ("ce", "sum"), ("mse", "mean"), ("bce", "mean")]
)
def test_mc_converges_to_type2(loss, reduction):
    model, loss_fn, data = _mc_setup(loss, reduction)
    f_t2 = kronfac.compute_factors(model, loss_fn, data, fisher="type-2")
    f_1 = kronfac.compute_factors(model, loss_fn, data, fisher="mc", mc_samples=1)
    f_big = kronfac.compute_factors(model, loss_fn, data, fisher="mc", mc_samples=MC_BIG)
    names = linear_names(model)
    inputs = ref.layer_inputs(model, data, names)
    for name in names:
        S_mean, V = _mc_reference(model, loss_fn, data, name)
        # type-2 S is the expectation of the MC estimator (independent reference)
        assert_rel_close(f_t2[name].S, S_mean, what=f"type-2 S of {name}")
        # A does not depend on sampling
        A_exact = ref.input_factor(inputs[name], bias=True)
        for f in (f_1, f_big):
            assert_rel_close(f[name].A, A_exact, what=f"MC A of {name}")
        err_1 = torch.linalg.norm(f_1[name].S - S_mean).item()
        err_big = torch.linalg.norm(f_big[name].S - S_mean).item()
        rms_big = math.sqrt(V.item() / MC_BIG)
        norm = torch.linalg.norm(S_mean).item()
        msg = (
            f"{name}: rel err M=1 {err_1 / norm:.3e}, M={MC_BIG} {err_big / norm:.3e}, "
            f"expected RMS M=1 {math.sqrt(V.item()) / norm:.3e}, M={MC_BIG} {rms_big / norm:.3e}"
        )
        assert err_big < err_1, msg
        assert err_big <= 4 * rms_big, msg
        assert err_big >= 0.05 * rms_big, msg


def test_mc_seed_and_global_rng():
    model, loss_fn, data = _mc_setup("ce", "mean")
    kw = dict(fisher="mc", mc_samples=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    f_a = kronfac.compute_factors(model, loss_fn, data, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state), "compute_factors changed the global RNG"
    f_b = kronfac.compute_factors(model, loss_fn, data, seed=7, **kw)
    f_c = kronfac.compute_factors(model, loss_fn, data, seed=8, **kw)
    assert torch.equal(torch.get_rng_state(), state), "compute_factors changed the global RNG"
    for name in linear_names(model):
        assert torch.equal(f_a[name].S, f_b[name].S), f"same seed, different S of {name}"
        assert torch.equal(f_a[name].A, f_b[name].A)
        assert not torch.equal(f_a[name].S, f_c[name].S), f"seeds 7 and 8 gave the same S {name}"
    # the default seed is deterministic too, and does not depend on the global RNG state
    torch.manual_seed(0)
    f_d = kronfac.compute_factors(model, loss_fn, data, **kw)
    torch.manual_seed(1)
    f_e = kronfac.compute_factors(model, loss_fn, data, **kw)
    for name in linear_names(model):
        assert torch.equal(f_d[name].S, f_e[name].S)


# ----------------------------------------------------------------------------------------------
# 4. forward-only: S = I exactly, A = second moment of the layer inputs


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize(
    ("kind", "approx"), [("mlp", "expand"), ("seq", "expand"), ("seq", "reduce")]
)
def test_forward_only(kind, approx, bias):
    if kind == "mlp":
        model = mlp((4, 5, 3), "relu", seed=7)
        data = make_data(model, "ce", (3, 4), (4,), seed=8)
    else:
        model = PerPosition(mlp((4, 5, 3), "tanh", seed=7))
        data = make_data(model, "mse", (3, 4), (6, 4), seed=8)
    loss_fn = make_loss("ce" if kind == "mlp" else "mse", "mean")
    factors = kronfac.compute_factors(
        model, loss_fn, data, fisher="forward-only", approx=approx, bias=bias
    )
    names = linear_names(model)
    assert sorted(factors) == sorted(names)
    inputs = ref.layer_inputs(model, data, names)
    for name in names:
        lin = dict(model.named_modules())[name]
        A_exact = ref.input_factor(inputs[name], bias=bias == "joint", approx=approx)
        assert factors[name].A.shape == (lin.in_features + (bias == "joint"),) * 2
        assert_rel_close(factors[name].A, A_exact, what=f"A of {name}")
        eye = torch.eye(lin.out_features, dtype=factors[name].S.dtype)
        assert torch.equal(factors[name].S, eye), f"S of {name} is not I: {factors[name].S}"


# ----------------------------------------------------------------------------------------------
# 5. invariances (comparisons between kronfac runs by nature)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_batch_size_and_order_invariance(fisher, loss):
    model = mlp((4, 5, 3), "tanh", seed=9)
    loss_fn = make_loss(loss, "mean")
    ((X, y),) = make_data(model, loss, (10,), (4,), seed=10)
    one = [(X, y)]
    many = split_batches(X, y, (3, 5, 2))
    perm = torch.tensor([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])
    shuffled = split_batches(X[perm], y[perm], (4, 1, 5))
    f_one = kronfac.compute_factors(model, loss_fn, one, fisher=fisher)
    f_many = kronfac.compute_factors(model, loss_fn, many, fisher=fisher)
    f_rev = kronfac.compute_factors(model, loss_fn, many[::-1], fisher=fisher)
    f_shuf = kronfac.compute_factors(model, loss_fn, shuffled, fisher=fisher)
    assert_factors_close(f_one, f_many, 1e-12, what="one batch vs 3+5+2")
    assert_factors_close(f_one, f_rev, 1e-12, what="one batch vs 2+5+3")
    assert_factors_close(f_one, f_shuf, 1e-12, what="one batch vs shuffled 4+1+5")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_extra_output_dims_equal_flattened(loss, fisher, reduction):
    """CE logits ``[N, C, T]`` / MSE outputs ``[N, T, C]`` == the ``N·T`` flattened terms."""
    N, T, d = 3, 4, 4
    net = mlp((d, 5, 3), "tanh", seed=11)
    seq_model = PerPosition(net, class_dim_1=loss == "ce")
    flat_model = PerPosition(net)
    g = gen(12)
    X = randn(N, T, d, g=g)
    y = make_targets(loss, (N, 3, T) if loss == "ce" else (N, T, 3), g)
    loss_fn = make_loss(loss, reduction)
    seq_data = split_batches(X, y, (1, N - 1))
    flat_data = [(X.reshape(N * T, d), y.reshape(N * T, *y.shape[2:]))]
    f_seq = kronfac.compute_factors(seq_model, loss_fn, seq_data, fisher=fisher)
    f_flat = kronfac.compute_factors(flat_model, loss_fn, flat_data, fisher=fisher)
    assert_factors_close(f_seq, f_flat, 1e-12, what=f"{loss} {fisher} {reduction} seq vs flat")
    # and the flat factors are the right ones (independent reference, T = 1)
    dense_fn = ref.ggn if fisher == "type-2" else ref.empirical_fisher
    dense = dense_fn(flat_model, loss_fn, flat_data)
    sl = param_slices(flat_model)
    for name in linear_names(flat_model):
        bsl = sl[f"{name}.bias"]
        assert_rel_close(f_flat[name].S, dense[bsl, bsl], what=f"flat S of {name}")


# ----------------------------------------------------------------------------------------------
# 6. sequences: expand on a per-position deep linear net, reduce on a pooling deep linear net


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_expand_per_position_deep_linear_exact(reduction, bias):
    model = PerPosition(mlp((4, 5, 3, 2), None, seed=13))
    loss_fn = make_loss("mse", reduction)
    data = make_data(model, "mse", (2, 3, 1), (5, 4), seed=14)  # T = 5 positions
    G = ref.ggn(model, loss_fn, data)
    expected = ref.block_diagonal(G, ref.linear_block_sizes(model, bias))
    actual = dense_kfac(model, loss_fn, data, fisher="type-2", approx="expand", bias=bias)
    assert_rel_close(actual, expected, what=f"expand {reduction} {bias}")


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduce_pooling_deep_linear_exact(reduction, bias):
    model = PoolNet((4, 5, 3, 2), seed=15)
    loss_fn = make_loss("mse", reduction)
    data = make_data(model, "mse", (2, 3, 1), (5, 4), seed=16)  # fc1 sees T = 5 positions
    G = ref.ggn(model, loss_fn, data)
    expected = ref.block_diagonal(G, ref.linear_block_sizes(model, bias))
    actual = dense_kfac(model, loss_fn, data, fisher="type-2", approx="reduce", bias=bias)
    assert_rel_close(actual, expected, what=f"reduce {reduction} {bias}")
    # expand is *not* exact here (sanity check that T > 1 matters for fc1)
    expand = dense_kfac(model, loss_fn, data, fisher="type-2", approx="expand", bias=bias)
    assert (expand - expected).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_reduce_nonlinear_structure(fisher, loss):
    """reduce: ĝ_n = Σ_t g_{n,t} = ∂ℓ_n/∂b, so S equals the bias block of the dense reference
    for any network, and A = 1/N Σ_n ā ā ᵀ."""
    model = PoolNet((4, 5, 3, 3), act="tanh", seed=17)
    loss_fn = make_loss(loss, "mean")
    data = make_data(model, loss, (2, 3), (5, 4), seed=18)
    dense = (ref.ggn if fisher == "type-2" else ref.empirical_fisher)(model, loss_fn, data)
    factors = kronfac.compute_factors(
        model, loss_fn, data, fisher=fisher, approx="reduce", bias="joint"
    )
    sl = param_slices(model)
    inputs = ref.layer_inputs(model, data, linear_names(model))
    for name in linear_names(model):
        bsl = sl[f"{name}.bias"]
        assert_rel_close(factors[name].S, dense[bsl, bsl], what=f"S of {name}")
        A_exact = ref.input_factor(inputs[name], bias=True, approx="reduce")
        assert_rel_close(factors[name].A, A_exact, what=f"A of {name}")


# ----------------------------------------------------------------------------------------------
# 7. matrix-vector products


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_matvec(bias):
    model = mlp((4, 5, 3, 2), None, seed=19)
    loss_fn = make_loss("mse", "mean")
    data = make_data(model, "mse", (3, 5, 2), (4,), seed=20)
    K = kronfac.KFAC(model, loss_fn, data, fisher="type-2", bias=bias)
    expected_M = ref.block_diagonal(
        ref.ggn(model, loss_fn, data), ref.linear_block_sizes(model, bias)
    )
    P = expected_M.shape[0]
    g = gen(21)
    for v in (randn(P, g=g), randn(P, 3, g=g)):
        Kv = K @ v
        assert Kv.shape == v.shape
        assert_rel_close(Kv, expected_M @ v, what=f"K @ v{tuple(v.shape)} vs reference")
        assert_rel_close(Kv, K.to_dense() @ v, what=f"K @ v{tuple(v.shape)} vs to_dense")
