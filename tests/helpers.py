"""Small helpers shared by the test files: float64 data, seeded parameters, comparisons."""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

DT = torch.float64
TOL = 1e-10  # exact identities in float64: round-off only


def gen(seed: int) -> torch.Generator:
    """A private generator (the global RNG is never touched by the tests' data)."""
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator) -> Tensor:
    """Standard normal float64 tensor drawn from ``g``."""
    return torch.randn(*shape, generator=g, dtype=DT)


def init(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic float64 parameters scaled by the fan-in (without the global RNG)."""
    g = gen(seed)
    model.to(DT)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(randn(*p.shape, g=g) / math.sqrt(fan_in))
    return model


def assert_rel_close(actual, expected, tol: float = TOL, what: str = "") -> None:
    """``max|actual - expected| <= tol · max|expected|`` (and the same shape)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual = actual.to(expected.dtype)
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(scale, 1e-300), (
        f"{what}: max abs error {err:.3e}, reference max {scale:.3e} "
        f"(rel {err / max(scale, 1e-300):.3e}, tol {tol:.0e})"
    )


def param_slices(model: nn.Module) -> dict[str, slice]:
    out, start = {}, 0
    for n, p in model.named_parameters():
        out[n] = slice(start, start + p.numel())
        start += p.numel()
    return out


def kfac_block(S: Tensor, A: Tensor, joint: bool) -> Tensor:
    """Dense ``S ⊗ A`` of one Linear layer in the *parameter* layout ``[vec W, b]``.

    ``joint``: ``A`` is ``[d_in+1, d_in+1]`` and ``torch.kron(S, A)`` acts on the row-major
    flattening of ``[W | b]``; we permute it to ``(W.flatten(), b)``. Separate: block-diagonal
    ``diag(S ⊗ A, S)``.
    """
    d_out = S.shape[0]
    if not joint:
        d_in = A.shape[0]
        M = torch.zeros(d_out * (d_in + 1), d_out * (d_in + 1), dtype=S.dtype)
        M[: d_out * d_in, : d_out * d_in] = torch.kron(S, A)
        M[d_out * d_in :, d_out * d_in :] = S
        return M
    d_in = A.shape[0] - 1
    K = torch.kron(S, A)  # index i*(d_in+1) + j
    perm = [i * (d_in + 1) + j for i in range(d_out) for j in range(d_in)]
    perm += [i * (d_in + 1) + d_in for i in range(d_out)]
    perm_t = torch.tensor(perm)
    return K[perm_t][:, perm_t]


def tiny_llama(vocab: int) -> nn.Module:
    """A 2-layer, 16-wide LlamaForCausalLM in float64, eval mode, random weights (no download)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    return transformers.LlamaForCausalLM(config).to(DT).eval()


def require_peer(name: str) -> ModuleType:
    """Import a peer library the compatibility tests compare against.

    Skips locally when it is not installed; on CI (``CI`` set, where ``.ci/run`` installs the
    peers) a missing peer is an error, so the comparisons cannot silently stop running.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must install {name!r} for the compatibility tests.") from err
        pytest.skip(f"{name} is not installed", allow_module_level=True)
