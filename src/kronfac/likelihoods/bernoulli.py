"""``nn.BCEWithLogitsLoss`` as a Bernoulli likelihood on logits.

Per entry ``ℓ = −y log σ(f) − (1 − y) log(1 − σ(f))``, so

- gradient: ``∂ℓ/∂f = σ(f) − y``;
- Hessian: ``σ(f)(1 − σ(f))`` on the diagonal, square root ``B = diag(√(σ(1 − σ)))``;
- sampling: ``y ~ Bernoulli(σ(f))``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kronfac.likelihoods.base import EntrywiseLikelihood, register_likelihood

__all__ = ["BernoulliLikelihood"]


@register_likelihood(nn.BCEWithLogitsLoss)
class BernoulliLikelihood(EntrywiseLikelihood):
    """Bernoulli likelihood of :class:`torch.nn.BCEWithLogitsLoss` (see the module docstring)."""

    def __init__(self, loss_fn: nn.Module) -> None:
        super().__init__(loss_fn)
        for option in ("weight", "pos_weight"):
            if getattr(loss_fn, option, None) is not None:
                raise NotImplementedError(
                    f"BCEWithLogitsLoss({option}=...) is not supported: a weighted loss is not "
                    "a Bernoulli likelihood. Expected weight=None and pos_weight=None."
                )

    def check(self, output: Tensor, target: Tensor | None) -> None:  # noqa: D102
        super().check(output, target)
        if target is not None and ((target < 0) | (target > 1)).any():
            raise ValueError("BCEWithLogitsLoss: expected targets in [0, 1].")

    def gradient(self, terms: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        return torch.sigmoid(terms) - targets

    def hessian_sqrt(self, terms: Tensor) -> Tensor:  # noqa: D102
        p = torch.sigmoid(terms)
        return torch.diag_embed((p * (1 - p)).sqrt())

    def hessian_matvec(self, terms: Tensor, u: Tensor) -> Tensor:  # noqa: D102
        p = torch.sigmoid(terms)
        return p * (1 - p) * u

    def sample(  # noqa: D102
        self, terms: Tensor, num_samples: int, generator: torch.Generator
    ) -> Tensor:
        p = torch.sigmoid(terms).expand(num_samples, *terms.shape)
        return torch.bernoulli(p, generator=generator)
