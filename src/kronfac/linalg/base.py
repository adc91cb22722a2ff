"""The block contract: a symmetric matrix acting on ``[p, q]`` matrices flattened row-major.

Every block of a curvature operator implements :meth:`Block.matmat` on a stack ``[p, q, k]``
and exposes its trace, squared Frobenius norm, diagonal and damped log-determinant in closed
form from its structure; the operator assembles blocks into the parameter layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

__all__ = ["Block"]


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
