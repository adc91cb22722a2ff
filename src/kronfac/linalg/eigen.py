r"""Blocks diagonal in a Kronecker-factored eigenbasis (EKFAC, exactly damped inverses).

.. math::

    M = (Q_S \otimes Q_A)\, \mathrm{diag}(\mathrm{vec}\,\Lambda)\, (Q_S \otimes Q_A)^\top,

    M\, \mathrm{vec}(V) = \mathrm{vec}\big(Q_S ((Q_S^\top V Q_A) \odot \Lambda) Q_A^\top\big),

with ``Λ: [p, q]`` (row-major ``vec``). Then ``tr M = Σ Λ``, ``‖M‖_F² = Σ Λ²``,
``log det(M + δI) = Σ log(Λ + δ)``, ``(M + δI)⁻¹`` has eigenvalues ``1/(Λ + δ)``, and the
diagonal is ``(Q_S ∘ Q_S) Λ (Q_A ∘ Q_A)ᵀ``. With partial bases (low-rank factors) the
complement of their span carries one more eigenvalue ``c`` in every formula. An identity basis
(a diagonal or identity factor) is held as ``None`` and skipped in every product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kronfac.errors import NotPSDError
from kronfac.linalg.base import Block, from_groups, to_groups
from kronfac.linalg.decompositions import psd_eigenvalues

__all__ = ["EigenBlock"]


def _rotate(X: Tensor, Q_S: Tensor | None, Q_A: Tensor | None, back: bool) -> Tensor:
    """``Q_Sᵀ X Q_A`` (or, ``back``, ``Q_S X Q_Aᵀ``) for ``X: [g, k, ·, ·]``; ``None``: identity."""
    if Q_S is not None:
        X = (Q_S[:, None] if back else Q_S[:, None].transpose(-1, -2)) @ X
    if Q_A is not None:
        X = X @ (Q_A[:, None].transpose(-1, -2) if back else Q_A[:, None])
    return X


class EigenBlock(Block):
    """``c·I + (Q_S ⊗ Q_A) diag(Λ − c) (Q_S ⊗ Q_A)ᵀ`` (module docstring), per group.

    The bases may be partial (``k_S ≤ p`` and ``k_A ≤ q`` columns, as for low-rank factors):
    the orthogonal complement of their span then has the eigenvalue ``complement`` (``c``).

    Args:
        Q_S: ``[p, k_S]`` (or ``[g, p, k_S]``) orthonormal columns, or ``None`` for the
            identity (``k_S = p``: a diagonal or identity ``S``, eigenvalues in coordinate
            order).
        Q_A: ``[q, k_A]`` (or ``[g, q, k_A]``) orthonormal columns, or ``None`` for the
            identity (a diagonal, identity or absent ``A``).
        eigenvalues: ``Λ: [k_S, k_A]`` (or ``[g, k_S, k_A]``).
        name: The module (for error messages).
        complement: ``c``, the eigenvalue of the complement of partial bases.
    """

    def __init__(
        self,
        Q_S: Tensor | None,
        Q_A: Tensor | None,
        eigenvalues: Tensor,
        name: str = "",
        complement: float = 0.0,
    ) -> None:
        if eigenvalues.ndim == 2:
            eigenvalues = eigenvalues[None]
            Q_S, Q_A = (None if Q is None else Q[None] for Q in (Q_S, Q_A))
        g, kS, kA = eigenvalues.shape
        p = kS if Q_S is None else Q_S.shape[-2]
        q = kA if Q_A is None else Q_A.shape[-2]
        if (Q_S is not None and Q_S.shape != (g, p, kS)) or (
            Q_A is not None and Q_A.shape != (g, q, kA)
        ):
            raise ValueError(
                f"{name}: eigenvalues {tuple(eigenvalues.shape)} do not fit the eigenbases "
                f"{None if Q_S is None else tuple(Q_S.shape)} and "
                f"{None if Q_A is None else tuple(Q_A.shape)}."
            )
        self.Q_S, self.Q_A, self.eigenvalues, self.name = Q_S, Q_A, eigenvalues, name
        self.complement = float(complement)
        self._sides = (p, q)
        self._rest = g * (p * q - kS * kA)  # eigenvalues equal to the complement's

    @property
    def shape(self) -> tuple[int, int]:  # noqa: D102
        return self.eigenvalues.shape[0] * self._sides[0], self._sides[1]

    def matmat(self, V: Tensor) -> Tensor:  # noqa: D102
        c = self.complement
        X = to_groups(V, self.eigenvalues.shape[0])  # [g, k, p, q]
        R = _rotate(X, self.Q_S, self.Q_A, back=False)
        R = _rotate(R * (self.eigenvalues[:, None] - c), self.Q_S, self.Q_A, back=True)
        return from_groups(R + c * X if c else R)

    def coordinates(self, V: Tensor) -> Tensor:
        """The coordinates of ``V``'s ``k`` columns in the basis ``Q_S ⊗ Q_A``.

        Args:
            V: ``[g·p, q, k]`` block matrices (the layout of :meth:`matmat`).

        Returns:
            ``[k, g·k_S·k_A]``, ordered as ``eigenvalues.reshape(-1)``; with partial bases the
            part of ``V`` in the complement is not represented.
        """
        R = _rotate(to_groups(V, self.eigenvalues.shape[0]), self.Q_S, self.Q_A, back=False)
        return R.transpose(0, 1).reshape(R.shape[1], -1)  # [g, k, kS, kA] → [k, g·kS·kA]

    @property
    def complement_size(self) -> int:
        """How many eigenvalues equal :attr:`complement` (0 for complete bases)."""
        return self._rest

    def trace(self) -> Tensor:  # noqa: D102
        return self.eigenvalues.sum() + self.complement * self._rest

    def frobenius_norm_sq(self) -> Tensor:  # noqa: D102
        return self.eigenvalues.square().sum() + self.complement**2 * self._rest

    def diagonal(self) -> Tensor:  # noqa: D102
        out = self.eigenvalues - self.complement
        if self.Q_S is not None:
            out = self.Q_S.square() @ out
        if self.Q_A is not None:
            out = out @ self.Q_A.square().transpose(-1, -2)
        out = out + self.complement
        return out.reshape(-1, out.shape[-1])

    def logdet(self, damping: float = 0.0) -> Tensor:  # noqa: D102
        lam, rest = self._damped(damping)
        out = lam.log().sum()
        return out + self._rest * rest.log() if self._rest else out

    def to_dense(self) -> Tensor:  # noqa: D102
        g = self.eigenvalues.shape[0]
        p, q = self._sides
        c, dense = self.complement, []
        for j in range(g):
            Q_S, Q_A = (
                torch.eye(n).to(self.eigenvalues) if Q is None else Q[j]
                for Q, n in ((self.Q_S, p), (self.Q_A, q))
            )
            Q = torch.kron(Q_S.contiguous(), Q_A.contiguous())
            M = (Q * (self.eigenvalues[j].reshape(-1) - c)) @ Q.T
            dense.append(M + c * torch.eye(p * q).to(M))
        return torch.block_diag(*dense)

    def spectrum(self) -> Tensor:
        """``Λ`` flat (``[g·k_S·k_A]``), PSD-checked, round-off negatives set to 0.

        ``Λ``'s entries are products of two factors' eigenvalues (each cleaned when its
        factor was decomposed) or EKFAC's sums of squares, not the eigenvalues of one
        ``[p·q, p·q]`` decomposition: the tolerance is one entry's round-off
        (:func:`~kronfac.linalg.decompositions.psd_eigenvalues` with ``size=1``), so small
        but exact eigenvalues are kept.

        Raises:
            NotPSDError: If an eigenvalue is clearly negative.
        """
        return psd_eigenvalues(self.eigenvalues.reshape(-1), self.name, size=1)

    def _damped(self, damping: float) -> tuple[Tensor, Tensor]:
        """``(Λ + δ, c + δ)`` from :meth:`spectrum`."""
        lam = self.spectrum()
        rest = torch.tensor(self.complement + damping, dtype=lam.dtype)
        if self._rest and float(rest) < 0:
            raise NotPSDError(f"Block of {self.name or 'a module'} is not PSD after damping.")
        return lam.reshape(self.eigenvalues.shape) + damping, rest

    def inverse(self, damping: float = 0.0) -> EigenBlock:
        """``(M + δI)⁻¹`` in the same eigenbasis.

        Raises:
            NotPSDError: If an eigenvalue of ``M + δI`` is not positive.
        """
        lam, rest = self._damped(damping)
        if bool((lam <= 0).any()) or (self._rest and float(rest) <= 0):
            raise NotPSDError(
                f"Block of {self.name or 'a module'} is singular after damping {damping:g} "
                "(an eigenvalue is 0); increase the damping."
            )
        c = 1.0 / float(rest) if self._rest else 0.0
        return EigenBlock(self.Q_S, self.Q_A, lam.reciprocal(), self.name, complement=c)
