"""The block contract: a symmetric matrix acting on ``[p, q]`` matrices flattened row-major.

Every block of a curvature operator implements :meth:`Block.matmat` on a stack ``[p, q, k]``
and exposes its trace, squared Frobenius norm, diagonal and damped log-determinant in closed
form from its structure; the operator assembles blocks into the parameter layout.

Blocks hold their factors with a leading *group* dimension ``g`` (``g = 1`` for all layers but
grouped convolutions): a grouped block is block-diagonal over ``g`` sub-blocks, acting on the
``[g·p, q]`` matrix whose row group ``j`` is sub-block ``j``'s ``[p, q]`` matrix.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["Block", "from_groups", "pi_damping", "to_groups"]


def pi_damping(
    mean_a: Tensor, mean_s: Tensor, damping: float, min_damping: float
) -> tuple[Tensor, Tensor]:
    r"""Factored π-damping ``(δ_S, δ_A)`` (Martens & Grosse, 2015, §6.3), per group.

    With the factors' mean eigenvalues ``ā = tr A / dim A`` and ``s̄ = tr S / dim S``,
    ``π = √(ā / s̄)``, ``δ_A = max(π√δ, min_damping)`` and ``δ_S = max(√δ/π, min_damping)``;
    where a mean eigenvalue is not positive (``π`` would be 0 or undefined) both are ``δ``.

    Args:
        mean_a: ``ā`` per group, ``[g]``.
        mean_s: ``s̄`` per group, ``[g]``.
        damping: ``δ``.
        min_damping: The lower bound.
    """
    ok = (mean_a > 0) & (mean_s > 0)
    pi = torch.where(ok, (mean_a / torch.where(ok, mean_s, 1.0)).clamp(min=0).sqrt(), 1.0)
    root = math.sqrt(damping)
    plain = torch.full_like(pi, float(damping))
    d_S = torch.where(ok, (root / pi).clamp(min=min_damping), plain)
    d_A = torch.where(ok, (root * pi).clamp(min=min_damping), plain)
    return d_S, d_A


def to_groups(V: Tensor, groups: int) -> Tensor:
    """``[g·p, q, k]`` stacked block matrices → ``[g, k, p, q]`` (one ``[p, q]`` per group)."""
    gp, q, k = V.shape
    return V.reshape(groups, gp // groups, q, k).permute(0, 3, 1, 2)


def from_groups(X: Tensor) -> Tensor:
    """Inverse of :func:`to_groups`: ``[g, k, p, q]`` → ``[g·p, q, k]``."""
    g, k, p, q = X.shape
    return X.permute(0, 2, 3, 1).reshape(g * p, q, k)


class Block(ABC):
    """A symmetric ``pq × pq`` matrix acting on row-major flattened ``[p, q]`` matrices.

    Attributes:
        name: The module the block belongs to (for error messages).
    """

    name: str

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """``(p, q)``: the matrices the block acts on."""

    @abstractmethod
    def matmat(self, V: Tensor) -> Tensor:
        """The block applied to a stack of matrices ``[p, q, k]`` → ``[p, q, k]``."""

    @abstractmethod
    def trace(self) -> Tensor:
        """Trace."""

    @abstractmethod
    def frobenius_norm_sq(self) -> Tensor:
        """Squared Frobenius norm."""

    @abstractmethod
    def diagonal(self) -> Tensor:
        """The diagonal as a ``[p, q]`` matrix."""

    @abstractmethod
    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(M + δI)``; ``−inf`` for a singular ``M + δI``."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The dense ``[pq, pq]`` matrix."""
