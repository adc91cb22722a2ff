"""Convolutions (``nn.Conv1d/2d/3d``): im2col, and K-FAC against dense ``torch.func`` references.

A convolution with weight ``[C_out, C_in, *k]`` is a Linear layer ``s_t = W a_t + b`` over the
input patches ``a_t`` (channel-major, then kernel offsets, like ``weight.flatten(1)``) at every
output location ``t`` (Grosse & Martens, 2016). K-FAC's block is ``S ⊗ A`` in the row-major
flattening of ``W: [C_out, C_in·∏k]`` with ``A = 1/(N·T) Σ_{n,t} a aᵀ``.

Exactness (Eschenhagen et al., 2023), all models linear, MSE:

- expand: a first conv whose every output location depends on one patch, followed by 1x1
  convs (nothing mixes locations), the output read channels-last ``[N, *L, C]`` so that every
  location is a loss term: the Jacobian of term ``(n, t)`` w.r.t. ``s_{n,t'}`` is ``δ_{tt'} B``
  with ``B`` the same for every ``n, t``, so the GGN block is
  ``Σ_{n,t} 2BᵀB ⊗ a aᵀ = (N·T·2BᵀB) ⊗ (1/(N·T) Σ a aᵀ) = S ⊗ A``.
- reduce: a conv, then global average pooling and Linear layers: ``f_n = B (W ā_n + b)``, so
  the GGN block is ``Σ_n 2BᵀB ⊗ ā āᵀ``, what ``reduce`` computes (``ĝ_n = Σ_t g_{n,t}``).

All models are float64; tolerances are relative to the largest entry of the reference.
"""

from __future__ import annotations

import math
import warnings

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from helpers import (
    DT,
    assert_rel_close,
    gen,
    init,
    kfac_block,
    make_data,
    param_slices,
    randn,
    split_batches,
)
from torch import Tensor, nn
from torch.func import hessian, jacrev

import kronfac
from kronfac.layers.conv import im2col

FISHERS = ("type-2", "mc", "empirical", "forward-only")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny float64 problems


# ----------------------------------------------------------------------------------------------
# helpers


class ChannelsLast(nn.Module):
    """``net`` followed by ``[N, C, *L] -> [N, *L, C]``: every location is an MSE term."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).movedim(1, -1)


COVERED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def block_sizes(model: nn.Module, bias: str) -> list[int]:
    """Diagonal block sizes of K-FAC for a model of Linear / Conv layers (definition order)."""
    sizes = []
    for m in model.modules():
        if isinstance(m, COVERED):
            ps = [p.numel() for p in (m.weight, m.bias) if p is not None]
            sizes += [sum(ps)] if bias == "joint" else ps
    return sizes


# ----------------------------------------------------------------------------------------------
# 1. im2col == the convolution, for every padding / stride / dilation / padding_mode

IM2COL_CASES = [
    # (conv class, kwargs, spatial input shape)
    (nn.Conv1d, dict(kernel_size=3), (9,)),
    (
        nn.Conv1d,
        dict(kernel_size=4, stride=2, padding=3, dilation=2, padding_mode="circular"),
        (9,),
    ),
    (nn.Conv1d, dict(kernel_size=4, padding="same"), (9,)),
    (nn.Conv1d, dict(kernel_size=2, padding="same", padding_mode="replicate"), (8,)),
    (nn.Conv1d, dict(kernel_size=3, padding="same", dilation=3, padding_mode="reflect"), (9,)),
    (nn.Conv1d, dict(kernel_size=5, padding="valid", stride=3, bias=False), (11,)),
    (nn.Conv1d, dict(kernel_size=3, padding=2, padding_mode="reflect", stride=2), (7,)),
    (nn.Conv2d, dict(kernel_size=3), (6, 5)),
    (
        nn.Conv2d,
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        (7, 6),
    ),
    (
        nn.Conv2d,
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), padding_mode="reflect"),
        (7, 6),
    ),
    (nn.Conv2d, dict(kernel_size=(2, 4), padding="same", padding_mode="replicate"), (7, 6)),
    (nn.Conv2d, dict(kernel_size=4, padding="same", dilation=(2, 1)), (7, 6)),
    (nn.Conv2d, dict(kernel_size=3, padding="same", dilation=2, padding_mode="circular"), (7, 6)),
    (nn.Conv2d, dict(kernel_size=(2, 3), padding="same", padding_mode="reflect"), (5, 6)),
    (nn.Conv2d, dict(kernel_size=1, stride=2), (7, 6)),
    (nn.Conv2d, dict(kernel_size=3, padding=2, bias=False), (4, 5)),
    (nn.Conv2d, dict(kernel_size=(3, 3), stride=(3, 2), padding="valid", dilation=(1, 2)), (8, 9)),
    (nn.Conv2d, dict(kernel_size=2, stride=2, padding=(0, 1), padding_mode="circular"), (6, 5)),
    (nn.Conv3d, dict(kernel_size=2), (4, 3, 5)),
    (
        nn.Conv3d,
        dict(
            kernel_size=(2, 3, 2),
            stride=(1, 2, 1),
            padding=(1, 0, 1),
            dilation=(2, 1, 1),
            padding_mode="replicate",
        ),
        (5, 6, 4),
    ),
    (nn.Conv3d, dict(kernel_size=2, padding="same", padding_mode="reflect"), (4, 3, 5)),
    (nn.Conv3d, dict(kernel_size=(3, 2, 4), padding="same", padding_mode="zeros"), (4, 3, 5)),
    (nn.Conv3d, dict(kernel_size=3, padding="valid", stride=2, padding_mode="circular"), (5, 6, 5)),
    (
        nn.Conv3d,
        dict(
            kernel_size=3, padding=1, stride=(2, 1, 3), dilation=(1, 2, 1), padding_mode="circular"
        ),
        (5, 6, 5),
    ),
]


def _case_id(case) -> str:
    cls, kw, shape = case
    opts = ",".join(f"{k}={v}" for k, v in kw.items())
    return f"{cls.__name__}({opts})@{'x'.join(map(str, shape))}"


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", IM2COL_CASES, ids=[_case_id(c) for c in IM2COL_CASES])
def test_im2col_matches_conv(case):
    cls, kw, spatial = case
    C_in, C_out, N = 3, 4, 2
    conv = init(cls(C_in, C_out, **kw), seed=1)
    X = randn(N, C_in, *spatial, g=gen(2))
    with torch.no_grad():
        out = conv(X)
        patches = im2col(X, conv)
    L = math.prod(out.shape[2:])
    d_in = C_in * math.prod(conv.kernel_size)
    assert patches.shape == (N * L, d_in)
    expected = out.movedim(1, -1).reshape(N * L, C_out)
    actual = patches @ conv.weight.detach().flatten(1).T
    if conv.bias is not None:
        actual = actual + conv.bias.detach()
    assert_rel_close(actual, expected, what=_case_id(case))


def test_im2col_matches_f_unfold_layout():
    """Columns are channel-major then kernel offsets, rows data point then location (F.unfold)."""
    conv = nn.Conv2d(3, 2, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1)).to(DT)
    X = randn(2, 3, 6, 7, g=gen(3))
    unf = F.unfold(X, (2, 3), dilation=(2, 1), padding=(1, 0), stride=(1, 2))  # [N, d_in, L]
    expected = unf.transpose(1, 2).reshape(-1, unf.shape[1])
    assert torch.equal(im2col(X, conv), expected)


def test_im2col_rejects_unbatched_input():
    conv = nn.Conv2d(3, 2, 3).to(DT)
    with pytest.raises(ValueError, match="Conv2d"):
        im2col(randn(3, 5, 5, g=gen(0)), conv)


# ----------------------------------------------------------------------------------------------
# 2a. expand: deep linear conv nets, channels-last MSE per location: type-2 == exact GGN blocks

EXPAND_NETS = {
    "2d-pad1": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), *_1x1(nn.Conv2d)), (5, 4)),
    "2d-stride2": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), *_1x1(nn.Conv2d)), (7, 6)),
    "2d-dil2-reflect": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, (3, 2), padding=2, dilation=2, padding_mode="reflect"),
            *_1x1(nn.Conv2d),
        ),
        (5, 4),
    ),
    "2d-same-even": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 2, padding="same"), *_1x1(nn.Conv2d)),
        (4, 4),
    ),
    "1d": (
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, stride=2), *_1x1(nn.Conv1d)),
        (9,),
    ),
    "3d": (
        lambda: nn.Sequential(
            nn.Conv3d(2, 3, 2, padding=(1, 0, 0), padding_mode="circular"), *_1x1(nn.Conv3d)
        ),
        (3, 3, 2),
    ),
}


def _1x1(cls) -> list[nn.Module]:
    return [cls(3, 4, 1), cls(4, 2, 1)]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("net", list(EXPAND_NETS))
def test_expand_deep_linear_conv_exact(net, reduction):
    build, spatial = EXPAND_NETS[net]
    model = init(ChannelsLast(build()), seed=4)
    loss_fn = nn.MSELoss(reduction=reduction)
    data = make_data(model, "mse", (2, 3, 1), (2, *spatial), seed=5)  # unequal batches
    G = ref.ggn(model, loss_fn, data)
    for bias in ("joint", "separate"):
        expected = ref.block_diagonal(G, block_sizes(model, bias))
        assert expected.abs().max() > 1e-6
        K = kronfac.KFAC(model, loss_fn, data, fisher="type-2", approx="expand", bias=bias)
        assert_rel_close(K.to_dense(), expected, what=f"expand {net} {reduction} {bias}")
    # the first layer sees T > 1 locations; reduce is not exact for it (the test can fail)
    R = kronfac.KFAC(model, loss_fn, data, fisher="type-2", approx="reduce", bias="separate")
    assert (R.to_dense() - expected).abs().max() > 1e-3 * expected.abs().max()


# ----------------------------------------------------------------------------------------------
# 2b. reduce: conv (T > 1) -> global average pool -> Linear(s) (T = 1), all linear, MSE [N, C]


def pool_net(first: nn.Module, c: int, spatial_dims: int, extra_1x1: bool = False) -> nn.Module:
    Conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
    Pool = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[spatial_dims - 1]
    layers = [first]
    if extra_1x1:  # a 1x1 conv before pooling mixes no locations: still exact
        layers.append(Conv(c, c + 1, 1))
        c += 1
    layers += [Pool(1), nn.Flatten(), nn.Linear(c, 4), nn.Linear(4, 2)]
    return nn.Sequential(*layers)


REDUCE_NETS = {
    "2d": (lambda: pool_net(nn.Conv2d(2, 3, 3, padding=1), 3, 2), (5, 4)),
    "2d-stride-reflect": (
        lambda: pool_net(nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect"), 3, 2),
        (5, 6),
    ),
    "2d+1x1": (lambda: pool_net(nn.Conv2d(2, 3, 3), 3, 2, extra_1x1=True), (5, 4)),
    "1d": (lambda: pool_net(nn.Conv1d(2, 3, 3, dilation=2), 3, 1), (9,)),
    "3d": (lambda: pool_net(nn.Conv3d(2, 3, 2, padding="same"), 3, 3), (3, 3, 2)),
}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("net", list(REDUCE_NETS))
def test_reduce_pooled_deep_linear_conv_exact(net, reduction):
    build, spatial = REDUCE_NETS[net]
    model = init(build(), seed=6)
    loss_fn = nn.MSELoss(reduction=reduction)
    data = make_data(model, "mse", (2, 3, 1), (2, *spatial), seed=7)  # unequal batches
    G = ref.ggn(model, loss_fn, data)
    for bias in ("joint", "separate"):
        expected = ref.block_diagonal(G, block_sizes(model, bias))
        assert expected.abs().max() > 1e-6
        K = kronfac.KFAC(model, loss_fn, data, fisher="type-2", approx="reduce", bias=bias)
        assert_rel_close(K.to_dense(), expected, what=f"reduce {net} {reduction} {bias}")
        # expand is *not* exact here (sanity: T > 1 matters for the conv layer)
        E = kronfac.KFAC(model, loss_fn, data, fisher="type-2", approx="expand", bias=bias)
        assert (E.to_dense() - expected).abs().max() > 1e-3 * expected.abs().max()


# ----------------------------------------------------------------------------------------------
# 3. one datum, ReLU conv net, cross-entropy: the Linear block (T = 1) is exact; the conv
#    factors against independent references (F.unfold for A, torch.func Jacobians for S)


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_one_datum_relu_ce(reduction, bias):
    conv_kw = dict(kernel_size=3, stride=2, padding=1, dilation=1)
    model = init(
        nn.Sequential(
            nn.Conv2d(3, 4, **conv_kw),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 5),
        ),
        seed=8,
    )
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    g = gen(9)
    X = randn(1, 3, 6, 7, g=g)
    y = torch.randint(0, 5, (1,), generator=g)
    data = [(X, y)]
    joint = bias == "joint"

    factors = kronfac.compute_factors(model, loss_fn, data, fisher="type-2", bias=bias)
    K = kronfac.KFAC.from_factors(factors, model)
    dense_K = K.to_dense()
    G = ref.ggn(model, loss_fn, data)
    sl = param_slices(model)

    # Linear (T = 1, one datum): K-FAC block == exact GGN block
    lin = slice(sl["4.weight"].start, sl["4.bias"].stop)
    if joint:
        assert_rel_close(dense_K[lin, lin], G[lin, lin], what="Linear block (joint)")
    else:
        for p in ("4.weight", "4.bias"):
            assert_rel_close(dense_K[sl[p], sl[p]], G[sl[p], sl[p]], what=f"{p} block")

    # conv A: 1/T Σ_t patch patchᵀ with torch's own F.unfold
    unf = F.unfold(X, **conv_kw)[0].T  # [T, C_in·k·k]
    T = unf.shape[0]
    assert T == 3 * 4
    if joint:
        unf = torch.cat([unf, torch.ones_like(unf[:, :1])], dim=1)
    A_ref = unf.T @ unf / T
    assert_rel_close(factors["0"].A, A_ref, what="conv A vs F.unfold")

    # conv S (expand, type-2): Σ_t J_tᵀ H J_t with J_t = ∂logits/∂s_t (one datum: D = 1)
    conv, rest = model[0], model[1:]
    with torch.no_grad():
        s = conv(X)
    logits = rest(s)
    J = jacrev(rest)(s).reshape(5, 4, T)  # [C, C_out, T]
    H = hessian(lambda z: F.cross_entropy(z, y, reduction="sum"))(logits.detach())
    H = H.reshape(5, 5)
    S_ref = sum(J[:, :, t].T @ H @ J[:, :, t] for t in range(T))
    assert S_ref.abs().max() > 1e-6  # some ReLUs are active
    assert_rel_close(factors["0"].S, S_ref, what="conv S vs Σ_t J_tᵀ H J_t")
    # and the operator's conv block is S ⊗ A in the parameter layout (weight.flatten(), bias)
    conv_sl = slice(sl["0.weight"].start, sl["0.bias"].stop)
    assert_rel_close(dense_K[conv_sl, conv_sl], kfac_block(S_ref, A_ref, joint), what="conv block")
    # the conv bias gradient sums over locations: reduce S is exactly the GGN bias block
    f_red = kronfac.compute_factors(
        model, loss_fn, data, fisher="type-2", approx="reduce", bias=bias
    )
    b = sl["0.bias"]
    assert_rel_close(f_red["0"].S, G[b, b], what="reduce conv S vs GGN bias block")
    A_red = unf.mean(0, keepdim=True)
    assert_rel_close(f_red["0"].A, A_red.T @ A_red, what="reduce conv A")


# ----------------------------------------------------------------------------------------------
# 4. options: stride, dilation, "same" padding (even kernel), reflect, no bias; all fisher types


class OptionsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=2, padding_mode="reflect")
        self.c2 = nn.Conv2d(4, 5, 2, padding="same", padding_mode="reflect", bias=False)
        self.c3 = nn.Conv2d(5, 3, (3, 1), dilation=(2, 1), padding="same", bias=False)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c1(x))
        h = torch.relu(self.c2(h))
        h = self.c3(h).mean(dim=(2, 3))
        return self.fc(h)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", FISHERS)
def test_options_all_fisher_types(fisher, approx):
    model = init(OptionsNet(), seed=10)
    g = gen(11)
    data = [(randn(n, 3, 9, 8, g=g), torch.randint(0, 4, (n,), generator=g)) for n in (3, 2)]
    loss_fn = nn.CrossEntropyLoss()
    factors = kronfac.compute_factors(model, loss_fn, data, fisher=fisher, approx=approx)
    expected_shapes = {"c1": (3 * 9 + 1, 4), "c2": (4 * 4, 5), "c3": (5 * 3, 3), "fc": (3 + 1, 4)}
    assert list(factors) == list(expected_shapes)
    for name, (d_in, d_out) in expected_shapes.items():
        A, S = factors[name]
        assert A.shape == (d_in, d_in), f"A of {name}: {tuple(A.shape)}"
        assert S.shape == (d_out, d_out), f"S of {name}: {tuple(S.shape)}"
        for what, M in (("A", A), ("S", S)):
            assert M.dtype == DT
            assert torch.isfinite(M).all()
            assert_rel_close(M, M.T, 1e-14, what=f"{what} of {name} symmetric")
            ev = torch.linalg.eigvalsh(M)
            assert ev.min() >= -1e-10 * ev.max(), f"{what} of {name} not PSD: {ev.min():.3e}"
            assert ev.max() > 0
        if fisher == "forward-only":
            assert torch.equal(S, torch.eye(d_out, dtype=DT))
    # A does not depend on the fisher type: check c1's against an F.unfold reference
    c1 = model.c1
    rows = []
    for X, _ in data:
        Xp = F.pad(X, c1._reversed_padding_repeated_twice, mode="reflect")
        unf = F.unfold(Xp, 3, dilation=2, stride=2).transpose(1, 2)  # [n, T, 27]
        unf = torch.cat([unf, torch.ones_like(unf[..., :1])], dim=-1)
        rows.append(unf.mean(1, keepdim=True) if approx == "reduce" else unf)
    a = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])
    assert_rel_close(factors["c1"].A, a.T @ a / a.shape[0], what="c1 A (reflect, stride, dil)")

    # the operator on the parameter list
    K = kronfac.KFAC.from_factors(factors, model)
    params = list(model.parameters())
    assert K.param_names == [n for n, _ in model.named_parameters()]
    v = [randn(*p.shape, g=g) for p in params]
    Kv = K @ v
    assert isinstance(Kv, list)
    assert [t.shape for t in Kv] == [p.shape for p in params]
    flat = torch.cat([t.reshape(-1) for t in v])
    expected = K.to_dense() @ flat
    assert_rel_close(torch.cat([t.reshape(-1) for t in Kv]), expected, what="K @ list")
    assert_rel_close(K @ flat, expected, what="K @ flat")
    # the conv weight block is S ⊗ A in the flattening of weight [C_out, C_in·kh·kw]
    sl = param_slices(model)
    w = sl["c2.weight"]
    assert_rel_close(
        K.to_dense()[w, w], torch.kron(factors["c2"].S, factors["c2"].A), what="c2 block"
    )


# ----------------------------------------------------------------------------------------------
# 5. grouped convolutions: one Kronecker block per group; transposed convolutions: uncovered


class GroupedNet(nn.Module):
    """Grouped deep linear conv net: a kxk grouped conv, then grouped and plain 1x1 convs."""

    def __init__(self, d):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
        self.c1 = conv(4, 6, 3, padding=1, groups=2)
        self.c2 = conv(6, 6, 1, groups=3)
        self.c3 = conv(6, 2, 1)
        self.d = d

    def forward(self, x):
        return self.c3(self.c2(self.c1(x))).movedim(1, -1)  # channels last: per-location MSE


def group_mask(model, bias):
    """Support of the per-(module, group) block diagonal, in named_parameters() order."""
    sl = param_slices(model)
    P = sum(p.numel() for p in model.parameters())
    mask = torch.zeros(P, P, dtype=torch.bool)
    for name in ("c1", "c2", "c3"):
        conv = getattr(model, name)
        g, rows = conv.groups, conv.out_channels // conv.groups
        per_row = conv.weight[0].numel()
        w, b = sl[f"{name}.weight"], sl[f"{name}.bias"]
        for j in range(g):
            wj = torch.arange(w.start + j * rows * per_row, w.start + (j + 1) * rows * per_row)
            bj = torch.arange(b.start + j * rows, b.start + (j + 1) * rows)
            blocks = [wj, bj] if bias == "separate" else [torch.cat([wj, bj])]
            for idx in blocks:
                mask[idx[:, None], idx[None, :]] = True
    return mask


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_grouped_deep_linear_conv_exact_per_group(d, bias):
    model = init(GroupedNet(d).to(DT), 21)
    X = randn(3, 4, *(4,) * d, g=gen(22))
    y = randn(3, *(4,) * d, 2, g=gen(23))
    data = split_batches(X, y, (1, 2))
    K = kronfac.KFAC(model, nn.MSELoss(), data, fisher="type-2", bias=bias)
    A, S = K.factors["c1"]
    assert S.shape == (2, 3, 3) and A.shape[0] == 2  # one Kronecker block per group
    G = ref.ggn(model, nn.MSELoss(), data)
    mask = group_mask(model, bias)
    assert_rel_close(K.to_dense(), G * mask, what=f"grouped {d}d {bias}")
    E = kronfac.EKFAC(model, nn.MSELoss(), data, fisher="type-2", bias=bias)
    assert_rel_close(E.to_dense(), G * mask, what=f"grouped EKFAC {d}d {bias}")


def test_depthwise_conv_operator_surface(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3), nn.Flatten(), nn.Linear(12, 2)).to(DT)
    init(model, 5)
    data = [(randn(4, 3, 4, 4, g=gen(0)), torch.randint(0, 2, (4,), generator=gen(1)))]
    K = kronfac.KFAC(model, nn.CrossEntropyLoss(), data, fisher="type-2")
    A, S = K.factors["0"]
    assert A.shape == (3, 10, 10) and S.shape == (3, 1, 1)
    dense = K.to_dense()
    v = randn(K.shape[0], 2, g=gen(2))
    assert_rel_close(K @ v, dense @ v, what="depthwise matvec")
    eye = torch.eye(len(dense), dtype=DT)
    assert_rel_close(
        K.inverse(0.1, exact=True).to_dense(),
        torch.linalg.inv(dense + 0.1 * eye),
        what="exact inverse",
    )
    assert_rel_close(K.logdet(0.1), torch.logdet(dense + 0.1 * eye), what="logdet")
    E = kronfac.EKFAC(model, nn.CrossEntropyLoss(), data, fisher="type-2")
    E.factors.save(tmp_path / "grouped.safetensors")
    loaded = kronfac.KroneckerFactors.load(tmp_path / "grouped.safetensors")
    assert loaded.corrections["0"].eigenvalues.shape == (3, 1, 10)
    torch.testing.assert_close(kronfac.EKFAC.from_factors(loaded, model).to_dense(), E.to_dense())


class UpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 2, stride=2)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up(x)).movedim(1, -1)


def test_conv_transpose_uncovered():
    model = init(UpNet(), seed=14)
    data = make_data(model, "mse", (2,), (2, 3, 3), seed=15)
    with pytest.warns(kronfac.UncoveredParameterWarning) as rec:
        factors = kronfac.compute_factors(model, nn.MSELoss(), data, fisher="type-2")
    msg = " ".join(str(w.message) for w in rec if w.category is kronfac.UncoveredParameterWarning)
    assert "up.weight" in msg and "up.bias" in msg, msg
    assert list(factors) == ["conv"]
    # the covered conv still gets the right input factor (its input is the uncovered output)
    with torch.no_grad():
        h = torch.cat([model.up(X) for X, _ in data])
    unf = F.unfold(h, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    unf = torch.cat([unf, torch.ones_like(unf[:, :1])], dim=1)
    assert_rel_close(factors["conv"].A, unf.T @ unf / unf.shape[0], what="conv A after up")
    # strict mode turns the warning into an error naming the parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"up\.weight"):
            kronfac.compute_factors(model, nn.MSELoss(), data, fisher="type-2", strict=True)


def test_only_conv_transpose_is_unsupported():
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 2)).to(DT)
    data = make_data(model, "mse", (2,), (2, 3, 3), seed=16)
    with (
        pytest.raises(ValueError, match="No supported layer"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        kronfac.compute_factors(model, nn.MSELoss(), data)
