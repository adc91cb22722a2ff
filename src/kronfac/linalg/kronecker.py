r"""Kronecker-product blocks ``S ⊗ A``, never formed except in :meth:`to_dense`.

For ``S: [p, p]``, ``A: [q, q]`` and a matrix ``V: [p, q]`` flattened row-major
(``vec(V)[i·q + j] = V[i, j]``), Roth's lemma reads

.. math::

    (S \otimes A)\, \mathrm{vec}(V) = \mathrm{vec}(S V A^\top),

which costs ``O(p²q + pq²)`` instead of ``O(p²q²)``. With the eigenvalues ``s`` of ``S`` and
``a`` of ``A``: ``tr(S ⊗ A) = tr S · tr A``, ``‖S ⊗ A‖_F = ‖S‖_F ‖A‖_F``,
``diag(S ⊗ A) = vec(diag S · diag Aᵀ)`` and
``log det(S ⊗ A + δI) = Σ_{ij} log(s_i a_j + δ)`` (for ``δ = 0``:
``q·log det S + p·log det A``).

A block whose ``A`` is ``None`` is a single-factor block ``S`` (acting on ``[p, 1]``), as for a
bias kept apart from its weight; damping never touches its implicit ``1``. A 1-D ``A`` is a
diagonal factor (an embedding's token frequencies), stored and applied as a diagonal:
``(S ⊗ diag a) vec(V) = vec(S V diag a)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kronfac.errors import NotPSDError
from kronfac.linalg.base import Block
from kronfac.linalg.decompositions import cholesky_inverse, eigh, psd_eigenvalues
from kronfac.linalg.eigen import EigenBlock

__all__ = ["KroneckerBlock", "kron_matmul"]


def kron_matmul(S: Tensor, A: Tensor, V: Tensor) -> Tensor:
    """``(S ⊗ A)`` applied to the row-major flattenings of a stack of matrices.

    Args:
        S: ``[p, p]``.
        A: ``[q, q]``.
        V: ``[p, q, k]``: ``k`` matrices stacked on the last dimension.

    Returns:
        ``[p, q, k]``: ``S V_k Aᵀ`` for every ``k``.
    """
    return (S @ V.movedim(-1, 0) @ A.T).movedim(0, -1)


class KroneckerBlock(Block):
    """``S ⊗ A`` (module docstring), with ``A`` dense, diagonal, or absent.

    Args:
        S: ``[p, p]`` output-gradient factor.
        A: ``[q, q]`` input factor; ``[q]`` for a diagonal one (an embedding's token counts);
            ``None`` for a single-factor block ``S`` (a separate bias: ``q = 1``, never damped).
        name: The module (for error messages).
    """

    def __init__(self, S: Tensor, A: Tensor | None, name: str = "") -> None:
        self.S, self.A, self.name = S, A, name
        self._eigen: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None

    @property
    def _diagonal_A(self) -> Tensor | None:
        """The diagonal of a diagonal (or absent: ``[1]``) ``A``; ``None`` for a dense one."""
        if self.A is None:
            return self.S.new_ones(1)
        return self.A if self.A.ndim == 1 else None

    @property
    def shape(self) -> tuple[int, int]:  # noqa: D102
        return self.S.shape[0], 1 if self.A is None else self.A.shape[0]

    def matmat(self, V: Tensor) -> Tensor:  # noqa: D102
        a = self._diagonal_A
        if a is None:
            return kron_matmul(self.S, self.A, V)  # type: ignore[arg-type]
        return (self.S @ V.movedim(-1, 0) * a).movedim(0, -1)

    def trace(self) -> Tensor:  # noqa: D102
        a = self._diagonal_A
        return self.S.trace() * (self.A.trace() if a is None else a.sum())  # type: ignore[union-attr]

    def frobenius_norm_sq(self) -> Tensor:  # noqa: D102
        a = self._diagonal_A
        return self.S.square().sum() * (self.A if a is None else a).square().sum()  # type: ignore[union-attr]

    def diagonal(self) -> Tensor:  # noqa: D102
        a = self._diagonal_A
        return torch.outer(self.S.diagonal(), self.A.diagonal() if a is None else a)  # type: ignore[union-attr]

    def eigen(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(s, Q_S, a, Q_A)``: the factors' eigendecompositions (PSD-checked, cached).

        ``Q_A`` is ``None`` (the identity) for a diagonal or absent ``A``.
        """
        if self._eigen is None:
            s, Q_S = eigh(self.S, self.name)
            a, Q_A = self._diagonal_A, None
            if a is None:
                a, Q_A = eigh(self.A, self.name)  # type: ignore[arg-type]
            self._eigen = (psd_eigenvalues(s, self.name), Q_S, psd_eigenvalues(a, self.name), Q_A)
        return self._eigen

    def logdet(self, damping: float = 0.0) -> Tensor:  # noqa: D102
        s, _, a, _ = self.eigen()
        return (torch.outer(s, a) + damping).log().sum()

    def to_dense(self) -> Tensor:  # noqa: D102
        if self.A is None:
            return self.S
        return torch.kron(self.S, torch.diag(self.A) if self.A.ndim == 1 else self.A)

    def damping_split(
        self, damping: float, heuristic: bool, min_damping: float
    ) -> tuple[float, float]:
        """``(δ_S, δ_A)`` for factored damping ``(S + δ_S I) ⊗ (A + δ_A I)``.

        Plain: ``δ`` on both. Heuristic (Martens & Grosse, 2015, §6.3): with
        ``π = √((tr A / dim A) / (tr S / dim S))``, ``δ_A = max(π√δ, min_damping)`` and
        ``δ_S = max(√δ/π, min_damping)``; single-factor blocks and factors whose mean eigenvalue
        is not positive get the plain ``δ``.
        """
        if heuristic and self.A is not None:
            a = self._diagonal_A
            mean_a = float(self.A.trace() if a is None else a.sum()) / self.A.shape[0]
            mean_s = float(self.S.trace()) / self.S.shape[0]
            if mean_a > 0 and mean_s > 0:
                pi, root = math.sqrt(mean_a / mean_s), math.sqrt(damping)
                return max(root / pi, min_damping), max(pi * root, min_damping)
        return damping, damping

    def inverse(
        self,
        damping: float = 0.0,
        *,
        heuristic: bool = False,
        min_damping: float = 1e-8,
        exact: bool = False,
    ) -> Block:
        """The inverse of the damped block (see :meth:`damping_split`).

        ``exact=True`` inverts ``S ⊗ A + δI`` through the factors' eigendecompositions; otherwise
        ``(S + δ_S I)⁻¹ ⊗ (A + δ_A I)⁻¹`` by Cholesky (float64 retry; a diagonal ``A`` is
        inverted entrywise).

        Raises:
            NotPSDError: If a damped factor (or ``S ⊗ A + δI``) is not positive definite.
        """
        if exact:
            s, Q_S, a, Q_A = self.eigen()
            return EigenBlock(Q_S, Q_A, torch.outer(s, a), self.name).inverse(damping)
        d_S, d_A = self.damping_split(damping, heuristic, min_damping)
        S_inv = cholesky_inverse(self.S, d_S, self.name)
        if self.A is None:
            return KroneckerBlock(S_inv, None, self.name)
        if self.A.ndim == 1:
            damped = self.A + d_A
            if bool((damped <= 0).any()):
                raise NotPSDError(
                    f"Diagonal factor of {self.name or 'a module'} plus damping {d_A:g} is not "
                    "positive definite; increase the damping."
                )
            return KroneckerBlock(S_inv, damped.reciprocal(), self.name)
        return KroneckerBlock(S_inv, cholesky_inverse(self.A, d_A, self.name), self.name)
