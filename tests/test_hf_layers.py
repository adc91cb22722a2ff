"""transformers / peft layers: Conv1D (GPT-2's transposed Linear) and LoRA adapters.

All models are built from configs with random weights (no hub), in float64.

1. Conv1D twin: a model of ``transformers.pytorch_utils.Conv1D`` layers and its ``nn.Linear``
   twin (weights transposed) have the same factors, and their operators agree through the
   transposition of the flat layout (Conv1D's follows its parameter as stored, ``[d_in, d_out]``
   row-major): products, ``to_dense`` (= P K_linear Pᵀ for a permutation P built here),
   ``diagonal``, the damped inverse and EKFAC.
2. A tiny GPT-2: every Conv1D of the blocks covered with the right shapes, LayerNorm parameters
   named in the warning / strict error, ``A`` of ``c_attn`` against its input recorded with an
   independent pre-hook, batching invariance.
3. peft LoRA on a tiny Llama and on GPT-2 (Conv1D base layers, ``fan_in_fan_out=True``):
   ``modules=["lora"]`` covers exactly the ``lora_A`` / ``lora_B`` Linears without warning; with
   peft's ``lora_B = 0`` init lora_A's ``S`` is exactly zero; and the factors satisfy the
   closed-form relations of the LoRA chain ``x → W_A x → W_B (·) · scaling`` against the base
   model's own layer.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from helpers import DT, gen, lm_logits, make_data, next_token_batches, tiny_llama
from torch import Tensor, nn

import kronfac
from kronfac.layers import supported_layers

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

TOL = {"rtol": 1e-10, "atol": 1e-12}
V, T = 50, 8  # vocabulary, sequence length of the LM tests


@contextlib.contextmanager
def no_uncovered_warning():
    """Context in which an UncoveredParameterWarning is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", kronfac.UncoveredParameterWarning)
        yield


# ----------------------------------------------------------------------------------------------
# 1. Conv1D against its nn.Linear twin


def conv1d_pair(frozen_bias: bool, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """``Conv1D(5, 4) → Tanh → Conv1D(3, 5)`` and the nn.Linear twin with transposed weights."""
    g = gen(seed)
    conv = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5)).to(DT)
    lin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    with torch.no_grad():
        for i in (0, 2):
            conv[i].weight.copy_(torch.randn(conv[i].weight.shape, generator=g, dtype=DT))
            conv[i].bias.copy_(torch.randn(conv[i].bias.shape, generator=g, dtype=DT))
            lin[i].weight.copy_(conv[i].weight.T)
            lin[i].bias.copy_(conv[i].bias)
            if frozen_bias:
                conv[i].bias.requires_grad_(False)
                lin[i].bias.requires_grad_(False)
    return conv, lin


def conv1d_data(seq: bool) -> list[tuple[Tensor, Tensor]]:
    """MSE batches of 3 and 2: ``[N, T = 3, 4] → [N, T, 3]`` or ``[N, 4] → [N, 3]``."""
    return make_data(3, "mse", (3, 2), (3, 4) if seq else (4,), seed=1)


def transposition(model: nn.Module) -> Tensor:
    """P with ``flat(conv params) = P · flat(linear twin params)`` over the trainable params.

    A Conv1D weight is stored ``[d_in, d_out]``: its entry ``(i, j)`` sits at ``i·d_out + j``
    and is the twin's ``(j, i)`` at ``j·d_in + i``; a bias maps to itself.
    """
    perm, start = [], 0
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 2:
            d_in, d_out = p.shape
            idx = torch.arange(d_out * d_in).reshape(d_out, d_in).T.reshape(-1)
        else:
            idx = torch.arange(p.numel())
        perm.append(idx + start)
        start += p.numel()
    perm = torch.cat(perm)
    return torch.eye(start, dtype=DT)[perm]


@pytest.mark.parametrize(
    "bias,frozen_bias", [("joint", False), ("separate", False), ("joint", True)]
)
@pytest.mark.parametrize("seq", [False, True], ids=["flat", "seq"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_conv1d_matches_linear_twin(bias, frozen_bias, seq, fisher):
    conv, lin = conv1d_pair(frozen_bias)
    data = conv1d_data(seq)
    opts = {"fisher": fisher, "bias": bias}
    loss = nn.MSELoss()
    fc = kronfac.compute_factors(conv, loss, data, **opts)
    fl = kronfac.compute_factors(lin, loss, data, **opts)

    assert list(fc) == list(fl) == ["0", "2"]
    d_in = {"0": 4, "2": 5}
    d_out = {"0": 5, "2": 3}
    for name in fc:
        A, S = fc[name]
        q = d_in[name] + (bias == "joint" and not frozen_bias)
        assert A.shape == (q, q) and S.shape == (d_out[name], d_out[name])
        torch.testing.assert_close(A, fl[name].A, **TOL)
        torch.testing.assert_close(S, fl[name].S, **TOL)
        assert S.abs().max() > 0
        expected_bias = None if frozen_bias else f"{name}.bias"
        assert fc.param_names[name] == (f"{name}.weight", expected_bias)
    assert fc.num_per_example_loss_terms == fl.num_per_example_loss_terms == (3 if seq else 1)

    Kc, Kl = kronfac.KFAC.from_factors(fc, conv), kronfac.KFAC.from_factors(fl, lin)
    assert Kc.shape == Kl.shape

    # products on parameter-shaped lists: through the transposition
    g = gen(7)
    vc = [torch.randn(p.shape, generator=g, dtype=DT) for p in conv.parameters() if p.requires_grad]
    vl = [v.T if v.ndim == 2 else v for v in vc]
    out_c, out_l = Kc @ vc, Kl @ vl
    assert isinstance(out_c, list) and len(out_c) == len(vc)
    for oc, ol, v in zip(out_c, out_l, vc, strict=True):
        assert oc.shape == v.shape
        torch.testing.assert_close(oc, ol.T if ol.ndim == 2 else ol, **TOL)

    # dense matrices: K_conv = P K_linear Pᵀ
    P = transposition(conv)
    dense_l = Kl.to_dense()
    torch.testing.assert_close(Kc.to_dense(), P @ dense_l @ P.T, **TOL)
    torch.testing.assert_close(Kc.diagonal(), P @ Kl.diagonal(), **TOL)
    torch.testing.assert_close(
        Kc.inverse(damping=0.1).to_dense(), P @ Kl.inverse(damping=0.1).to_dense() @ P.T, **TOL
    )
    torch.testing.assert_close(Kc.trace(), Kl.trace(), **TOL)
    torch.testing.assert_close(Kc.logdet(0.1), Kl.logdet(0.1), **TOL)

    # a flat vector and a dict go through the same layout
    flat = torch.randn(Kc.shape[0], generator=g, dtype=DT)
    torch.testing.assert_close(Kc @ flat, P @ (Kl @ (P.T @ flat)), **TOL)
    d = Kc @ dict(zip(Kc.param_names, vc, strict=True))
    for oc, key in zip(out_c, Kc.param_names, strict=True):
        torch.testing.assert_close(d[key], oc, **TOL)


def test_conv1d_ekfac_matches_linear_twin():
    conv, lin = conv1d_pair(frozen_bias=False)
    data = conv1d_data(seq=True)
    opts = {"fisher": "type-2", "bias": "joint"}
    Ec = kronfac.EKFAC(conv, nn.MSELoss(), data, **opts)
    El = kronfac.EKFAC(lin, nn.MSELoss(), data, **opts)
    for name in Ec.factors:
        torch.testing.assert_close(
            Ec.factors.corrections[name].eigenvalues,
            El.factors.corrections[name].eigenvalues,
            **TOL,
        )
    P = transposition(conv)
    torch.testing.assert_close(Ec.to_dense(), P @ El.to_dense() @ P.T, **TOL)


def test_conv1d_is_covered_by_default_and_listed():
    conv, _ = conv1d_pair(frozen_bias=False)
    assert "transformers.pytorch_utils.Conv1D" in supported_layers()
    f = kronfac.compute_factors(conv, nn.MSELoss(), conv1d_data(seq=False), fisher="type-2")
    assert list(f) == ["0", "2"]


# ----------------------------------------------------------------------------------------------
# 2. GPT-2


GPT2_SHAPES = {  # d_in + 1 (joint bias), d_out
    "attn.c_attn": (17, 48),
    "attn.c_proj": (17, 16),
    "mlp.c_fc": (17, 64),
    "mlp.c_proj": (65, 16),
}


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=V,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).to(DT).eval()


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    model = tiny_gpt2()
    ids = torch.randint(0, V, (5, T + 1), generator=gen(3))
    return model, ids


@pytest.fixture(scope="module")
def gpt2_type2(gpt2):
    model, ids = gpt2
    with pytest.warns(kronfac.UncoveredParameterWarning) as record:
        factors = kronfac.compute_factors(
            model,
            nn.CrossEntropyLoss(),
            next_token_batches(ids, 5),
            fisher="type-2",
            forward=lm_logits,
            modules=["h."],
        )
    return factors, record


def test_gpt2_blocks_cover_every_conv1d(gpt2, gpt2_type2):
    model, _ = gpt2
    factors, _ = gpt2_type2
    conv1ds = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1ds) == 8
    assert list(factors) == conv1ds
    for name in conv1ds:
        kind = ".".join(name.split(".")[-2:])
        q, p = GPT2_SHAPES[kind]
        A, S = factors[name]
        assert A.shape == (q, q) and S.shape == (p, p), name
        assert A.dtype == S.dtype == DT
        assert factors.param_names[name] == (f"{name}.weight", f"{name}.bias")
        assert torch.isfinite(A).all() and torch.isfinite(S).all()
        assert S.abs().max() > 0, name
        torch.testing.assert_close(A, A.T, **TOL)
        torch.testing.assert_close(S, S.T, **TOL)
        assert A[-1, -1] == 1  # joint bias: the mean of 1·1
    assert factors.num_data == 5 and factors.num_per_example_loss_terms == T
    # the tied lm_head / wte is not involved
    assert not any(
        "lm_head" in n or "wte" in n
        for names in factors.param_names.values()
        for n in names
        if n is not None
    )


def test_gpt2_layernorm_params_named_in_warning_and_strict_error(gpt2, gpt2_type2):
    model, ids = gpt2
    _, record = gpt2_type2
    lns = [n for n, _ in model.named_parameters() if n.startswith("transformer.h.") and ".ln_" in n]
    assert len(lns) == 8
    messages = [str(w.message) for w in record if w.category is kronfac.UncoveredParameterWarning]
    assert len(messages) == 1
    for n in lns:
        assert n in messages[0]
    assert "ln_f" not in messages[0] and "wte" not in messages[0]

    with pytest.raises(ValueError, match="strict=True") as info:
        kronfac.compute_factors(
            model,
            nn.CrossEntropyLoss(),
            next_token_batches(ids, 5),
            fisher="type-2",
            forward=lm_logits,
            modules=["h."],
            strict=True,
        )
    for n in lns:
        assert n in str(info.value)


def test_gpt2_c_attn_input_factor_against_pre_hook(gpt2):
    model, ids = gpt2
    name = "transformer.h.0.attn.c_attn"
    module = dict(model.named_modules())[name]
    seen: list[Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for X, _ in next_token_batches(ids, 2):
                model(**X)
    finally:
        handle.remove()
    h = torch.cat([x.reshape(-1, 16) for x in seen])
    assert h.shape == (5 * T, 16)
    h1 = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)
    A_ref = h1.T @ h1 / h1.shape[0]  # 1/(N·T) Σ [h;1][h;1]ᵀ

    with no_uncovered_warning():  # c_attn alone: its weight and bias are all covered
        f = kronfac.compute_factors(
            model,
            nn.CrossEntropyLoss(),
            next_token_batches(ids, 2),
            fisher="empirical",
            forward=lm_logits,
            modules=[name],
        )
    assert list(f) == [name]
    torch.testing.assert_close(f[name].A, A_ref, **TOL)


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_gpt2_batching_invariance(gpt2, gpt2_type2, fisher):
    model, ids = gpt2
    loss = nn.CrossEntropyLoss()
    options = {"fisher": fisher, "forward": lm_logits, "modules": ["h."]}
    if fisher == "type-2":
        one, _ = gpt2_type2
    else:
        with pytest.warns(kronfac.UncoveredParameterWarning):
            one = kronfac.compute_factors(model, loss, next_token_batches(ids, 5), **options)
    with pytest.warns(kronfac.UncoveredParameterWarning):
        many = kronfac.compute_factors(model, loss, next_token_batches(ids, 2), **options)
    assert list(one) == list(many)
    for name in one:
        torch.testing.assert_close(one[name].A, many[name].A, **TOL)
        torch.testing.assert_close(one[name].S, many[name].S, **TOL)
    assert many.num_data == 5


def test_gpt2_operator_layout_follows_stored_conv1d_weights(gpt2, gpt2_type2):
    """One real Conv1D block with joint bias: dense operator = P (S ⊗ A) Pᵀ with P built here."""
    model, _ = gpt2
    factors, _ = gpt2_type2
    name = "transformer.h.1.attn.c_proj"
    K = kronfac.KFAC.from_factors(factors, model)
    names = [n for n, p in model.named_parameters() if n.startswith("transformer.h.")]
    covered = [n for n in names if ".ln_" not in n]
    assert K.param_names == covered
    w = f"{name}.weight"
    d_in, d_out = dict(model.named_parameters())[w].shape
    # canonical [d_out, d_in + 1] = [Wᵀ | b], row-major; parameter layout: W [d_in, d_out], b
    idx = torch.arange(d_out * (d_in + 1)).reshape(d_out, d_in + 1)
    perm = torch.cat([idx[:, :d_in].T.reshape(-1), idx[:, d_in]])
    A, S = factors[name]
    block = torch.kron(S, A)[perm][:, perm]
    sizes = dict(model.named_parameters())
    start = sum(sizes[n].numel() for n in covered[: covered.index(w)])
    stop = start + d_in * d_out + d_out
    E = torch.zeros(K.shape[0], 3, dtype=DT)  # random vectors supported on this module
    E[start:stop] = torch.randn(stop - start, 3, generator=gen(9), dtype=DT)
    KE = K @ E
    torch.testing.assert_close(KE[start:stop], block @ E[start:stop], **TOL)
    assert KE[:start].abs().max() == 0 and KE[stop:].abs().max() == 0


# ----------------------------------------------------------------------------------------------
# 3. peft LoRA


def lora_modules(model: nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if ("lora_A.default" in n or "lora_B.default" in n) and isinstance(m, nn.Linear)
    ]


def wrap(model: nn.Module, targets: list[str], **kwargs) -> tuple[nn.Module, nn.Module]:
    """``(base copy, peft model)``; peft's default init leaves lora_B = 0."""
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(model)
    config = peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.get_peft_model(model, config)
    return base, wrapped


@pytest.fixture(scope="module")
def llama_lora():
    model = tiny_llama(V)
    base, wrapped = wrap(model, ["q_proj", "v_proj"])
    ids = torch.randint(0, V, (4, T + 1), generator=gen(5))
    return base, wrapped, ids


@pytest.fixture(scope="module")
def gpt2_lora():
    torch.manual_seed(1)
    base, wrapped = wrap(tiny_gpt2(), ["c_attn"], fan_in_fan_out=True)
    ids = torch.randint(0, V, (4, T + 1), generator=gen(6))
    return base, wrapped, ids


def lora_factors(model, ids, fisher="type-2", size=2):
    with no_uncovered_warning():
        return kronfac.compute_factors(
            model,
            nn.CrossEntropyLoss(),
            next_token_batches(ids, size),
            fisher=fisher,
            forward=lm_logits,
            modules=["lora"],
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_covers_exactly_the_adapters(arch, llama_lora, gpt2_lora):
    _, model, ids = llama_lora if arch == "llama" else gpt2_lora
    d_model, d_out = 16, (16 if arch == "llama" else 48)
    expected = lora_modules(model)
    targets = 2 if arch == "llama" else 1  # q_proj, v_proj / c_attn
    assert len(expected) == 2 * 2 * targets  # A and B of each target in each of two layers
    factors = lora_factors(model, ids)  # no UncoveredParameterWarning: base weights frozen
    assert set(factors) == set(expected)
    assert list(factors) == expected  # named_modules() order
    for name in expected:
        A, S = factors[name]
        assert factors.param_names[name] == (f"{name}.weight", None)
        if ".lora_A." in name:
            assert A.shape == (d_model, d_model) and S.shape == (4, 4)
            # lora_B = 0: nothing reaches lora_A's output
            assert torch.equal(S, torch.zeros_like(S)), name
        else:
            assert A.shape == (4, 4) and S.shape == (d_out, d_out)
            assert S.abs().max() > 0
    K = kronfac.KFAC.from_factors(factors, model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert K.param_names == trainable


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_factors_equal_base_layer_relations(arch, llama_lora, gpt2_lora):
    """With lora_B = 0 the LoRA model computes the base model's function, and

    - lora_A's input is the base layer's input: ``A_A`` = the base layer's ``A`` (no bias part);
    - lora_B's output enters the base layer's output times ``scaling``:
      ``S_B = scaling² · S_base``;
    - lora_B's input is ``W_A x``: ``A_B = W_A A_A W_Aᵀ``.
    """
    base, model, ids = llama_lora if arch == "llama" else gpt2_lora
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    lora = lora_factors(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kronfac.UncoveredParameterWarning)
        ref = kronfac.compute_factors(
            base,
            nn.CrossEntropyLoss(),
            next_token_batches(ids, 2),
            fisher="type-2",
            forward=lm_logits,
            modules=targets,
        )
    modules = dict(model.named_modules())
    checked = 0
    for base_name, (A_base, S_base) in ref.items():
        prefix = f"base_model.model.{base_name}"
        scaling = modules[prefix].scaling["default"]
        a_name, b_name = f"{prefix}.lora_A.default", f"{prefix}.lora_B.default"
        d = modules[a_name].in_features
        torch.testing.assert_close(lora[a_name].A, A_base[:d, :d], **TOL)
        torch.testing.assert_close(lora[b_name].S, scaling**2 * S_base, **TOL)
        W_A = modules[a_name].weight.detach()
        torch.testing.assert_close(lora[b_name].A, W_A @ lora[a_name].A @ W_A.T, **TOL)
        checked += 1
    assert checked == 2 * len(targets)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_lora_with_random_b_chain_relations(arch, fisher, llama_lora, gpt2_lora):
    """With random lora_B: ``g_A = W_Bᵀ g_B`` per vector, so ``S_A = W_Bᵀ S_B W_B ≠ 0``."""
    _, model, ids = llama_lora if arch == "llama" else gpt2_lora
    model = copy.deepcopy(model)
    g = gen(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    factors = lora_factors(model, ids, fisher=fisher)
    modules = dict(model.named_modules())
    for name in lora_modules(model):
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        S_A, S_B = factors[name].S, factors[b_name].S
        assert S_A.abs().max() > 1e-8
        W_B = modules[b_name].weight.detach()
        torch.testing.assert_close(S_A, W_B.T @ S_B @ W_B, **TOL)
    # batching invariance on the LoRA model as well
    one = lora_factors(model, ids, fisher=fisher, size=4)
    for name in factors:
        torch.testing.assert_close(one[name].A, factors[name].A, **TOL)
        torch.testing.assert_close(one[name].S, factors[name].S, **TOL)
