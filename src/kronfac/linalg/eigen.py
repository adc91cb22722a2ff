r"""Blocks diagonal in a Kronecker-factored eigenbasis (EKFAC, exactly damped inverses).

.. math::

    M = (Q_S \otimes Q_A)\, \mathrm{diag}(\mathrm{vec}\,\Lambda)\, (Q_S \otimes Q_A)^\top,

    M\, \mathrm{vec}(V) = \mathrm{vec}\big(Q_S ((Q_S^\top V Q_A) \odot \Lambda) Q_A^\top\big),

with ``Λ: [p, q]`` (row-major ``vec``). Then ``tr M = Σ Λ``, ``‖M‖_F² = Σ Λ²``,
``log det(M + δI) = Σ log(Λ + δ)``, ``(M + δI)⁻¹`` has eigenvalues ``1/(Λ + δ)``, and the
diagonal is ``(Q_S ∘ Q_S) Λ (Q_A ∘ Q_A)ᵀ``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kronfac.errors import NotPSDError
from kronfac.linalg.base import Block, from_groups, to_groups
from kronfac.linalg.decompositions import psd_eigenvalues

__all__ = ["EigenBlock"]


class EigenBlock(Block):
    """``(Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ`` (module docstring), per group.

    Args:
        Q_S: ``[p, p]`` (or ``[g, p, p]``) orthonormal columns.
        Q_A: ``[q, q]`` (or ``[g, q, q]``) orthonormal columns, or ``None`` for the identity
            (a diagonal ``A``).
        eigenvalues: ``Λ: [p, q]`` (or ``[g, p, q]``).
        name: The module (for error messages).
    """

    def __init__(
        self, Q_S: Tensor, Q_A: Tensor | None, eigenvalues: Tensor, name: str = ""
    ) -> None:
        if Q_S.ndim == 2:
            Q_S, eigenvalues = Q_S[None], eigenvalues[None]
            Q_A = None if Q_A is None else Q_A[None]
        g, p, _ = Q_S.shape
        q = eigenvalues.shape[-1] if Q_A is None else Q_A.shape[-1]
        if eigenvalues.shape != (g, p, q) or (Q_A is not None and Q_A.shape != (g, q, q)):
            raise ValueError(
                f"{name}: eigenvalues {tuple(eigenvalues.shape)} do not fit the eigenbases "
                f"{tuple(Q_S.shape)} and {None if Q_A is None else tuple(Q_A.shape)}."
            )
        self.Q_S, self.Q_A, self.eigenvalues, self.name = Q_S, Q_A, eigenvalues, name

    @property
    def shape(self) -> tuple[int, int]:  # noqa: D102
        g, p, q = self.eigenvalues.shape
        return g * p, q

    def matmat(self, V: Tensor) -> Tensor:  # noqa: D102
        Q_S = self.Q_S[:, None]
        X = Q_S.transpose(-1, -2) @ to_groups(V, self.eigenvalues.shape[0])  # [g, k, p, q]
        if self.Q_A is not None:
            X = X @ self.Q_A[:, None]
        X = Q_S @ (X * self.eigenvalues[:, None])
        if self.Q_A is not None:
            X = X @ self.Q_A[:, None].transpose(-1, -2)
        return from_groups(X)

    def trace(self) -> Tensor:  # noqa: D102
        return self.eigenvalues.sum()

    def frobenius_norm_sq(self) -> Tensor:  # noqa: D102
        return self.eigenvalues.square().sum()

    def diagonal(self) -> Tensor:  # noqa: D102
        out = self.Q_S.square() @ self.eigenvalues
        if self.Q_A is not None:
            out = out @ self.Q_A.square().transpose(-1, -2)
        return out.reshape(-1, out.shape[-1])

    def logdet(self, damping: float = 0.0) -> Tensor:  # noqa: D102
        return self._damped(damping).log().sum()

    def to_dense(self) -> Tensor:  # noqa: D102
        g, _, q = self.eigenvalues.shape
        dense = []
        for j in range(g):
            Q_A = self.Q_A[j] if self.Q_A is not None else torch.eye(q).to(self.Q_S)
            Q = torch.kron(self.Q_S[j], Q_A)
            dense.append((Q * self.eigenvalues[j].reshape(-1)) @ Q.T)
        return torch.block_diag(*dense)

    def _damped(self, damping: float) -> Tensor:
        """``Λ + δ``, with eigenvalues within round-off of zero set to 0 (PSD-checked)."""
        lam = psd_eigenvalues(self.eigenvalues.reshape(-1), self.name)
        return lam.reshape(self.eigenvalues.shape) + damping

    def inverse(self, damping: float = 0.0) -> EigenBlock:
        """``(M + δI)⁻¹`` in the same eigenbasis.

        Raises:
            NotPSDError: If an eigenvalue of ``M + δI`` is not positive.
        """
        lam = self._damped(damping)
        if bool((lam <= 0).any()):
            raise NotPSDError(
                f"Block of {self.name or 'a module'} is singular after damping {damping:g} "
                "(an eigenvalue is 0); increase the damping."
            )
        return EigenBlock(self.Q_S, self.Q_A, lam.reciprocal(), self.name)
