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
from kronfac.linalg.base import Block
from kronfac.linalg.decompositions import psd_eigenvalues

__all__ = ["EigenBlock"]


class EigenBlock(Block):
    """``(Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ`` (module docstring).

    Args:
        Q_S: ``[p, p]`` orthonormal columns.
        Q_A: ``[q, q]`` orthonormal columns, or ``None`` for the identity (a diagonal ``A``).
        eigenvalues: ``Λ: [p, q]``.
        name: The module (for error messages).
    """

    def __init__(
        self, Q_S: Tensor, Q_A: Tensor | None, eigenvalues: Tensor, name: str = ""
    ) -> None:
        q = eigenvalues.shape[-1] if Q_A is None else Q_A.shape[0]
        if eigenvalues.shape != (Q_S.shape[0], q):
            raise ValueError(
                f"{name}: eigenvalues {tuple(eigenvalues.shape)} do not fit the eigenbases "
                f"{tuple(Q_S.shape)} and {None if Q_A is None else tuple(Q_A.shape)}."
            )
        self.Q_S, self.Q_A, self.eigenvalues, self.name = Q_S, Q_A, eigenvalues, name

    @property
    def shape(self) -> tuple[int, int]:  # noqa: D102
        return tuple(self.eigenvalues.shape)  # type: ignore[return-value]

    def matmat(self, V: Tensor) -> Tensor:  # noqa: D102
        rotated = self.Q_S.T @ V.movedim(-1, 0)
        if self.Q_A is not None:
            rotated = rotated @ self.Q_A
        out = self.Q_S @ (rotated * self.eigenvalues)
        if self.Q_A is not None:
            out = out @ self.Q_A.T
        return out.movedim(0, -1)

    def trace(self) -> Tensor:  # noqa: D102
        return self.eigenvalues.sum()

    def frobenius_norm_sq(self) -> Tensor:  # noqa: D102
        return self.eigenvalues.square().sum()

    def diagonal(self) -> Tensor:  # noqa: D102
        out = self.Q_S.square() @ self.eigenvalues
        return out if self.Q_A is None else out @ self.Q_A.square().T

    def logdet(self, damping: float = 0.0) -> Tensor:  # noqa: D102
        return self._damped(damping).log().sum()

    def to_dense(self) -> Tensor:  # noqa: D102
        Q_A = self.Q_A
        if Q_A is None:
            Q_A = torch.eye(self.eigenvalues.shape[1], dtype=self.Q_S.dtype, device=self.Q_S.device)
        Q = torch.kron(self.Q_S, Q_A)
        return (Q * self.eigenvalues.reshape(-1)) @ Q.T

    def _damped(self, damping: float) -> Tensor:
        """``Λ + δ``, with eigenvalues within round-off of zero set to 0 (PSD-checked)."""
        return (
            psd_eigenvalues(self.eigenvalues.reshape(-1), self.name).reshape(self.eigenvalues.shape)
            + damping
        )

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
