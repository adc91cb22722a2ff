"""``kronfac.compat.bayesian_lora`` against bayesian-lora 0.0.6 and against a hand computation.

1. Equality with bayesian-lora (``bayesian_lora.kfac``), both run after the same
   ``torch.manual_seed`` (the labels are sampled from the global RNG): dense and low-rank factors
   (``n_kfac`` / ``lr_threshold`` chosen so that some ``A`` and some ``S`` sides are low-rank and
   others dense), with and without the bias column, on a subset of modules, in float64 and
   float32; with gradient checkpointing (inputs recomputed in backward count once); a tiny Llama
   with peft LoRA adapters. Keys (and their order), shapes, dtypes and
   values are compared; a low-rank ``L`` is compared through ``L Lᵀ`` (sign-invariant) and also
   column by column up to each column's sign.
2. The semantics against an independent hand computation (last-position inputs with a trailing
   1, closed-form output gradients of the mean cross-entropy at the same sampled labels), and
   ``incremental_svd`` against an eigendecomposition (exact below the rank, Eckart–Young above).
3. Beyond bayesian-lora: 2-D layer inputs (equal to bayesian-lora on the ``T = 1`` view of the
   same data), GPT-2's ``Conv1D`` layers (equal to bayesian-lora on a twin whose ``Conv1D`` are
   ``nn.Linear`` with the transposed weight, while bayesian-lora on GPT-2 itself skips them),
   loaders without ``len``, and clear errors that leave no hook and no gradient behind.
4. The low-level API: ``hooks_disabled``, ``disable_input_hooks``, ``register_hooks`` /
   ``remove_hooks`` used by hand, and the single hooks against bayesian-lora's.

Tolerances. Both libraries see bit-identical layer inputs and output gradients (same model, same
sampled labels). Low-rank factors come from the same float64 SVD of the same matrix, so they
agree to round-off (in float32 too, since the rows are cast to float64 first). Dense factors
differ only by summation order: kronfac forms ``Σ_b a_b a_bᵀ`` as one GEMM ``aᵀ a``, bayesian-lora
sums batched outer products. With at most a dozen terms per entry the difference is a few ulps of
the largest entry: ``1e-12`` relative in float64 (ε ≈ 1.1e-16), ``1e-5`` in float32
(ε ≈ 6e-8, ~12 terms per batch and 3 batches give ≲ 1e-6; an order of magnitude of margin).
Comparisons with the hand computation and the eigendecompositions use ``1e-10`` in float64.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import DT, assert_rel_close, gen, init, mlp, randn, require_peer, tiny_llama
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kronfac.compat import bayesian_lora as kb

bayesian_lora = require_peer("bayesian_lora")
import bayesian_lora.kfac as ref  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

TOL64, TOL32, TOL_HAND = 1e-12, 1e-5, 1e-10
SEED = 1


# --------------------------------------------------------------------------------------------
# Shared helpers


class Toy(nn.Module):
    """Embedding → Linear → tanh → causal running mean → Linear (no bias) → Linear head.

    The running mean over positions makes every position reach the last logits, so the layers
    before it get output gradients at every position (only the last one must count). Sides:
    ``fc1`` A 8 (7 without bias) S 9, ``fc2`` A 9 S 5, ``head`` A 6 (5) S 11.
    """

    def __init__(self, vocab: int = 13, d: int = 7, h: int = 9, k: int = 5, c: int = 11):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, k, bias=False)
        self.head = nn.Linear(k, c)
        self.checkpointed = False  # recompute fc1 in backward (gradient checkpointing)

    def forward(self, ids: Tensor) -> Tensor:
        e = self.emb(ids)
        s = checkpoint(self.fc1, e, use_reentrant=False) if self.checkpointed else self.fc1(e)
        h = torch.tanh(s)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.head(self.fc2(h.cumsum(1) / steps))


def toy(dtype: torch.dtype = DT) -> nn.Module:
    return init(Toy(), 3).to(dtype)


def toy_loader(n_batches: int = 3, batch: int = 4, seq: int = 6) -> list[tuple[Tensor]]:
    g = gen(11)
    return [(torch.randint(0, 13, (batch, seq), generator=g),) for _ in range(n_batches)]


def toy_call(m: nn.Module, b: tuple[Tensor]) -> Tensor:
    return m(b[0])[:, -1]


def run(lib, model, forward_call, loader, seed: int = SEED, **kwargs):
    """``lib.calculate_kronecker_factors`` after ``torch.manual_seed(seed)``, RNG restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return lib.calculate_kronecker_factors(model, forward_call, loader, **kwargs)


def run_both(model, forward_call, loader, ref_model=None, ref_call=None, **kwargs):
    """(kronfac's, bayesian-lora's) factors, each on its own copy of ``model``."""
    ref_model = copy.deepcopy(model) if ref_model is None else ref_model
    got = run(kb, copy.deepcopy(model), forward_call, loader, **kwargs)
    want = run(ref, ref_model, ref_call or forward_call, loader, **kwargs)
    return got, want


def is_low_rank(side: int, n_kfac: int | None, lr_threshold: int) -> bool:
    return n_kfac is not None and side >= lr_threshold


def assert_low_rank_close(L: Tensor, L_ref: Tensor, tol: float, what: str) -> None:
    """``L Lᵀ`` and ``L`` itself (each column up to its sign)."""
    assert_rel_close(L @ L.T, L_ref @ L_ref.T, tol, f"{what} L Lᵀ")
    sign = torch.where((L * L_ref).sum(0) < 0, -1.0, 1.0).to(L.dtype)
    assert_rel_close(L * sign, L_ref, tol, f"{what} L")


def assert_same_factors(got, want, tol, n_kfac=None, lr_threshold=512) -> tuple[int, int]:
    """Same keys (same order), shapes, dtypes and values; returns (#low-rank, #dense)."""
    assert list(got) == list(want)
    counts = [0, 0]
    for name, pair in want.items():
        assert isinstance(got[name], tuple) and len(got[name]) == 2, name
        for what, x, y in zip("AS", got[name], pair, strict=True):
            label = f"{name}.{what}"
            assert x.shape == y.shape, f"{label}: {tuple(x.shape)} != {tuple(y.shape)}"
            assert x.dtype == y.dtype, f"{label}: {x.dtype} != {y.dtype}"
            side = y.shape[0]
            if is_low_rank(side, n_kfac, lr_threshold):
                assert y.shape == (side, min(n_kfac, side)) and x.dtype == torch.float64, label
                assert_low_rank_close(x, y, tol, label)
                counts[0] += 1
            else:
                assert y.shape == (side, side), label
                assert_rel_close(x, y, tol, label)
                counts[1] += 1
    return counts[0], counts[1]


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def no_grads_left(model: nn.Module) -> bool:
    return all(p.grad is None or not p.grad.any() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# 1. Equality with bayesian-lora


def test_signatures_match_bayesian_lora():
    """Same parameter names and defaults (``target_module_keywords``: ``None`` means ``[""]``)."""
    for fn in (
        "calculate_kronecker_factors",
        "register_hooks",
        "remove_hooks",
        "save_input_hook",
        "save_output_grad_hook",
    ):
        ours = inspect.signature(getattr(kb, fn)).parameters
        theirs = inspect.signature(getattr(ref, fn)).parameters
        assert list(ours) == list(theirs), fn
        for name, p in theirs.items():
            if fn == "calculate_kronecker_factors" and name == "target_module_keywords":
                assert p.default == [""] and ours[name].default is None
            else:
                assert ours[name].default == p.default, f"{fn}({name})"


def test_incremental_svd_signature_matches_bayesian_lora_positionally():
    ours = inspect.signature(kb.incremental_svd).parameters
    theirs = inspect.signature(ref.incremental_svd).parameters
    assert len(ours) == len(theirs) == 4
    for p, q in zip(ours.values(), theirs.values(), strict=True):
        assert p.default == q.default and p.kind == q.kind


def test_incremental_svd_keyword_names_match_bayesian_lora():
    g = gen(34)
    A, a = randn(5, 2, g=g), randn(3, 5, g=g)
    assert_low_rank_close(
        kb.incremental_svd(A=A, a=a), ref.incremental_svd(A=A, a=a), TOL64, "keywords"
    )


LOW_RANK_CASES = [(None, 512), (None, 1), (3, 9), (4, 6), (12, 8)]


@pytest.mark.parametrize("exclude_bias", [False, True])
@pytest.mark.parametrize(("n_kfac", "lr_threshold"), LOW_RANK_CASES)
def test_toy_equals_bayesian_lora_float64(n_kfac, lr_threshold, exclude_bias):
    kwargs = {"n_kfac": n_kfac, "lr_threshold": lr_threshold, "exclude_bias": exclude_bias}
    got, want = run_both(toy(), toy_call, toy_loader(), **kwargs)
    assert list(got) == ["fc1", "fc2", "head"]
    n_low, n_dense = assert_same_factors(got, want, TOL64, n_kfac, lr_threshold)
    if n_kfac is None:
        assert n_low == 0
    else:  # the cases mix low-rank and dense factors
        assert n_low > 0 and n_dense > 0
    sides_A = [f[0].shape[0] for f in got.values()]
    assert sides_A == ([7, 9, 5] if exclude_bias else [8, 9, 6])


def test_toy_low_rank_mixes_sides():
    """(3, 9): A low-rank only for fc2, S low-rank for fc1 and head (checks the case design)."""
    got = run(kb, toy(), toy_call, toy_loader(), n_kfac=3, lr_threshold=9)
    shapes = {n: (tuple(A.shape), tuple(S.shape)) for n, (A, S) in got.items()}
    assert shapes == {
        "fc1": ((8, 8), (9, 3)),
        "fc2": ((9, 3), (5, 5)),
        "head": ((6, 6), (11, 3)),
    }


@pytest.mark.parametrize(
    ("keywords", "expected"),
    [(["fc"], ["fc1", "fc2"]), (["head", "fc2"], ["fc2", "head"]), ([""], ["fc1", "fc2", "head"])],
)
@pytest.mark.parametrize(("n_kfac", "lr_threshold"), [(None, 512), (3, 9)])
def test_toy_keywords_subset_equals_bayesian_lora(keywords, expected, n_kfac, lr_threshold):
    got, want = run_both(
        toy(),
        toy_call,
        toy_loader(),
        target_module_keywords=keywords,
        n_kfac=n_kfac,
        lr_threshold=lr_threshold,
    )
    assert list(got) == expected
    assert_same_factors(got, want, TOL64, n_kfac, lr_threshold)


def test_toy_default_keywords_equal_bayesian_lora_default():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        got = kb.calculate_kronecker_factors(toy(), toy_call, toy_loader())
        torch.manual_seed(SEED)
        want = ref.calculate_kronecker_factors(toy(), toy_call, toy_loader())
    assert list(got) == ["fc1", "fc2", "head"]
    assert_same_factors(got, want, TOL64)


@pytest.mark.parametrize(("n_kfac", "lr_threshold"), [(None, 512), (3, 9)])
def test_gradient_checkpointing_counts_inputs_once(n_kfac, lr_threshold):
    """The forward recomputed in backward (checkpointed fc1) must not add to ``A`` again."""
    plain = toy()
    recomputed = copy.deepcopy(plain)
    recomputed.checkpointed = True
    kwargs = {"n_kfac": n_kfac, "lr_threshold": lr_threshold}
    got, want = run_both(recomputed, toy_call, toy_loader(), **kwargs)
    assert_same_factors(got, want, TOL64, n_kfac, lr_threshold)
    assert_same_factors(got, run(kb, plain, toy_call, toy_loader(), **kwargs), TOL64, **kwargs)


@pytest.mark.parametrize(("n_kfac", "lr_threshold"), [(None, 512), (3, 9), (4, 6)])
def test_toy_equals_bayesian_lora_float32(n_kfac, lr_threshold):
    got, want = run_both(
        toy(torch.float32), toy_call, toy_loader(), n_kfac=n_kfac, lr_threshold=lr_threshold
    )
    n_low, n_dense = assert_same_factors(got, want, TOL32, n_kfac, lr_threshold)
    assert n_dense > 0 and all(  # dense factors stay float32, low-rank ones are float64
        f.dtype == torch.float32 for pair in got.values() for f in pair if f.shape[0] == f.shape[1]
    )
    assert (n_low > 0) == (n_kfac is not None)


def test_different_seeds_differ():
    """The comparisons are sensitive to the sampled labels (S changes with the seed)."""
    model, loader = toy(), toy_loader()
    a = run(kb, copy.deepcopy(model), toy_call, loader, seed=1)
    b = run(kb, copy.deepcopy(model), toy_call, loader, seed=2)
    assert torch.equal(a["fc1"][0], b["fc1"][0])  # A does not depend on the labels
    assert not torch.allclose(a["head"][1], b["head"][1])


# --------------------------------------------------------------------------------------------
# 1b. A tiny Llama with peft LoRA adapters

V = 29


@pytest.fixture(scope="module")
def llama_lora() -> nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(tiny_llama(V), config).to(DT)
    # peft initialises lora_B = 0, which would make every lora_A output gradient exactly zero.
    g = gen(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(randn(*p.shape, g=g) / math.sqrt(p.shape[-1]))
    return model


def llama_call(m: nn.Module, ids: Tensor) -> Tensor:
    return m(input_ids=ids).logits[:, -1]


def llama_loader() -> list[Tensor]:
    g = gen(12)
    return [torch.randint(0, V, (3, 6), generator=g) for _ in range(3)]


@pytest.mark.parametrize(
    ("keywords", "n_kfac", "lr_threshold"),
    [(["lora"], None, 512), (["lora"], 4, 16), (["layers.1"], None, 512), (["layers.1"], 4, 16)],
)
def test_llama_lora_equals_bayesian_lora(llama_lora, keywords, n_kfac, lr_threshold):
    got, want = run_both(
        llama_lora,
        llama_call,
        llama_loader(),
        n_kfac=n_kfac,
        lr_threshold=lr_threshold,
        target_module_keywords=keywords,
    )
    lora = [
        n
        for n, m in llama_lora.named_modules()
        if isinstance(m, nn.Linear) and ("lora_A.default" in n or "lora_B.default" in n)
    ]
    if keywords == ["lora"]:
        assert sorted(got) == sorted(lora) and len(lora) == 8
    else:
        assert len(got) > 4 and all("layers.1." in n for n in got)
    n_low, _ = assert_same_factors(got, want, TOL64, n_kfac, lr_threshold)
    assert (n_low > 0) == (n_kfac is not None)
    if keywords == ["lora"] and n_kfac is not None:
        for name, (A, S) in got.items():  # lora_A: wide input, lora_B: wide output
            if "lora_A" in name:
                assert A.shape == (16, 4) and S.shape == (2, 2), name
            else:
                assert A.shape == (2, 2) and S.shape == (16, 4), name
    for A, S in got.values():  # nothing degenerate: every factor is nonzero
        assert A.abs().max() > 0 and S.abs().max() > 0


# --------------------------------------------------------------------------------------------
# 2. Semantics against a hand computation


class PoolNet(nn.Module):
    """``x: [B, T, 4]`` → fc1 (3-D input) → tanh → mean over T → head (2-D input) → ``[B, 5]``."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc1(x)).mean(1))


def with_one(a: Tensor) -> Tensor:
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)


def hand_factors(model: PoolNet, loader: list[Tensor], seed: int) -> dict[str, list[Tensor]]:
    """Undivided ``Σ a aᵀ`` / ``Σ g gᵀ`` with closed-form gradients of the mean cross-entropy."""
    W1, b1, W2 = model.fc1.weight.detach(), model.fc1.bias.detach(), model.head.weight.detach()
    sums = {"fc1": [0.0, 0.0], "head": [0.0, 0.0]}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for x in loader:
            B, T = x.shape[:2]
            f = model(x)  # the same logits, hence the same multinomial draws
            y = torch.multinomial(f.softmax(-1), 1).view(-1)
            h = torch.tanh(x @ W1.T + b1)  # [B, T, 6]
            pooled = h.mean(1)
            g_head = (f.softmax(-1) - F.one_hot(y, f.shape[-1]).to(f.dtype)) / B  # dℓ/df
            g_fc1 = (g_head @ W2) / T * (1 - h[:, -1] ** 2)  # dℓ/ds1 at the last position
            for name, a, g in (
                ("fc1", with_one(x[:, -1]), g_fc1),
                ("head", with_one(pooled), g_head),
            ):
                sums[name][0] = sums[name][0] + a.T @ a
                sums[name][1] = sums[name][1] + g.T @ g
    return sums


def pool_loader(n_batches: int = 3, batch: int = 2, seq: int = 5) -> list[Tensor]:
    g = gen(21)
    return [randn(batch, seq, 4, g=g) for _ in range(n_batches)]


def test_dense_factors_equal_hand_computation():
    model, loader = init(PoolNet(), 4), pool_loader()
    got = run(kb, model, lambda m, x: m(x), loader)
    hand = hand_factors(model, loader, SEED)
    assert list(got) == ["fc1", "head"]
    for name in got:
        for what, x, y in zip("AS", got[name], hand[name], strict=True):
            assert_rel_close(x, y / len(loader), TOL_HAND, f"{name}.{what}")
    assert got["head"][1].abs().max() > 0


def test_low_rank_factors_exact_below_rank():
    """B·M = 6 rows ≤ n_kfac = 6: ``L Lᵀ`` is the undivided sum exactly (every side low-rank)."""
    model, loader = init(PoolNet(), 4), pool_loader()
    got = run(kb, model, lambda m, x: m(x), loader, n_kfac=6, lr_threshold=5)
    hand = hand_factors(model, loader, SEED)
    for name in got:
        for what, L, y in zip("AS", got[name], hand[name], strict=True):
            side = y.shape[0]
            assert L.shape == (side, min(6, side)) and L.dtype == torch.float64
            assert_rel_close(L @ L.T, y, TOL_HAND, f"{name}.{what}")


def top_k(G: Tensor, k: int) -> Tensor:
    """Best rank-``k`` approximation of a symmetric PSD ``G`` (Eckart–Young)."""
    evals, evecs = torch.linalg.eigh(G)
    V, lam = evecs[:, -k:], evals[-k:]
    return (V * lam) @ V.T


def test_incremental_svd_one_batch_is_best_rank_k():
    rows = randn(9, 7, g=gen(31))
    L = kb.incremental_svd(torch.zeros(7, 3, dtype=DT), rows)  # k = r = 3
    G = rows.T @ rows
    assert L.shape == (7, 3)
    assert_rel_close(L @ L.T, top_k(G, 3), TOL_HAND, "rank 3")
    assert not torch.allclose(L @ L.T, G)  # the data has rank 7 > 3
    norms = L.norm(dim=0)  # columns U_k Σ_k: norms are the singular values, descending
    assert torch.all(norms[:-1] >= norms[1:])
    evals = torch.linalg.eigvalsh(G)
    assert_rel_close(norms**2, evals.flip(0)[:3], TOL_HAND, "σ²")


def test_incremental_svd_update_is_best_rank_k_of_sum():
    g = gen(32)
    L0, rows = randn(7, 3, g=g), randn(2, 7, g=g)
    G = L0 @ L0.T + rows.T @ rows  # rank 5
    L = kb.incremental_svd(L0, rows, n_kfac=4)
    assert L.shape == (7, 4)
    assert_rel_close(L @ L.T, top_k(G, 4), TOL_HAND, "rank 4 of 5")
    exact = kb.incremental_svd(L0, rows, n_kfac=5)
    assert_rel_close(exact @ exact.T, G, TOL_HAND, "rank 5 of 5")


def test_incremental_svd_shapes_dtype_and_reference():
    g = gen(33)
    L0, rows = randn(4, 2, g=g).float(), randn(1, 4, g=g).float()
    L = kb.incremental_svd(L0, rows, n_kfac=6)  # min(k, side, r + m) = 3 columns
    assert L.shape == (4, 3) and L.dtype == torch.float64
    L0d, rowsd = L0.double(), rows.double()
    assert_rel_close(L @ L.T, L0d @ L0d.T + rowsd.T @ rowsd, TOL_HAND, "rank 3 of 3")
    assert kb.incremental_svd(L0, rows, dtype=torch.float32).dtype == torch.float32
    for n_kfac in (None, 2, 6):
        want = ref.incremental_svd(L0, rows, n_kfac=n_kfac)
        got = kb.incremental_svd(L0, rows, n_kfac=n_kfac)
        assert_low_rank_close(got, want, TOL64, f"n_kfac={n_kfac}")


# --------------------------------------------------------------------------------------------
# 3. Beyond bayesian-lora


@pytest.mark.parametrize(("n_kfac", "lr_threshold"), [(None, 512), (3, 6)])
def test_2d_inputs_equal_bayesian_lora_on_length_one_sequences(n_kfac, lr_threshold):
    g = gen(41)
    loader = [randn(4, 5, g=g) for _ in range(3)]
    got, want = run_both(
        mlp((5, 7, 4), seed=5),
        lambda m, x: m(x),
        loader,
        ref_call=lambda m, x: m(x[:, None, :])[:, -1],
        n_kfac=n_kfac,
        lr_threshold=lr_threshold,
    )
    assert list(got) == ["0", "2"]
    n_low, _ = assert_same_factors(got, want, TOL64, n_kfac, lr_threshold)
    assert (n_low > 0) == (n_kfac is not None)


def test_loader_without_len():
    model, loader = toy(), toy_loader()
    want = run(kb, copy.deepcopy(model), toy_call, loader)
    got = run(kb, copy.deepcopy(model), toy_call, iter(loader))
    assert_same_factors(got, want, 0.0)


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=23,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(config).to(DT)


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """A deep copy whose every ``Conv1D`` (``W: [d_in, d_out]``) is the equivalent ``nn.Linear``."""
    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(*module.weight.shape, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    assert not any(isinstance(m, Conv1D) for m in twin.modules())
    return twin


def gpt2_call(m: nn.Module, ids: Tensor) -> Tensor:
    return m(input_ids=ids).logits[:, -1]


def gpt2_loader() -> list[Tensor]:
    g = gen(51)
    return [torch.randint(0, 23, (4, 6), generator=g) for _ in range(3)]


GPT2_MODULES = [
    "transformer.h.0.attn.c_attn",
    "transformer.h.0.attn.c_proj",
    "transformer.h.0.mlp.c_fc",
    "transformer.h.0.mlp.c_proj",
    "lm_head",
]


@pytest.mark.parametrize(("n_kfac", "lr_threshold"), [(None, 512), (5, 40)])
def test_gpt2_conv1d_equals_bayesian_lora_on_linear_twin(gpt2, n_kfac, lr_threshold):
    twin = conv1d_to_linear(gpt2)
    with torch.no_grad():  # the twin computes the same function
        ids = gpt2_loader()[0]
        assert_rel_close(gpt2_call(twin, ids), gpt2_call(gpt2, ids), TOL64, "twin logits")
    got, want = run_both(
        gpt2, gpt2_call, gpt2_loader(), ref_model=twin, n_kfac=n_kfac, lr_threshold=lr_threshold
    )
    assert list(got) == GPT2_MODULES
    n_low, n_dense = assert_same_factors(got, want, TOL64, n_kfac, lr_threshold)
    if n_kfac is not None:  # c_attn S (48), c_fc S (64), mlp.c_proj A (65)
        assert n_low == 3 and n_dense == 7
    assert got["transformer.h.0.mlp.c_fc"][0].shape[0] == 17  # d_in + bias


def test_bayesian_lora_skips_gpt2_conv1d(gpt2):
    want = run(ref, copy.deepcopy(gpt2), gpt2_call, gpt2_loader())
    got = run(kb, copy.deepcopy(gpt2), gpt2_call, gpt2_loader())
    assert list(want) == ["lm_head"]
    assert set(GPT2_MODULES) == set(got)
    assert_same_factors({"lm_head": got["lm_head"]}, want, TOL64)


# --------------------------------------------------------------------------------------------
# 3b. Errors: clear messages, no hook or gradient left behind


def test_3d_logits_are_rejected():
    model = toy()
    with pytest.raises(ValueError, match=r"\[batch, n_classes\]"):
        kb.calculate_kronecker_factors(model, lambda m, b: m(b[0]), toy_loader())
    assert no_hooks_left(model)


def test_empty_loader():
    model = toy()
    with pytest.raises(ValueError, match="no batch"):
        kb.calculate_kronecker_factors(model, toy_call, [])
    assert no_hooks_left(model)


def test_keywords_matching_nothing():
    model = toy()
    with pytest.raises(ValueError, match="selects no"):
        kb.calculate_kronecker_factors(model, toy_call, toy_loader(), target_module_keywords=["x"])
    assert no_hooks_left(model)


def test_register_hooks_twice_raises_and_removes_the_new_hooks():
    model = toy()
    activations = {"head": (torch.zeros(6, 6, dtype=DT), False)}  # "fc1", "fc2" come first
    with pytest.raises(ValueError, match="'head' is already registered"):
        kb.register_hooks(model, activations, {}, [""])
    assert no_hooks_left(model)
    output_grads = {"fc2": (torch.zeros(5, 5, dtype=DT), False)}
    with pytest.raises(ValueError, match="'fc2' is already registered"):
        kb.register_hooks(model, {}, output_grads, [""])
    assert no_hooks_left(model)


def test_4d_input_is_rejected_and_hooks_removed():
    model = mlp((3, 2), seed=6)
    x = randn(2, 2, 2, 3, g=gen(61))
    with pytest.raises(ValueError, match=r"'0'.*\(2, 2, 2, 3\).*expected \[batch, features\]"):
        kb.calculate_kronecker_factors(model, lambda m, b: m(b)[:, -1, -1], [x])
    assert no_hooks_left(model)
    assert no_grads_left(model)


def test_keyword_input_is_rejected():
    model = mlp((3, 2), seed=6)
    with pytest.raises(ValueError, match="positional input"):
        kb.calculate_kronecker_factors(model, lambda m, x: m[0](input=x), [randn(2, 3, g=gen(62))])
    assert no_hooks_left(model)


class Dangling(nn.Module):
    """``aux`` runs but its output never reaches the logits."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.aux = nn.Linear(3, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        self.aux(x)
        return self.head(torch.tanh(self.fc(x)))


def test_module_without_output_gradient():
    model = init(Dangling(), 7)
    loader = [randn(4, 3, g=gen(63))]
    with pytest.raises(ValueError, match="'aux' ran in forward_call but received no output"):
        run(kb, model, lambda m, x: m(x), loader)
    assert no_hooks_left(model)
    assert no_grads_left(model)  # cleared although a backward pass ran
    got = run(kb, model, lambda m, x: m(x), loader, target_module_keywords=["fc", "head"])
    assert list(got) == ["fc", "head"]


def test_success_leaves_no_hooks_and_no_gradients():
    model = toy().eval()
    run(kb, model, toy_call, toy_loader(), n_kfac=3, lr_threshold=9)
    assert no_hooks_left(model)
    assert no_grads_left(model)
    assert model.training  # like bayesian-lora, the model is put in train mode


# --------------------------------------------------------------------------------------------
# 4. The low-level API


def sampled_loss(model: nn.Module, batch) -> Tensor:
    logits = toy_call(model, batch)
    with torch.no_grad():
        y = torch.multinomial(logits.softmax(-1), 1).view(-1)
    return F.cross_entropy(logits, y)


def test_hooks_disabled_records_nothing():
    model, batch = toy(), toy_loader()[0]
    activations, output_grads = {}, {}
    hooks = kb.register_hooks(model, activations, output_grads, [""], n_kfac=None)
    assert len(hooks) == 6
    with torch.random.fork_rng(devices=[]):
        with kb.hooks_disabled():
            sampled_loss(model, batch).backward()
        assert activations == {} and output_grads == {}
        with pytest.raises(RuntimeError), kb.hooks_disabled():  # the state is restored
            raise RuntimeError
        sampled_loss(model, batch).backward()
    assert list(activations) == ["fc1", "fc2", "head"]
    assert set(output_grads) == {"fc1", "fc2", "head"}  # filled in backward order
    kb.remove_hooks(hooks)
    assert hooks == [] and no_hooks_left(model)


def test_disable_input_hooks_keeps_output_gradients():
    model, batch = toy(), toy_loader()[0]
    activations, output_grads = {}, {}
    hooks = kb.register_hooks(model, activations, output_grads, [""], n_kfac=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        with kb.disable_input_hooks():
            loss = sampled_loss(model, batch)
            assert activations == {}
            loss.backward()
        assert set(output_grads) == {"fc1", "fc2", "head"}
        recorded = {n: S.clone() for n, (S, _) in output_grads.items()}
        output_grads.clear()
        torch.manual_seed(SEED)
        sampled_loss(model, batch).backward()  # enabled again: inputs and gradients
    kb.remove_hooks(hooks)
    assert list(activations) == ["fc1", "fc2", "head"]
    for name, S in recorded.items():
        assert S.abs().max() > 0
        assert_rel_close(S, output_grads[name][0], 0.0, name)


@pytest.mark.parametrize(("n_kfac", "lr_threshold"), [(None, 512), (3, 9)])
def test_manual_workflow_matches_calculate(n_kfac, lr_threshold):
    """register_hooks + the documented loop + remove_hooks: the un-normalised sums."""
    model, loader = toy(), toy_loader()
    want = run(kb, copy.deepcopy(model), toy_call, loader, n_kfac=n_kfac, lr_threshold=lr_threshold)
    activations, output_grads = {}, {}
    hooks = kb.register_hooks(
        model, activations, output_grads, [""], n_kfac=n_kfac, lr_threshold=lr_threshold
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for batch in loader:
            model.zero_grad()
            loss = sampled_loss(model, batch)
            with kb.disable_input_hooks():
                loss.backward()
    kb.remove_hooks(hooks)
    assert no_hooks_left(model)
    assert list(activations) == list(want)
    for name, (A, S) in want.items():
        for what, (x, low), y in zip(
            "AS", (activations[name], output_grads[name]), (A, S), strict=True
        ):
            side = x.shape[0]
            assert low == is_low_rank(side, n_kfac, lr_threshold), f"{name}.{what}"
            expected = y if low else y * len(loader)
            assert_rel_close(x, expected, TOL64, f"{name}.{what}")


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize(("n_kfac", "lr_threshold"), [(None, 512), (2, 4)])
def test_single_hooks_equal_bayesian_lora(has_bias, n_kfac, lr_threshold):
    """kronfac's and bayesian-lora's hooks on the same layer, in the same passes."""
    layer = init(nn.Linear(4, 5), 8)
    ours, theirs = ({}, {}), ({}, {})
    handles = []
    for lib, (acts, grads) in ((kb, ours), (ref, theirs)):
        handles.append(
            layer.register_forward_pre_hook(
                lib.save_input_hook("l", acts, n_kfac, lr_threshold, has_bias)
            )
        )
        handles.append(
            layer.register_full_backward_hook(
                lib.save_output_grad_hook("l", grads, n_kfac, lr_threshold)
            )
        )
    g = gen(71)
    for _ in range(3):
        x, w = randn(3, 6, 4, g=g).requires_grad_(), randn(3, 6, 5, g=g)
        (layer(x) * w).sum().backward()
    for h in handles:
        h.remove()
    for mine, other in zip(ours, theirs, strict=True):
        (x, x_low), (y, y_low) = mine["l"], other["l"]
        assert x_low == y_low and x.shape == y.shape and x.dtype == y.dtype
        if y_low:
            assert_low_rank_close(x, y, TOL64, "hook")
        else:
            assert_rel_close(x, y, TOL64, "hook")
    assert ours[0]["l"][0].shape[0] == (5 if has_bias else 4)
