"""The likelihood interface: how a loss function becomes backpropagated vectors.

A loss ``ℓ(f, y)`` of ``torch.nn`` is read as the negative log-likelihood of independent
*terms*: each term is a vector ``f_m ∈ ℝ^C`` of the model output with its own target. A
likelihood flattens the output into terms ``[M, C]``, and for the **sum** of the per-term losses
provides

- ``gradient(f, y)``: ``∂ℓ/∂f`` per term (empirical Fisher, and MC at sampled labels);
- ``hessian_sqrt(f)``: ``B`` with ``B Bᵀ = ∇²_f ℓ`` per term (type-2), and ``hessian_matvec(f, u)``:
  ``∇²_f ℓ u`` per term without forming it (the Gauss-Newton matrix's products);
- ``sample(f, n, generator)``: ``n`` labels per term from the predictive distribution (MC),
  for which ``E[∇ℓ ∇ℓᵀ] = ∇²_f ℓ``, the same labels as curvlinops for a seed; and
  ``sample_fast``, labels of the same distribution by the cheapest exact sampler (the
  optimizer's, which compares its labels with no other library's);
- ``mean_divisor(num_terms, num_classes)``: the number of entries torch averages over with
  ``reduction="mean"``.

This module is the one place where the reduction scale of docs/conventions.md lives. A loss is
supported once its likelihood is registered (:func:`register_likelihood`), and no longer after
:func:`unregister_likelihood` (tests, replacing a likelihood).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kronfac.registry import Registry

__all__ = [
    "Likelihood",
    "get_likelihood",
    "register_likelihood",
    "supported_losses",
    "unregister_likelihood",
]


class Likelihood(ABC):
    """Negative log-likelihood view of a ``torch.nn`` loss.

    Attributes:
        loss_fn: The loss module this likelihood reads.
        reduction: ``"mean"`` or ``"sum"``, as set on ``loss_fn``.
        entries_per_term: How many output entries one term counts for in torch's mean
            (``1`` for a categorical term, ``C`` for Gaussian / Bernoulli terms whose entries
            are each averaged).
    """

    def __init__(self, loss_fn: nn.Module) -> None:
        reduction = getattr(loss_fn, "reduction", None)
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported. "
                "Supported reductions: 'mean', 'sum'."
            )
        self.loss_fn = loss_fn
        self.reduction: str = reduction

    # -- shapes ---------------------------------------------------------------------------
    @abstractmethod
    def check(self, output: Tensor, target: Tensor | None) -> None:
        """Raise if ``output`` / ``target`` do not fit this loss (``target=None``: skip it).

        Raises:
            ValueError: If the shapes do not fit.
            TypeError: If the target's dtype does not fit.
        """

    @abstractmethod
    def num_classes(self, output: Tensor) -> int:
        """The size ``C`` of one term of ``output``."""

    @abstractmethod
    def to_terms(self, output: Tensor) -> Tensor:
        """Flatten a model output ``[N, ...]`` into its terms ``[M, C]`` (``M = N·R``)."""

    @abstractmethod
    def from_terms(self, vectors: Tensor, output: Tensor) -> Tensor:
        """Inverse of :meth:`to_terms` for a stack ``[K, M, C]``: returns ``[K, *output.shape]``."""

    @abstractmethod
    def targets_to_terms(self, target: Tensor, output: Tensor) -> Tensor:
        """Flatten targets to match :meth:`to_terms`: ``[M]`` (class indices) or ``[M, C]``."""

    def num_terms(self, output: Tensor) -> int:
        """``M``, the number of loss terms of a batch output (``N·R``), without a copy."""
        return output.numel() // self.num_classes(output)

    @property
    @abstractmethod
    def entries_per_term(self) -> int | None:
        """Entries one term counts for in torch's mean; ``None``: ``C`` (every entry a term)."""

    def mean_divisor(self, num_terms: int, num_classes: int) -> int:
        """Number of entries torch averages over for the dataset loss (``1`` for ``sum``).

        ``num_terms`` is the number of (unmasked) loss terms of the whole data, ``N·R`` without
        padding; a categorical term counts once, a Gaussian / Bernoulli term ``C`` times.
        """
        if self.reduction == "sum":
            return 1
        return num_terms * (self.entries_per_term or num_classes)

    def term_mask(self, target: Tensor, output: Tensor) -> Tensor | None:
        """``[M]`` booleans: the terms the loss counts (``None``: all of them)."""
        return None

    # -- curvature --------------------------------------------------------------------------
    @abstractmethod
    def gradient(self, terms: Tensor, targets: Tensor) -> Tensor:
        """``∂ℓ/∂f`` of each term's loss: ``terms [..., M, C]``, targets like :meth:`sample`."""

    @abstractmethod
    def hessian_sqrt(self, terms: Tensor) -> Tensor:
        """``B [M, C, K]`` with ``B_m B_mᵀ = ∇²_f ℓ_m`` for every term ``m`` of ``terms [M, C]``."""

    def hessian_matvec(self, terms: Tensor, u: Tensor) -> Tensor:
        """``∇²_f ℓ_m u_m`` for every term: ``terms [M, C]``, ``u [..., M, C]`` → ``u``'s shape.

        The loss Hessian in output space applied to ``u``, for the Gauss-Newton matrix's
        products ``Jᵀ H J v``: here ``B (Bᵀ u)`` through :meth:`hessian_sqrt`; the built-in
        likelihoods apply ``H`` directly in ``O(M·C)``.
        """
        B = self.hessian_sqrt(terms)  # [M, C, K]
        return torch.einsum("mck,mdk,...md->...mc", B, B, u)

    @abstractmethod
    def sample(self, terms: Tensor, num_samples: int, generator: torch.Generator) -> Tensor:
        """Draw ``num_samples`` labels per term from the predictive distribution.

        Returns:
            ``[num_samples, M]`` class indices or ``[num_samples, M, C]`` values.
        """

    def sample_fast(self, terms: Tensor, num_samples: int, generator: torch.Generator) -> Tensor:
        """:meth:`sample`'s distribution by the cheapest exact sampler, with other labels per seed.

        For callers that compare their labels with no reference (the optimizer); the default is
        :meth:`sample` itself.
        """
        return self.sample(terms, num_samples, generator)


_REGISTRY: Registry[type[nn.Module], type[Likelihood]] = Registry(
    Likelihood,
    "likelihood",
    "likelihood",
    "likelihood",
    lambda t: t.__name__,
)


def register_likelihood(
    loss_type: type[nn.Module],
) -> Callable[[type[Likelihood]], type[Likelihood]]:
    """Class decorator registering a :class:`Likelihood` for a loss type (exactly that type).

    Registering a loss type's likelihood again changes nothing; another likelihood for a
    registered loss type is refused: :func:`unregister_likelihood` the type first to replace it.

    Args:
        loss_type: The loss module's class (an ``nn.Module`` with a ``reduction`` attribute).

    Returns:
        The decorator, which returns the likelihood class unchanged.

    Raises:
        TypeError: (from the decorator) If the decorated class is not a :class:`Likelihood`.
        ValueError: (from the decorator) If ``loss_type`` already has another likelihood.
    """
    return _REGISTRY.register(loss_type)


def unregister_likelihood(loss_type: type[nn.Module]) -> type[Likelihood]:
    """Remove the likelihood of ``loss_type`` (for tests): the loss is unsupported afterwards.

    Args:
        loss_type: The loss type given to :func:`register_likelihood`.

    Returns:
        The likelihood class that was registered (to register it again).

    Raises:
        KeyError: If no likelihood is registered for ``loss_type``.
    """
    return _REGISTRY.unregister(loss_type)


def supported_losses() -> tuple[str, ...]:
    """Names of the loss types with a registered likelihood."""
    return _REGISTRY.names()


def get_likelihood(loss_fn: nn.Module) -> Likelihood:
    """The likelihood of ``loss_fn``.

    Raises:
        NotImplementedError: If the loss type has no registered likelihood.
    """
    cls = _REGISTRY.get(type(loss_fn))
    if cls is None:
        raise NotImplementedError(
            f"Unsupported loss {type(loss_fn).__name__}. "
            f"Supported: {', '.join(supported_losses())}."
        )
    return cls(loss_fn)


class EntrywiseLikelihood(Likelihood):
    """A likelihood whose every output entry is an independent term (Gaussian, Bernoulli).

    The output ``[N, d1, ..., C]`` (or ``[N]``, read as ``C = 1``) has ``R = d1·…`` terms of size
    ``C`` per data point, the target has the output's shape, and torch's mean averages over all
    ``N·R·C`` entries.
    """

    entries_per_term = None

    def check(self, output: Tensor, target: Tensor | None) -> None:
        name = type(self.loss_fn).__name__
        if output.ndim == 0:
            raise ValueError(f"{name}: expected a batched output [N, ...], got a scalar.")
        if target is None:
            return
        if not target.is_floating_point():
            raise TypeError(f"{name}: expected floating-point targets, got dtype {target.dtype}.")
        if target.shape != output.shape:
            raise ValueError(
                f"{name}: expected targets of the output's shape {tuple(output.shape)}, "
                f"got {tuple(target.shape)}."
            )

    def num_classes(self, output: Tensor) -> int:
        return 1 if output.ndim == 1 else output.shape[-1]

    def to_terms(self, output: Tensor) -> Tensor:
        return output.reshape(-1, self.num_classes(output))

    def from_terms(self, vectors: Tensor, output: Tensor) -> Tensor:
        return vectors.reshape(vectors.shape[0], *output.shape)

    def targets_to_terms(self, target: Tensor, output: Tensor) -> Tensor:
        return self.to_terms(target)
