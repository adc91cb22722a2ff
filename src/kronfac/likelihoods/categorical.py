"""``nn.CrossEntropyLoss`` (class-index targets) as a categorical likelihood on logits.

Logits ``[N, C]`` or ``[N, C, d1, ...]`` (torch's shape rules) hold ``R = d1·…`` terms per
data point; each term ``f ∈ ℝ^C`` with ``p = softmax(f)`` has

- loss ``ℓ = −log p_y``, gradient ``∂ℓ/∂f = p − e_y``;
- Hessian ``diag(p) − p pᵀ`` (applied as ``p ∘ u − p (pᵀu)``), square root
  ``B = diag(√p) − p √pᵀ``
  (``B Bᵀ = diag(p) − 2 p pᵀ + p pᵀ Σ_k p_k = diag(p) − p pᵀ``);
- sampling ``y ~ Categorical(p)``: ``sample`` with ``torch.multinomial`` (one exponential per
  class, the labels of curvlinops for a seed), ``sample_fast`` by the inverse CDF (one uniform
  ``u`` per draw, the first class whose cumulative probability exceeds ``u``).

torch's mean averages over the ``N·R`` terms, less those whose target is ``ignore_index``
(dropped from the loss, its mean and the curvature alike).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kronfac.likelihoods.base import Likelihood, register_likelihood

__all__ = ["CategoricalLikelihood"]


@register_likelihood(nn.CrossEntropyLoss)
class CategoricalLikelihood(Likelihood):
    """Categorical likelihood of :class:`torch.nn.CrossEntropyLoss` (module docstring)."""

    entries_per_term = 1
    loss_fn: nn.CrossEntropyLoss  # the registered loss type

    def __init__(self, loss_fn: nn.Module) -> None:
        super().__init__(loss_fn)
        if loss_fn.weight is not None:
            raise NotImplementedError(
                "CrossEntropyLoss(weight=...) is not supported: a class-weighted loss is not a "
                "categorical likelihood. Expected weight=None."
            )
        if loss_fn.label_smoothing != 0.0:
            raise NotImplementedError(
                "CrossEntropyLoss(label_smoothing=...) is not supported. "
                "Expected label_smoothing=0.0."
            )

    def check(self, output: Tensor, target: Tensor | None) -> None:  # noqa: D102
        if output.ndim < 2:
            raise ValueError(
                "CrossEntropyLoss: expected logits [N, C] or [N, C, d1, ...], "
                f"got shape {tuple(output.shape)}."
            )
        if target is None:
            return
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                "CrossEntropyLoss: expected class-index targets of an integer dtype, "
                f"got dtype {target.dtype} (class-probability targets are not supported)."
            )
        expected = (output.shape[0], *output.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(
                f"CrossEntropyLoss: expected targets of shape {expected} for logits of shape "
                f"{tuple(output.shape)}, got {tuple(target.shape)}."
            )
        C = output.shape[1]
        used = target[target != self.loss_fn.ignore_index]
        if used.numel() and (used.min() < 0 or used.max() >= C):
            raise ValueError(
                f"CrossEntropyLoss: expected class indices in [0, {C}) (or ignore_index="
                f"{self.loss_fn.ignore_index}), got values in [{int(used.min())}, "
                f"{int(used.max())}]."
            )

    def term_mask(self, target: Tensor, output: Tensor) -> Tensor | None:
        """Terms whose target is ``ignore_index`` are dropped, as torch drops them."""
        keep = self.targets_to_terms(target, output) != self.loss_fn.ignore_index
        return None if bool(keep.all()) else keep

    def num_classes(self, output: Tensor) -> int:  # noqa: D102
        return output.shape[1]

    def to_terms(self, output: Tensor) -> Tensor:  # noqa: D102
        return output.movedim(1, -1).reshape(-1, output.shape[1])

    def from_terms(self, vectors: Tensor, output: Tensor) -> Tensor:  # noqa: D102
        K, C = vectors.shape[0], output.shape[1]
        shape = (K, output.shape[0], *output.shape[2:], C)
        return vectors.reshape(shape).movedim(-1, 2)

    def targets_to_terms(self, target: Tensor, output: Tensor) -> Tensor:  # noqa: D102
        return target.reshape(-1)

    def gradient(self, terms: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        p = torch.softmax(terms, dim=-1).expand(*targets.shape, terms.shape[-1])
        one_hot = torch.zeros_like(p).scatter_(-1, targets.unsqueeze(-1), 1.0)
        return p - one_hot

    def hessian_sqrt(self, terms: Tensor) -> Tensor:  # noqa: D102
        p = torch.softmax(terms, dim=-1)
        sqrt_p = p.sqrt()
        # B[m, i, k] = √p_k (δ_ik − p_i)
        return torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)

    def hessian_matvec(self, terms: Tensor, u: Tensor) -> Tensor:  # noqa: D102
        p = torch.softmax(terms, dim=-1)  # (diag(p) − p pᵀ) u = p ∘ u − p (pᵀu)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def sample(  # noqa: D102
        self, terms: Tensor, num_samples: int, generator: torch.Generator
    ) -> Tensor:
        p = torch.softmax(terms, dim=-1)
        # one draw per sample, in sample order (the same labels as curvlinops for a seed)
        draws = [
            torch.multinomial(p, 1, replacement=True, generator=generator)
            for _ in range(num_samples)
        ]
        return torch.cat(draws, dim=1).T

    def sample_fast(  # noqa: D102
        self, terms: Tensor, num_samples: int, generator: torch.Generator
    ) -> Tensor:
        cdf = torch.softmax(terms, dim=-1).cumsum(dim=-1)  # [M, C], non-decreasing
        u = torch.rand(
            terms.shape[0], num_samples, generator=generator, dtype=cdf.dtype, device=cdf.device
        )
        u = u * cdf[:, -1:]  # [M, num_samples] below the total (1 up to round-off), as u < 1
        # the first class whose cdf exceeds u: class k with probability p_k / total (a product
        # u·total rounded up to the total, probability ~ε, gives the last class: the clamp)
        labels = torch.searchsorted(cdf, u, right=True).clamp_(max=terms.shape[-1] - 1)
        return labels.T
