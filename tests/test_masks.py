"""Padding masks, ignore_index and low-precision models."""

import pytest
import torch
from helpers import (
    DT,
    PerPosition,
    gen,
    mlp,
    padded,
    padding_mask,
    sequences,
    split_batches,
    tiny_llama,
)
from torch import nn

import kronfac

transformers = pytest.importorskip("transformers")


LENGTHS, T = [3, 5, 2, 5], 5


def per_position() -> PerPosition:
    """``Linear(4, 5) → tanh → Linear(5, 3)`` at every position (PyTorch's init, seed 0)."""
    return PerPosition(mlp((4, 5, 3), torch_init=True))


@pytest.mark.parametrize("fisher", ["type-2", "empirical", "mc"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_padding_mask_equals_unpadded_sequences(fisher, approx, reduction):
    model, loss = per_position(), nn.MSELoss(reduction=reduction)
    xs, ys, _ = sequences(LENGTHS)
    X, Y, mask = padded(xs, T, 3.0), padded(ys, T, 7.0), padding_mask(LENGTHS, T)  # garbage pads
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
    for name in ("net.0", "net.2"):
        torch.testing.assert_close(with_mask[name].A, unpadded[name].A, rtol=1e-12, atol=1e-14)
        if fisher != "mc":  # MC draws differ with the batching; checked in distribution below
            torch.testing.assert_close(with_mask[name].S, unpadded[name].S, rtol=1e-12, atol=1e-14)


def test_padding_mask_with_ekfac_and_cross_entropy():
    model, loss = per_position(), nn.CrossEntropyLoss()
    xs, _, cls = sequences(LENGTHS)
    X, mask = padded(xs, T, 3.0), padding_mask(LENGTHS, T)
    Y = padded(cls, T, 1)  # real classes at the pads: only the mask drops them
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
    model = per_position()
    xs, _, cls = sequences(LENGTHS)
    X, Y = padded(xs, T, 0.0), padded(cls, T, -100)
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
    torch.testing.assert_close(f["net.2"].S, S / len(p), rtol=1e-10, atol=1e-12)
    # the inputs of every position still count in A (the mask, not ignore_index, drops those)
    assert f.num_data == 4


@pytest.mark.filterwarnings("ignore::kronfac.UncoveredParameterWarning")  # the LayerNorms
def test_llama_right_padding_equals_unpadded():
    model = tiny_llama(30)
    g = gen(3)
    seqs = [torch.randint(0, 30, (L + 1,), generator=g) for L in (4, 7, 5)]
    ids, labels = padded([s[:-1] for s in seqs], 7, 0), padded([s[1:] for s in seqs], 7, -100)
    mask = padding_mask([len(s) - 1 for s in seqs], 7)
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
    model = mlp((8, 16, 4), torch_init=True, dtype=torch.float32)
    g = gen(1)
    X, y = torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    data = split_batches(X, y, (32, 32))
    ref = kronfac.compute_factors(model, nn.CrossEntropyLoss(), data, fisher="type-2")
    low = kronfac.compute_factors(
        model.to(dtype), nn.CrossEntropyLoss(), [(x.to(dtype), t) for x, t in data], fisher="type-2"
    )
    for name in ref:
        for a, b in zip(low[name], ref[name], strict=True):
            assert a.dtype == torch.float32
            rel = ((a - b).norm() / b.norm()).item()
            assert rel < tol, f"{name}: relative error {rel:.2e} >= {tol:.0e} for {dtype}"
