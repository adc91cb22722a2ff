"""``nn.MSELoss`` as a Gaussian likelihood with variance ½.

Per entry ``ℓ = (f − y)²`` (torch's MSE before reduction), the negative log-density of
``y ~ N(f, ½)`` up to a constant, so

- gradient: ``∂ℓ/∂f = 2 (f − y)``;
- Hessian: ``∇²_f ℓ = 2 I``, square root ``B = √2 I``;
- sampling: ``y = f + ε/√2``, ``ε ~ N(0, I)``, and ``E[(2(f − y))(2(f − y))ᵀ] = 2 I``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kronfac.likelihoods.base import EntrywiseLikelihood, register_likelihood

__all__ = ["GaussianLikelihood"]


@register_likelihood(nn.MSELoss)
class GaussianLikelihood(EntrywiseLikelihood):
    """Gaussian likelihood of :class:`torch.nn.MSELoss` (see the module docstring)."""

    def gradient(self, terms: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        return 2.0 * (terms - targets)

    def hessian_sqrt(self, terms: Tensor) -> Tensor:  # noqa: D102
        M, C = terms.shape
        eye = torch.eye(C, dtype=terms.dtype, device=terms.device) * math.sqrt(2.0)
        return eye.expand(M, C, C)

    def hessian_matvec(self, terms: Tensor, u: Tensor) -> Tensor:  # noqa: D102
        return 2.0 * u

    def sample(  # noqa: D102
        self, terms: Tensor, num_samples: int, generator: torch.Generator
    ) -> Tensor:
        # one draw per sample, in sample order (the same labels as curvlinops for a seed)
        noise = torch.stack(
            [
                torch.randn(
                    terms.shape, generator=generator, dtype=terms.dtype, device=terms.device
                )
                for _ in range(num_samples)
            ]
        )
        return terms + noise * math.sqrt(0.5)
