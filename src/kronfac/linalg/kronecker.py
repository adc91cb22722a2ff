r"""Kronecker-product blocks ``S ⊗ A`` over any two factors, never formed except in ``to_dense``.

For ``S: [p, p]``, ``A: [q, q]`` and a matrix ``V: [p, q]`` flattened row-major
(``vec(V)[i·q + j] = V[i, j]``), Roth's lemma reads

.. math::

    (S \otimes A)\, \mathrm{vec}(V) = \mathrm{vec}(S V A^\top) = \mathrm{vec}(S V A)
    \quad (A \text{ symmetric}),

which costs two factor products instead of ``O(p²q²)``. With the eigenvalues ``s`` of ``S``
and ``a`` of ``A``: ``tr(S ⊗ A) = tr S · tr A``, ``‖S ⊗ A‖_F = ‖S‖_F ‖A‖_F``,
``diag(S ⊗ A) = vec(diag S · diag Aᵀ)`` and ``log det(S ⊗ A + δI) = Σ_{ij} log(s_i a_j + δ)``
(for ``δ = 0``: ``q·log det S + p·log det A``). Each formula asks the factors only for the
:class:`~kronfac.linalg.factor.Factor` protocol, so it is written once for dense, diagonal,
low-rank and identity factors, grouped or not (a grouped block is block-diagonal over its
``g`` groups).

Damped inverses:

- factored, ``(S + δ_S I)⁻¹ ⊗ (A + δ_A I)⁻¹`` through the factors' ``damped_inverse``: plain
  (``δ_S = δ_A = δ``) or π-damping (Martens & Grosse, 2015, §6.3; :func:`pi_damping`);
- exact, ``(S ⊗ A + δI)⁻¹``: in the eigenbasis ``Q_S ⊗ Q_A`` the block is diagonal with
  eigenvalues ``s_i a_j``, so the inverse is an :class:`~kronfac.linalg.eigen.EigenBlock` with
  eigenvalues ``1/(s_i a_j + δ)``. Partial bases (low-rank factors) leave a complement whose
  eigenvalues ``s_i c_A``, ``c_S a_j`` and ``c_S c_A`` are all 0 when the partial factors have no
  shift ``c`` — the one case this form holds, and that of every computed factor.

A block whose ``A`` is absent is a single-factor block ``S`` acting on ``[p, 1]``, as for a
bias kept apart from its weight: its ``A`` is the constant ``1``, never damped.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from kronfac.linalg.base import Block, from_groups, pi_damping, to_groups
from kronfac.linalg.eigen import EigenBlock
from kronfac.linalg.factor import (
    DenseFactor,
    DiagonalFactor,
    Factor,
    IdentityFactor,
    LowRankFactor,
    as_factor,
)

__all__ = ["KroneckerBlock"]

FactorLike = Factor | Tensor | LowRankFactor


def _input_factor(A: FactorLike, S: FactorLike, name: str) -> Factor:
    """``A`` as a :class:`Factor`; a tensor ``A`` one dimension short of ``S``'s is diagonal.

    Plain tensors follow ``S``'s grouping: ``S: [p, p]`` with ``A: [q, q]`` or ``[q]``;
    ``S: [g, p, p]`` (or a :class:`Factor`, always grouped) with ``[g, q, q]`` or ``[g, q]``.
    """
    if not isinstance(A, Tensor):
        return as_factor(A, name)
    s_ndim = 3 if isinstance(S, Factor) else (S.U if isinstance(S, LowRankFactor) else S).ndim
    return as_factor(A, name, diagonal=A.ndim == s_ndim - 1)


class KroneckerBlock(Block):
    """``S ⊗ A`` (module docstring) over any two factors, grouped or not.

    Args:
        S: Output-gradient factor: a :class:`~kronfac.linalg.factor.Factor`, a
            :class:`~kronfac.linalg.factor.LowRankFactor`, or a tensor ``[p, p]`` (``[g, p, p]``
            for ``g`` groups).
        A: Input factor: a ``Factor``, a ``LowRankFactor``, or a tensor ``[q, q]`` (dense) or
            ``[q]`` (diagonal; with groups ``[g, q, q]`` / ``[g, q]``); ``None`` for a
            single-factor block ``S`` (a separate bias: ``q = 1``, never damped).
        name: The module (for error messages).
        heuristic_A: For a single-factor block, the input factor of its weight's block, whose
            ``π`` then sets ``δ_S`` under heuristic damping (as for the weight).

    Attributes:
        factor_S: ``S`` as a :class:`~kronfac.linalg.factor.Factor`.
        factor_A: ``A`` as a ``Factor``; for a single-factor block, the identity of side 1.
        single: Whether ``A`` is absent (a single-factor block).
        heuristic_A: ``heuristic_A`` as a ``Factor``, or ``None``.
    """

    def __init__(
        self,
        S: FactorLike,
        A: FactorLike | None,
        name: str = "",
        heuristic_A: FactorLike | None = None,
    ) -> None:
        self.name = name
        self.factor_S = as_factor(S, name)
        g = self.factor_S.groups
        self.single = A is None
        if A is None:
            ones = torch.ones(g, dtype=self.factor_S.dtype, device=self.factor_S.device)
            self.factor_A: Factor = IdentityFactor(1, ones, name)
        else:
            self.factor_A = _input_factor(A, S, name)
        self.heuristic_A = None if heuristic_A is None else _input_factor(heuristic_A, S, name)
        for F in (self.factor_A, self.heuristic_A):
            if F is not None and F.groups != g:
                raise ValueError(
                    f"Factors of {name or 'a module'} have {g} and {F.groups} groups; "
                    "expected the same number."
                )
        # one group of dense factors: a single vector (an optimizer step) takes two plain GEMMs
        fS, fA = self.factor_S, self.factor_A
        self._gemm: tuple[Tensor, Tensor] | None = None
        if isinstance(fS, DenseFactor) and isinstance(fA, DenseFactor) and g == 1:
            self._gemm = (fS.M[0], fA.M[0])

    @property
    def S(self) -> Tensor:
        """``S`` as a tensor ``[g, p, p]`` (compatibility path).

        How ``kronfac.optim`` reads the factors of an inverse (dense ones only), until it uses
        :attr:`factor_S`.
        """
        return self.factor_S.to_dense()

    @property
    def A(self) -> Tensor | None:
        """``A`` as a tensor, as :attr:`S`: ``[g, q, q]``, a diagonal's ``[g, q]``, or ``None``."""
        if self.single:
            return None
        if isinstance(self.factor_A, DiagonalFactor):
            return self.factor_A.m
        return self.factor_A.to_dense()

    @property
    def shape(self) -> tuple[int, int]:  # noqa: D102
        return self.factor_S.groups * self.factor_S.side, self.factor_A.side

    def matmat(self, V: Tensor) -> Tensor:  # noqa: D102
        if self._gemm is not None and V.shape[-1] == 1:  # S V A
            S, A = self._gemm
            return (S @ V[..., 0] @ A).unsqueeze(-1)
        X = to_groups(V, self.factor_S.groups)  # [g, k, p, q]
        return from_groups(self.factor_A.rmatmul(self.factor_S.matmul(X)))

    def trace(self) -> Tensor:  # noqa: D102
        return (self.factor_S.trace() * self.factor_A.trace()).sum()

    def frobenius_norm_sq(self) -> Tensor:  # noqa: D102
        return (self.factor_S.frobenius_sq() * self.factor_A.frobenius_sq()).sum()

    def diagonal(self) -> Tensor:  # noqa: D102
        out = self.factor_S.diagonal()[:, :, None] * self.factor_A.diagonal()[:, None, :]
        return out.reshape(-1, out.shape[-1])

    def logdet(self, damping: float = 0.0) -> Tensor:  # noqa: D102
        s, a = self.factor_S.spectrum(), self.factor_A.spectrum()
        return (s[:, :, None] * a[:, None, :] + damping).log().sum()

    def to_dense(self) -> Tensor:  # noqa: D102
        pairs = zip(self.factor_S.to_dense(), self.factor_A.to_dense(), strict=True)
        return torch.block_diag(*[torch.kron(S.contiguous(), A.contiguous()) for S, A in pairs])

    def eigen(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """``(s, Q_S, a, Q_A)``: the factors' eigenbases per group, PSD-checked and cached.

        ``[g, p]``, ``[g, p, p]``, ``[g, q]``, ``[g, q, q]`` for dense factors; a basis is
        ``None`` for the identity (a diagonal, identity or absent factor) and partial
        (``[g, p, k]`` with ``k`` eigenvalues) for a low-rank one.
        """
        bS, bA = self.factor_S.eigenbasis(), self.factor_A.eigenbasis()
        return bS.values, bS.vectors, bA.values, bA.vectors

    def damping_split(
        self, damping: float, heuristic: bool, min_damping: float
    ) -> tuple[Tensor, Tensor]:
        """``(δ_S, δ_A)`` per group, ``[g]`` each, for ``(S + δ_S I) ⊗ (A + δ_A I)``.

        Plain: ``δ`` on both. Heuristic (Martens & Grosse, 2015, §6.3): with the factors' mean
        eigenvalues ``π = √((tr A / dim A) / (tr S / dim S))``, ``δ_A = max(π√δ, min_damping)``
        and ``δ_S = max(√δ/π, min_damping)`` (:func:`pi_damping`); a single-factor block takes
        ``π`` from ``heuristic_A`` (its weight's input factor) or, without one, the plain
        ``δ``, as do groups whose mean eigenvalues are not positive.
        """
        A = self.heuristic_A if self.single else self.factor_A
        if heuristic and A is not None:
            mean_s = self.factor_S.mean_eigenvalue()
            return pi_damping(A.mean_eigenvalue(), mean_s, damping, min_damping)
        plain = torch.full(
            (self.factor_S.groups,),
            float(damping),
            dtype=self.factor_S.dtype,
            device=self.factor_S.device,
        )
        return plain, plain.clone()

    def _eigen_block(self) -> EigenBlock:
        """``S ⊗ A`` as an :class:`EigenBlock` in the factors' eigenbases (module docstring).

        Raises:
            ValueError: If a partial basis has a non-zero complement eigenvalue.
        """
        bases = []
        for F in (self.factor_S, self.factor_A):
            basis = F.eigenbasis()
            if basis.values.shape[-1] < F.side and bool(basis.complement.any()):
                raise ValueError(
                    f"Exact damping of {self.name or 'a module'} needs low-rank factors without "
                    "an identity shift."
                )
            bases.append(basis)
        bS, bA = bases
        lam = bS.values[:, :, None] * bA.values[:, None, :]
        return EigenBlock(bS.vectors, bA.vectors, lam, self.name)

    @overload
    def inverse(
        self,
        damping: float = ...,
        *,
        heuristic: bool = ...,
        min_damping: float = ...,
        exact: Literal[False] = ...,
    ) -> KroneckerBlock: ...

    @overload
    def inverse(
        self, damping: float = ..., *, heuristic: bool = ..., min_damping: float = ..., exact: bool
    ) -> Block: ...

    def inverse(
        self,
        damping: float = 0.0,
        *,
        heuristic: bool = False,
        min_damping: float = 1e-8,
        exact: bool = False,
    ) -> Block:
        """The inverse of the damped block (module docstring; :meth:`damping_split`).

        ``exact=True`` inverts ``S ⊗ A + δI`` in the factors' eigenbases (an
        :class:`EigenBlock`); otherwise ``(S + δ_S I)⁻¹ ⊗ (A + δ_A I)⁻¹``, a
        :class:`KroneckerBlock` of the factors' damped inverses (a single-factor block:
        ``(S + δ_S I)⁻¹``).

        Raises:
            NotPSDError: If a damped factor (or ``S ⊗ A + δI``) is not positive definite.
            ValueError: ``exact`` with a shifted partial (low-rank) factor.
        """
        if exact:
            return self._eigen_block().inverse(damping)
        d_S, d_A = self.damping_split(damping, heuristic, min_damping)
        S_inv = self.factor_S.damped_inverse(d_S)
        A_inv = None if self.single else self.factor_A.damped_inverse(d_A)
        return KroneckerBlock(S_inv, A_inv, self.name)
