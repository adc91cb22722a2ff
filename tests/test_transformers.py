"""A transformers causal LM (random weights from a config): Mapping batches, forward=, sequences."""

import pytest
import torch
from helpers import lm_logits, next_token_batches, tiny_llama
from torch import nn

import kronfac

transformers = pytest.importorskip("transformers")

V, T = 40, 7


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(V)
    ids = torch.randint(0, V, (5, T + 1))
    return model, ids


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_lm_head_factors_equal_closed_form(llama, fisher):
    """lm_head's output at position t only feeds term t: S = Σ_t H_t / (N·T) exactly."""
    model, ids = llama
    factors = kronfac.compute_factors(
        model,
        nn.CrossEntropyLoss(),
        next_token_batches(ids, 2),
        fisher=fisher,
        forward=lm_logits,
        modules=["lm_head"],
    )
    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], output_hidden_states=True)
    h = out.hidden_states[-1].reshape(-1, 16)  # final-norm output, the input of lm_head
    p = out.logits.reshape(-1, V).softmax(-1)
    A_ref = h.T @ h / h.shape[0]
    if fisher == "type-2":
        S_ref = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).sum(0)
    else:
        g = p - nn.functional.one_hot(ids[:, 1:].reshape(-1), V).double()
        S_ref = g.T @ g
    S_ref /= h.shape[0]
    A, S = factors["lm_head"]
    torch.testing.assert_close(A, A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-12)


def test_decoder_layers_batching_invariance_and_shared_inputs(llama):
    model, ids = llama
    loss = nn.CrossEntropyLoss()
    options = {"fisher": "type-2", "forward": lm_logits, "modules": ["layers."]}
    with pytest.warns(kronfac.UncoveredParameterWarning, match="input_layernorm"):
        one = kronfac.compute_factors(model, loss, next_token_batches(ids, 5), **options)
    with pytest.warns(kronfac.UncoveredParameterWarning):
        many = kronfac.compute_factors(model, loss, next_token_batches(ids, 2), **options)
    linears = [n for n, m in model.named_modules() if "layers." in n and isinstance(m, nn.Linear)]
    assert list(one) == linears
    for name in linears:
        torch.testing.assert_close(one[name].A, many[name].A)
        torch.testing.assert_close(one[name].S, many[name].S)
    # queries, keys and values read the same normalised hidden states
    attn = "model.layers.1.self_attn"
    torch.testing.assert_close(one[f"{attn}.q_proj"].A, one[f"{attn}.k_proj"].A, rtol=0, atol=0)
    assert one.num_per_example_loss_terms == T and one.num_data == 5


def test_model_output_without_forward_is_a_clear_error(llama):
    model, ids = llama
    with pytest.raises(TypeError, match="forward="):
        kronfac.compute_factors(
            model, nn.CrossEntropyLoss(), next_token_batches(ids, 5), modules=["lm_head"]
        )
