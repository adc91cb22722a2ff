"""``kronfac.Laplace`` over peft LoRA adapters of a transformers GPT-2, against torch.func.

K-FAC is exact only where every covered layer sees one position, so with sequences the
posterior covariance ``Σ`` itself is not checked against a dense GGN here
(``test_laplace.py`` does that with one datum). What is exact with sequences, in float64:

1. the layout: ``la.param_names`` are the LoRA parameters and nothing else (frozen base weights,
   LayerNorms and embeddings are not Bayesian), ``la.mean`` is their concatenation, and
   ``Σ⁻¹ = D · K / T + δ I`` for the K-FAC operator ``K`` of the loss;
2. the predictive: ``la.functional_variance(X)`` (``torch.func.vmap`` of ``jacrev`` per
   sequence, in chunks) equals ``J Σ Jᵀ`` with ``J`` from ``jacrev`` of the batched forward
   (left-padded sequences with their ``attention_mask``, GPT-2's ``Conv1D`` base layers under
   ``nn.Linear`` adapters), and the probit predictive is ``softmax(μ / √(1 + π/8 · diag))``.

transformers' SDPA attention decides on a causal-mask shortcut from the values of the
``attention_mask`` (``masking_utils._ignore_causal_mask_sdpa``), data-dependent control flow
that ``vmap`` refuses: with a mask, the Jacobians are taken one sequence at a time, and must
equal eager attention's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import DT, assert_rel_close, gen, randn
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import kronfac
from kronfac.laplace import posterior

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 20
ANSWERS = torch.tensor([3, 5, 7])  # the answer tokens: the classes
TOL = 1e-9
PRIOR = 0.7
TEMPERATURE = 0.5


def gpt2_lora(attention: str) -> nn.Module:
    """A 1-layer, 16-wide GPT-2 in float64 with rank-2 LoRA adapters on ``c_attn``.

    peft's ``lora_B = 0`` would leave every ``lora_A`` without gradient; the adapters are
    drawn at random instead.
    """
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attention,
    )
    model = transformers.GPT2LMHeadModel(config).to(DT).eval()
    lora = peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(model, lora)
    g = gen(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(randn(*p.shape, g=g) / math.sqrt(p.shape[-1]))
    return model


def answer_logits(model: Callable[..., Any], X: dict[str, Tensor]) -> Tensor:
    """The last position's logits of the answer tokens, ``[B, 3]`` (``model``: called with ``X``'s
    keywords)."""
    return model(**X).logits[:, -1, ANSWERS]


def batch(seed: int, n: int, masked: bool) -> tuple[dict[str, Tensor], Tensor]:
    """``n`` sequences of 6 tokens and their classes; ``masked``: left padding of 0–3 tokens."""
    g = gen(seed)
    ids = torch.randint(0, VOCAB, (n, 6), generator=g)
    y = torch.randint(0, len(ANSWERS), (n,), generator=g)
    if not masked:
        return {"input_ids": ids}, y
    pad = torch.arange(n) % 4
    mask = (torch.arange(6)[None, :] >= pad[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}, y


def laplace(attention: str, masked: bool) -> kronfac.Laplace:
    """The Laplace approximation over the adapters, from two batches of 4 and 3 sequences."""
    model = gpt2_lora(attention)
    data = [batch(2, 4, masked), batch(3, 3, masked)]
    return kronfac.Laplace(
        model,
        nn.CrossEntropyLoss(),
        data,
        modules=["lora"],
        forward=answer_logits,
        prior_precision=PRIOR,
        temperature=TEMPERATURE,
    )


def dense_jacobian(la: kronfac.Laplace, X: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The outputs ``[B, C]`` and ``J = ∂f/∂θ`` ``[B, C, P]`` of the batched forward (no vmap)."""
    params = {n: p.detach() for n, p in la.model.named_parameters()}
    lora = {n: params[n] for n in la.param_names}

    def forward(p: dict[str, Tensor]) -> Tensor:
        def call(**inputs: Tensor) -> Tensor:
            return functional_call(la.model, {**params, **p}, (), inputs)

        return answer_logits(call, X)

    f = forward(lora)
    J = jacrev(forward)(lora)
    return f, torch.cat([J[n].reshape(*f.shape, -1) for n in la.param_names], dim=-1)


@pytest.fixture(scope="module")
def eager_masked() -> kronfac.Laplace:
    return laplace("eager", masked=True)


def test_param_names_are_exactly_the_lora_parameters(eager_masked):
    la = eager_masked
    names = [n for n, _ in la.model.named_parameters() if "lora_" in n]
    assert len(names) == 2  # lora_A and lora_B of the one c_attn
    assert la.param_names == names
    assert la.param_names == [n for n, p in la.model.named_parameters() if p.requires_grad]
    params = dict(la.model.named_parameters())
    assert torch.equal(la.mean, torch.cat([params[n].detach().reshape(-1) for n in names]))
    assert la.num_params == sum(params[n].numel() for n in names) == 2 * 16 + 48 * 2
    assert la.num_data == 7


def test_posterior_precision_is_scaled_curvature_plus_prior(eager_masked):
    la = eager_masked
    assert la.hessian_scale == la.num_data  # one class per sequence: D = N
    P = la.hessian_scale * la.curvature.to_dense() / TEMPERATURE
    P = P + PRIOR * torch.eye(la.num_params, dtype=DT)
    assert_rel_close(torch.linalg.inv(la.posterior_covariance().to_dense()), P, TOL, "Σ⁻¹")


# SDPA's CPU kernels have no vmap batching rule: torch loops over the sequences, and says so.
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize(
    ("attention", "masked", "chunk"),
    [("eager", True, None), ("eager", True, 2), ("eager", False, None), ("sdpa", False, None)],
)
def test_functional_variance_equals_dense_j_sigma_jt(attention, masked, chunk, monkeypatch):
    la = laplace(attention, masked)
    X, _ = batch(4, 5, masked)
    if chunk is not None:  # vmap in chunks of 2 sequences (the last one short)
        monkeypatch.setattr(posterior, "_JACOBIAN_BUDGET", chunk * 3 * la.num_params * 8)
    f, J = dense_jacobian(la, X)
    Sigma = la.posterior_covariance().to_dense()
    expected = J @ Sigma @ J.transpose(1, 2)
    variance = la.functional_variance(X)
    probs = la.predictive(X)
    assert_rel_close(variance, expected, TOL, "J Σ Jᵀ")
    kappa = (1 + math.pi / 8 * expected.diagonal(dim1=-2, dim2=-1)).rsqrt()
    assert_rel_close(probs, torch.softmax(kappa * f, dim=-1), TOL, "probit predictive")


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap fallback
def test_sdpa_with_attention_mask_falls_back_to_one_jacobian_per_sequence():
    """SDPA with a mask cannot be vmapped; the per-sequence Jacobians give eager's variance."""
    X = batch(4, 5, masked=True)[0]
    expected = laplace("eager", masked=True).functional_variance(X)
    assert_rel_close(laplace("sdpa", masked=True).functional_variance(X), expected, TOL, "J Σ Jᵀ")
