"""Small helpers shared by the test files: float64 data, seeded parameters, comparisons."""

from __future__ import annotations

import math

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
