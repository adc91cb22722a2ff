"""Language-model code as it is usually written: flattened token logits, GPT-2 and Llama defaults.

The number of data points ``N`` of a batch comes from its input (``X``, a Mapping's
``input_ids`` / ``attention_mask`` / first tensor, or ``batch_size_fn``), so a loss on
``logits.reshape(-1, V)`` with targets ``labels.reshape(-1)`` is ``R = T`` terms per data point
and must give the very matrices of the ``[N, V, T]`` layout with ``[N, T]`` targets.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import (
    DT,
    TOL,
    assert_factors_close,
    assert_rel_close,
    gen,
    lm_logits,
    randn,
    tiny_llama,
)
from torch import nn

import kronfac
from kronfac import UncoveredParameterWarning
from kronfac.optim import KFAC as KFACOptimizer

V, T, D_IN = 5, 6, 4
IGNORE = -100


class Tokens(nn.Module):
    """Per-position layers on ``x: [N, T, D_IN]`` returning ``[N, T, V]`` (float64)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(D_IN, 7).to(DT)
        self.fc2 = nn.Linear(7, 8).to(DT)
        self.head = nn.Linear(8, V).to(DT)

    def forward(self, x, attention_mask=None):
        # mixes positions (a causal prefix sum), so reduce and type-2 see several terms per g
        h = torch.tanh(self.fc1(x)).cumsum(dim=1) / T
        return self.head(torch.tanh(self.fc2(h)))


def nvt(model, X):
    return model(**X).transpose(1, 2)  # [N, V, T] for cross-entropy with targets [N, T]


def flat(model, X):
    return model(**X).reshape(-1, V)  # [N·T, V] with targets [N·T]


def ntc(model, X):
    return model(**X)  # [N, T, C] for MSE


def flat_rows(model, X):
    return model(**X).reshape(-1, V)  # [N·T, C] for MSE with targets [N·T, C]


def token_batches(variant: str, sizes=(3, 2), seed: int = 0):
    """Batches ``({"x", "attention_mask"?}, labels [n, T])`` for the ``[N, V, T]`` layout."""
    g = gen(seed)
    out = []
    for n in sizes:
        X = {"x": randn(n, T, D_IN, g=g)}
        y = torch.randint(0, V, (n, T), generator=g)
        if variant == "mask":
            lengths = torch.randint(2, T + 1, (n,), generator=g)
            lengths[0] = T
            X["attention_mask"] = (torch.arange(T)[None] < lengths[:, None]).long()
        if variant == "ignore_index":
            y[torch.rand(n, T, generator=g) < 0.3] = IGNORE
            y[0, 0] = 1
        out.append((X, y))
    return out


def flattened(batches, targets_shape=(-1,)):
    return [(X, y.reshape(*targets_shape)) for X, y in batches]


def assert_factors_equal(actual, expected, tol=TOL):
    assert actual.num_data == expected.num_data
    assert actual.num_per_example_loss_terms == expected.num_per_example_loss_terms
    assert_factors_close(actual, expected, tol)


@pytest.mark.parametrize("variant", ["plain", "mask", "ignore_index"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
def test_flattened_token_logits_equal_the_nvt_layout(fisher, approx, reduction, variant):
    model = Tokens()
    loss = nn.CrossEntropyLoss(reduction=reduction, ignore_index=IGNORE)
    batches = token_batches(variant)
    options = {"fisher": fisher, "approx": approx}
    reference = kronfac.compute_factors(model, loss, batches, forward=nvt, **options)
    factors = kronfac.compute_factors(model, loss, flattened(batches), forward=flat, **options)
    assert factors.num_data == 5 and factors.num_per_example_loss_terms == T
    assert_factors_equal(factors, reference)
    K, K_ref = (
        kronfac.KFAC.from_factors(factors, model),
        kronfac.KFAC.from_factors(reference, model),
    )
    v = randn(K.shape[0], 2, g=gen(1))
    assert_rel_close(K.inverse(1e-3, exact=True) @ v, K_ref.inverse(1e-3, exact=True) @ v)


@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
def test_flattened_mse_rows_equal_the_ntc_layout(fisher):
    model, loss = Tokens(), nn.MSELoss()
    g = gen(3)
    batches = [({"x": randn(n, T, D_IN, g=g)}, randn(n, T, V, g=g)) for n in (2, 3)]
    reference = kronfac.compute_factors(model, loss, batches, forward=ntc, fisher=fisher)
    factors = kronfac.compute_factors(
        model, loss, flattened(batches, (-1, V)), forward=flat_rows, fisher=fisher
    )
    assert_factors_equal(factors, reference)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
def test_ekfac_of_flattened_logits(fisher, approx):
    model, loss = Tokens(), nn.CrossEntropyLoss(ignore_index=IGNORE)
    batches = token_batches("mask")
    E_ref = kronfac.EKFAC(model, loss, batches, forward=nvt, fisher=fisher, approx=approx)
    E = kronfac.EKFAC(model, loss, flattened(batches), forward=flat, fisher=fisher, approx=approx)
    for name, corr in E_ref.factors.corrections.items():
        assert_rel_close(E.factors.corrections[name].eigenvalues, corr.eigenvalues)
    assert_rel_close(E.to_dense(), E_ref.to_dense())


def test_low_rank_factors_of_flattened_logits():
    model, loss = Tokens(), nn.CrossEntropyLoss()
    batches = token_batches("mask")
    options = {"rank": 3, "rank_threshold": 8, "fisher": "empirical"}
    reference = kronfac.compute_factors(model, loss, batches, forward=nvt, **options)
    factors = kronfac.compute_factors(model, loss, flattened(batches), forward=flat, **options)
    assert isinstance(factors["fc2"].A, kronfac.LowRankFactor)  # side 8 (7 + bias)
    assert_factors_equal(factors, reference)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_optimizer_on_flattened_logits(fisher):
    """The training loop's own loss on flattened logits steps exactly as on [N, V, T]."""

    def train(layout):
        model, loss_fn = Tokens(), nn.CrossEntropyLoss()
        opt = KFACOptimizer(
            model,
            lr=0.1,
            loss_fn=loss_fn,
            damping=1e-2,
            fisher=fisher,
            inverse_every=2,
            adaptive=False,
        )
        for X, y in token_batches("plain", sizes=(3, 3, 3)):
            opt.zero_grad()
            out = nvt(model, X) if layout == "nvt" else flat(model, X)
            target = y if layout == "nvt" else y.reshape(-1)
            loss_fn(out, target).backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    assert_rel_close(train("flat"), train("nvt"))


# -- the number of data points ----------------------------------------------------------------


class Positions(nn.Module):
    """Takes ``pos: [1, T]`` (shared across the batch) before ``x: [N, T, D_IN]``."""

    def __init__(self):
        super().__init__()
        self.tokens = Tokens()
        self.pos = nn.Embedding(T, D_IN).to(DT)

    def forward(self, pos, x):
        return self.tokens(x + self.pos(pos))


def test_batch_size_fn_counts_the_data_points():
    model, loss = Positions(), nn.CrossEntropyLoss()
    g = gen(5)
    batches = [
        ({"pos": torch.arange(T)[None], "x": randn(n, T, D_IN, g=g)}, torch.randint(0, V, (n, T)))
        for n in (2, 3)
    ]
    # the first tensor value is pos [1, T]: N = 1 leaves no module batch-first
    with pytest.raises(
        ValueError,
        match=r"no covered module's output has the batch's N = 1 data points \(read from the "
        r"first dimension of X\['pos'\] \(1, 6\)\) first: 'tokens.fc1': \(2, 6, 7\) for N = 1"
        r".*logits \[N, V, T\].*batch_size_fn",
    ):
        kronfac.compute_factors(model, loss, batches, forward=nvt, exclude=["pos"])
    factors = kronfac.compute_factors(
        model,
        loss,
        flattened(batches),
        forward=flat,
        batch_size_fn=lambda X: X["x"].shape[0],
        exclude=["pos"],
    )
    assert factors.num_data == 5 and factors.num_per_example_loss_terms == T
    plain = [({"x": X["x"] + model.pos(X["pos"])}, y) for X, y in batches]
    reference = kronfac.compute_factors(model.tokens, loss, plain, forward=nvt)
    for name in reference:
        assert_rel_close(factors[f"tokens.{name}"].A, reference[name].A)
        assert_rel_close(factors[f"tokens.{name}"].S, reference[name].S)


def test_outputs_that_do_not_split_into_the_data_points():
    model, loss = Tokens(), nn.CrossEntropyLoss()
    X, y = token_batches("plain", sizes=(3,))[0]
    # a loss on every row but the last: 17 rows for N = 3
    with pytest.raises(
        ValueError,
        match=r"the loss has 17 terms \(model output \(17, 5\), targets \(17,\)\), which do "
        r"not split into the N = 3 data points read from the first dimension of X\['x'\] "
        r"\(3, 6, 4\).*\[N, V, T\].*\[N·T, V\].*batch_size_fn",
    ):
        kronfac.compute_factors(
            model, loss, [(X, y.reshape(-1)[:-1])], forward=lambda m, X: flat(m, X)[:-1]
        )
    with pytest.raises(TypeError, match=r"batch_size_fn\(X\) must return an int, got float"):
        kronfac.compute_factors(model, loss, [(X, y)], forward=nvt, batch_size_fn=lambda X: 3.0)
    with pytest.raises(ValueError, match=r"Batch 0 holds no data points"):
        kronfac.compute_factors(model, loss, [(X, y)], forward=nvt, batch_size_fn=lambda X: 0)


# -- transformers models with their defaults ----------------------------------------------------

transformers = pytest.importorskip("transformers")
VOCAB = 30


@pytest.fixture(scope="module")
def gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(DT).eval()


def lm_batches(seed=0, padded=False):
    g = gen(seed)
    out = []
    for n in (2, 3):
        ids = torch.randint(0, VOCAB, (n, 9), generator=g)
        X = {"input_ids": ids[:, :-1]}
        labels = ids[:, 1:].clone()
        if padded:  # right padding: the last tokens of the first sequence
            X["attention_mask"] = torch.ones_like(X["input_ids"])
            X["attention_mask"][0, 5:] = 0
            labels[0, 5:] = IGNORE
        out.append((X, labels))
    return out


def lm_flat(model, X):
    return model(**X).logits.reshape(-1, VOCAB)


def test_gpt2_with_the_defaults(gpt2):
    """Every module selected: wpe (shared across the batch) is left out, with a warning."""
    loss, data = nn.CrossEntropyLoss(), lm_batches()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        factors = kronfac.compute_factors(gpt2, loss, data, forward=lm_logits)
    assert {w.category for w in record} == {UncoveredParameterWarning, UserWarning}
    text = " ".join(str(w.message) for w in record)
    assert "share a weight ('transformer.wte.weight')" in text  # lm_head's use is left out
    assert "'transformer.wpe': (1, 8, 16) for N = 2" in text and "exclude=" in text
    conv1d = [n for n, m in gpt2.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8 and set(factors) == {"transformer.wte", *conv1d}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat_factors = kronfac.compute_factors(gpt2, loss, flattened(data), forward=lm_flat)
        explicit = kronfac.compute_factors(
            gpt2, loss, data, forward=lm_logits, exclude=["wpe"], seed=0
        )
    assert_factors_equal(flat_factors, factors)
    assert "transformer.wpe" not in explicit
    # selected on purpose, or strict: an error naming the shape, N and the way out
    for options in ({"modules": ["wpe"]}, {"strict": True, "exclude": ["ln_"]}):
        with (
            pytest.raises(ValueError, match=r"'transformer.wpe' returned shape \(1, 8, 16\)"),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            kronfac.compute_factors(gpt2, loss, data, forward=lm_logits, **options)


def test_llama_with_padding_flattened_equals_nvt():
    model, loss = tiny_llama(VOCAB), nn.CrossEntropyLoss()
    data = lm_batches(padded=True)
    options = {"fisher": "type-2", "exclude": ["norm"]}  # RMSNorms: no Kronecker block
    reference = kronfac.compute_factors(model, loss, data, forward=lm_logits, **options)
    factors = kronfac.compute_factors(model, loss, flattened(data), forward=lm_flat, **options)
    assert_factors_equal(factors, reference, tol=1e-9)


def test_multihead_attention_projection_selected_on_purpose():
    """out_proj is applied through its weight, never called: a clear error, not torch's."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    X, y = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    with pytest.raises(ValueError, match=r"'self_attn.out_proj' were never called.*exclude="):
        kronfac.compute_factors(layer, nn.MSELoss(), [(X, y)], modules=["out_proj"])


def test_optimizer_exclude():
    model = Tokens()
    loss_fn = nn.CrossEntropyLoss()
    opt = KFACOptimizer(model, lr=0.1, loss_fn=loss_fn, exclude=["head"])
    assert opt.preconditioner.modules == ["fc1", "fc2"]
    with pytest.raises(ValueError, match=r"exclude=\['nope'\] matches no module"):
        KFACOptimizer(model, lr=0.1, loss_fn=loss_fn, exclude=["nope"])
