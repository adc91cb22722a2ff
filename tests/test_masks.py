"""Padding masks, ignore_index and low-precision models."""

import pytest
import torch
from helpers import DT, gen, randn
from torch import nn

import kronfac

transformers = pytest.importorskip("transformers")


class PerPosition(nn.Module):
    """Per-position layers on ``X["x"]: [N, T, d]`` (padding cannot leak into real positions)."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 5).to(DT)
        self.fc2 = nn.Linear(5, classes).to(DT)

    def forward(self, x, attention_mask=None):
        return self.fc2(torch.tanh(self.fc1(x)))


LENGTHS = [3, 5, 2, 5]


def sequences(T_max=5, seed=0):
    g = gen(seed)
    xs = [randn(L, 4, g=g) for L in LENGTHS]
    ys = [randn(L, 3, g=g) for L in LENGTHS]
    cls = [torch.randint(0, 3, (L,), generator=g) for L in LENGTHS]
    return xs, ys, cls


def padded(xs, ys, T=5):
    X = torch.zeros(len(xs), T, 4, dtype=DT)
    Y = torch.full((len(xs), T, 3), 7.0, dtype=DT)  # garbage targets at the pads
    mask = torch.zeros(len(xs), T, dtype=torch.long)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        X[i, : len(x)], Y[i, : len(y)], mask[i, : len(x)] = x, y, 1
        X[i, len(x) :] = 3.0  # garbage inputs at the pads
    return X, Y, mask


@pytest.mark.parametrize("fisher", ["type-2", "empirical", "mc"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_padding_mask_equals_unpadded_sequences(fisher, approx, reduction):
    model, loss = PerPosition(), nn.MSELoss(reduction=reduction)
    xs, ys, _ = sequences()
    X, Y, mask = padded(xs, ys)
    with_mask = kronfac.compute_factors(
        model,
        loss,
        [
            ({"x": X[:2], "attention_mask": mask[:2]}, Y[:2]),
            ({"x": X[2:], "attention_mask": mask[2:]}, Y[2:]),
        ],
        fisher=fisher,
        approx=approx,
        mc_samples=1,
    )
    unpadded = kronfac.compute_factors(
        model,
        loss,
        [({"x": x[None]}, y[None]) for x, y in zip(xs, ys, strict=True)],
        fisher=fisher,
        approx=approx,
    )
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(with_mask[name].A, unpadded[name].A, rtol=1e-12, atol=1e-14)
        if fisher != "mc":  # MC draws differ with the batching; checked in distribution below
            torch.testing.assert_close(with_mask[name].S, unpadded[name].S, rtol=1e-12, atol=1e-14)


def test_padding_mask_with_ekfac_and_cross_entropy():
    model, loss = PerPosition(), nn.CrossEntropyLoss()
    xs, ys, cls = sequences()
    X, _, mask = padded(xs, ys)
    Y = torch.full((len(xs), 5), 1)  # real classes at the pads: only the mask drops them
    for i, c in enumerate(cls):
        Y[i, : len(c)] = c
    fwd = lambda m, X: m(**X).transpose(1, 2)  # noqa: E731
    E_mask = kronfac.EKFAC(
        model, loss, [({"x": X, "attention_mask": mask}, Y)], fisher="type-2", forward=fwd
    )
    E_ref = kronfac.EKFAC(
        model,
        loss,
        [({"x": x[None]}, c[None]) for x, c in zip(xs, cls, strict=True)],
        fisher="type-2",
        forward=fwd,
    )
    torch.testing.assert_close(E_mask.to_dense(), E_ref.to_dense(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_ignore_index_drops_terms_as_torch_does(fisher):
    """S of per-position logits: Σ over kept tokens of H_t (type-2) / their count (mean)."""
    model = PerPosition()
    xs, _, cls = sequences()
    X = torch.stack([torch.cat([x, torch.zeros(5 - len(x), 4, dtype=DT)]) for x in xs])
    Y = torch.full((len(xs), 5), -100)
    for i, c in enumerate(cls):
        Y[i, : len(c)] = c
    fwd = lambda m, X: m(**X).transpose(1, 2)  # noqa: E731
    f = kronfac.compute_factors(
        model, nn.CrossEntropyLoss(), [({"x": X}, Y)], fisher=fisher, forward=fwd
    )
    with torch.no_grad():
        logits = model(X)[Y != -100]  # [kept, C]
    p = logits.softmax(-1)
    if fisher == "type-2":
        S = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).sum(0)
    else:
        g = p - nn.functional.one_hot(Y[Y != -100], 3).to(DT)
        S = g.T @ g
    torch.testing.assert_close(f["fc2"].S, S / len(p), rtol=1e-10, atol=1e-12)
    # the inputs of every position still count in A (the mask, not ignore_index, drops those)
    assert f.num_data == 4


@pytest.mark.filterwarnings("ignore::kronfac.UncoveredParameterWarning")  # the LayerNorms
def test_llama_right_padding_equals_unpadded():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=30,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    model = transformers.LlamaForCausalLM(config).to(DT).eval()
    g = gen(3)
    seqs = [torch.randint(0, 30, (L + 1,), generator=g) for L in (4, 7, 5)]
    T = 7
    ids = torch.zeros(3, T, dtype=torch.long)
    labels = torch.full((3, T), -100)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        L = len(s) - 1
        ids[i, :L], labels[i, :L], mask[i, :L] = s[:-1], s[1:], 1
    fwd = lambda m, X: m(**X).logits.transpose(1, 2)  # noqa: E731
    loss = nn.CrossEntropyLoss()
    padded_f = kronfac.compute_factors(
        model,
        loss,
        [({"input_ids": ids, "attention_mask": mask}, labels)],
        fisher="type-2",
        forward=fwd,
        modules=["layers.1", "lm_head"],
    )
    single = kronfac.compute_factors(
        model,
        loss,
        [({"input_ids": s[None, :-1]}, s[None, 1:]) for s in seqs],
        fisher="type-2",
        forward=fwd,
        modules=["layers.1", "lm_head"],
    )
    for name in padded_f:
        torch.testing.assert_close(padded_f[name].A, single[name].A, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(padded_f[name].S, single[name].S, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_low_precision_model_accumulates_in_float32(dtype, tol):
    """bf16 keeps 8 significant bits (ε = 2⁻⁸ ≈ 3.9e-3), fp16 11 (ε ≈ 4.9e-4): activations and
    gradients carry O(ε) relative errors per layer and the factors average them, so a relative
    Frobenius error of ~10ε against the float32 model is the budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    g = gen(1)
    X, y = torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    data = [(X[:32], y[:32]), (X[32:], y[32:])]
    ref = kronfac.compute_factors(model, nn.CrossEntropyLoss(), data, fisher="type-2")
    low = kronfac.compute_factors(
        model.to(dtype), nn.CrossEntropyLoss(), [(x.to(dtype), t) for x, t in data], fisher="type-2"
    )
    for name in ref:
        for a, b in zip(low[name], ref[name], strict=True):
            assert a.dtype == torch.float32
            rel = ((a - b).norm() / b.norm()).item()
            assert rel < tol, f"{name}: relative error {rel:.2e} >= {tol:.0e} for {dtype}"
