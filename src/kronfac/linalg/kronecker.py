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

import torch
from torch import Tensor

from kronfac.errors import NotPSDError
from kronfac.linalg.base import Block, from_groups, pi_damping, to_groups
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
    """``S ⊗ A`` (module docstring), with ``A`` dense, diagonal, or absent; optionally grouped.

    Args:
        S: ``[p, p]`` output-gradient factor, or ``[g, p, p]`` for ``g`` groups.
        A: ``[q, q]`` input factor; ``[q]`` for a diagonal one (an embedding's token counts);
            ``None`` for a single-factor block ``S`` (a separate bias: ``q = 1``, never damped).
            With groups: ``[g, q, q]`` or ``[g, q]``.
        name: The module (for error messages).
        heuristic_A: For a single-factor block, the input factor of its weight's block, whose
            ``π`` then sets ``δ_S`` under heuristic damping (as for the weight).
    """

    def __init__(
        self, S: Tensor, A: Tensor | None, name: str = "", heuristic_A: Tensor | None = None
    ) -> None:
        self.grouped = S.ndim == 3
        if not self.grouped:
            S, A = S[None], None if A is None else A[None]
            heuristic_A = None if heuristic_A is None else heuristic_A[None]
        self.S, self.A, self.name = S, A, name
        self.heuristic_A = heuristic_A
        self._eigen: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None

    def _factor(self, M: Tensor | None) -> Tensor | None:
        """A factor as given to the constructor (without the group dimension if ungrouped)."""
        return M if M is None or self.grouped else M[0]

    @property
    def _diagonal_A(self) -> Tensor | None:
        """``[g, q]``: a diagonal (or absent: ones ``[g, 1]``) ``A``; ``None`` for a dense one."""
        if self.A is None:
            return self.S.new_ones(self.S.shape[0], 1)
        return self.A if self.A.ndim == 2 else None

    def _diagonal_of_A(self) -> Tensor:
        """``[g, q]``: the diagonal of ``A`` whatever its form."""
        a = self._diagonal_A
        return self.A.diagonal(dim1=-2, dim2=-1) if a is None else a  # type: ignore[union-attr]

    @property
    def shape(self) -> tuple[int, int]:  # noqa: D102
        g, p, _ = self.S.shape
        return g * p, 1 if self.A is None else self.A.shape[-1]

    def matmat(self, V: Tensor) -> Tensor:  # noqa: D102
        if self.S.shape[0] == 1 and V.shape[-1] == 1 and self._diagonal_A is None:
            # one group, one vector (an optimizer step): two plain GEMMs, no broadcasting
            return (self.S[0] @ V[..., 0] @ self.A[0].T).unsqueeze(-1)  # type: ignore[index]
        X = self.S[:, None] @ to_groups(V, self.S.shape[0])  # [g, k, p, q]
        a = self._diagonal_A
        X = X @ self.A[:, None].transpose(-1, -2) if a is None else X * a[:, None, None]  # type: ignore[index]
        return from_groups(X)

    def trace(self) -> Tensor:  # noqa: D102
        trS = self.S.diagonal(dim1=-2, dim2=-1).sum(-1)
        return (trS * self._diagonal_of_A().sum(-1)).sum()

    def frobenius_norm_sq(self) -> Tensor:  # noqa: D102
        a = self._diagonal_A
        A2 = self.A.square().sum((-1, -2)) if a is None else a.square().sum(-1)  # type: ignore[union-attr]
        return (self.S.square().sum((-1, -2)) * A2).sum()

    def diagonal(self) -> Tensor:  # noqa: D102
        dS = self.S.diagonal(dim1=-2, dim2=-1)
        out = dS[:, :, None] * self._diagonal_of_A()[:, None, :]
        return out.reshape(-1, out.shape[-1])

    def eigen(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(s, Q_S, a, Q_A)`` per group: ``[g, p]``, ``[g, p, p]``, ``[g, q]``, ``[g, q, q]``.

        PSD-checked and cached; ``Q_A`` is ``None`` (the identity) for a diagonal or absent
        ``A``.
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
        return (s[:, :, None] * a[:, None, :] + damping).log().sum()

    def to_dense(self) -> Tensor:  # noqa: D102
        a = self._diagonal_A
        blocks = [
            torch.kron(S, torch.diag(a[j]) if a is not None else self.A[j])  # type: ignore[index]
            for j, S in enumerate(self.S)
        ]
        return torch.block_diag(*blocks)

    def damping_split(
        self, damping: float, heuristic: bool, min_damping: float
    ) -> tuple[Tensor, Tensor]:
        """``(δ_S, δ_A)`` per group for factored damping ``(S + δ_S I) ⊗ (A + δ_A I)``.

        Plain: ``δ`` on both. Heuristic (Martens & Grosse, 2015, §6.3): with
        ``π = √((tr A / dim A) / (tr S / dim S))``, ``δ_A = max(π√δ, min_damping)`` and
        ``δ_S = max(√δ/π, min_damping)``; a single-factor block takes ``π`` from
        ``heuristic_A`` (its weight's input factor) or, without one, the plain ``δ``, as do
        factors whose mean eigenvalue is not positive.
        """
        g = self.S.shape[0]
        plain = torch.full((g,), float(damping), dtype=self.S.dtype, device=self.S.device)
        A = self.A if self.A is not None else self.heuristic_A
        if not heuristic or A is None:
            return plain, plain.clone()
        mean_a = (A if A.ndim == 2 else A.diagonal(dim1=-2, dim2=-1)).mean(-1)
        mean_s = self.S.diagonal(dim1=-2, dim2=-1).mean(-1)
        return pi_damping(mean_a, mean_s, damping, min_damping)

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
            lam = s[:, :, None] * a[:, None, :]
            return EigenBlock(Q_S, Q_A, lam, self.name).inverse(damping)
        d_S, d_A = self.damping_split(damping, heuristic, min_damping)
        S_inv = cholesky_inverse(self.S, d_S, self.name)
        if self.A is None:
            A_inv = None
        elif self.A.ndim == 2:  # diagonal
            damped = self.A + d_A[:, None]
            if bool((damped <= 0).any()):
                raise NotPSDError(
                    f"Diagonal factor of {self.name or 'a module'} plus damping "
                    f"{float(d_A.min()):g} is not positive definite; increase the damping."
                )
            A_inv = damped.reciprocal()
        else:
            A_inv = cholesky_inverse(self.A, d_A, self.name)
        return KroneckerBlock(self._factor(S_inv), self._factor(A_inv), self.name)  # type: ignore[arg-type]
