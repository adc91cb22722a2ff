r"""Kronecker factors behind one protocol: dense, diagonal, low-rank and identity.

A factor is a symmetric positive semi-definite matrix ``F`` of side ``d``, held with a leading
*group* dimension ``g`` (``g = 1`` for every layer but grouped convolutions, which have one
independent factor per group). Four kinds implement :class:`Factor`:

- :class:`DenseFactor`: ``M``, held as ``[g, d, d]``;
- :class:`DiagonalFactor`: ``diag(m)``, held as ``m: [g, d]`` (an embedding's input factor);
- :class:`ShiftedLowRankFactor`: ``c·I + U diag(λ) Uᵀ``, held as ``U: [g, d, k]`` with
  orthonormal columns, ``λ: [g, k]`` and ``c: [g]``;
- :class:`IdentityFactor`: ``c·I``, held as ``c: [g]`` (forward-only's ``S = I``).

Products, traces, Frobenius norms, diagonals, spectra, eigenbases and damped inverses follow
from each kind's structure, never from a ``d x d`` matrix that the kind does not hold:

- low-rank: ``tr F = Σλ + c·d``, ``‖F‖_F² = Σλ² + 2cΣλ + c²d``, ``diag F = (U ∘ U) λ + c``,
  eigenvalues ``λ + c`` and ``c`` (multiplicity ``d − k``), and

  .. math::

      (F + δI)^{-1} = U\,\mathrm{diag}\Big(\frac{1}{λ + c + δ} - \frac{1}{c + δ}\Big)U^\top
      + \frac{I}{c + δ},

  which stays low-rank; for a complete basis (``k = d``, ``U Uᵀ = I``) the complement is empty
  and the inverse is ``U diag(1/(λ + c + δ)) Uᵀ`` alone (the ``1/(c + δ)`` terms would cancel
  catastrophically for small ``δ``);
- dense: ``(M + δI)⁻¹`` by Cholesky with a float64 retry (:func:`cholesky_inverse`), eigenbasis
  by :func:`~kronfac.linalg.decompositions.eigh`;
- diagonal and identity: entrywise, in the identity basis (held as ``None``, never as a
  matrix).

Eigenvalues are PSD-checked with :func:`~kronfac.linalg.decompositions.psd_eigenvalues` and
cached per factor object. Damping ``δ`` may be one number or one per group (``[g]``: π-damping
differs per group).

:class:`LowRankFactor` is the public, stored form of a low-rank factor (what
:class:`~kronfac.KroneckerFactors` holds and saves); :func:`as_factor` turns any stored factor
into a :class:`Factor`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from kronfac.errors import NotPSDError
from kronfac.linalg.decompositions import cholesky_inverse, eigh, psd_eigenvalues

__all__ = [
    "DenseFactor",
    "DiagonalFactor",
    "Eigenbasis",
    "Factor",
    "IdentityFactor",
    "LowRankFactor",
    "ShiftedLowRankFactor",
    "as_factor",
]


class Eigenbasis(NamedTuple):
    """The eigen-pairs of a factor, per group (exact damping, EKFAC).

    Attributes:
        values: ``[g, k]`` eigenvalues (PSD-checked), one per basis vector.
        vectors: ``[g, d, k]`` orthonormal eigenvectors, partial for a low-rank factor
            (``k < d``); ``None`` for the identity basis (``k = d``, ``values`` in coordinate
            order), which is never held as a matrix.
        complement: ``[g]``, the eigenvalue of the orthogonal complement of the basis's span
            (multiplicity ``d − k``; 0 when the basis is complete).
    """

    values: Tensor
    vectors: Tensor | None
    complement: Tensor


def _per_group(t: Tensor, ndim: int) -> Tensor:
    """``t: [g, *rest]`` viewed as ``[g, 1, …, 1, *rest]`` with ``ndim`` dimensions.

    Broadcasts a factor's per-group tensor against a stack ``X: [g, *stack, ·, ·]``.
    """
    return t.reshape(t.shape[0], *(1,) * (ndim - t.ndim), *t.shape[1:])


def _padded(values: Tensor, complement: Tensor, side: int) -> Tensor:
    """``[..., k]`` eigenvalues and the complement's ``[...]`` → all ``side`` of them."""
    rest = complement[..., None].expand(*complement.shape, side - values.shape[-1])
    return torch.cat([values, rest], dim=-1)


class Factor(ABC):
    """A symmetric PSD factor of side ``d``, per group (module docstring).

    Products take a stack of matrices with the group dimension first, ``X: [g, *stack, ·, ·]``
    (or ``[1, *stack, ·, ·]``, broadcast over the groups).

    Attributes:
        side: ``d``.
        groups: ``g``.
        dtype: The dtype of the factor's tensors.
        device: Their device.
        name: The module (for error messages).
    """

    kind: ClassVar[str]  # for error messages: "<kind> factor of <module> …"

    def __init__(self, ref: Tensor, side: int, name: str) -> None:
        self.side, self.groups, self.name = side, ref.shape[0], name
        self.dtype, self.device = ref.dtype, ref.device
        self._checked: tuple[Eigenbasis, Tensor] | None = None

    @abstractmethod
    def matmul(self, X: Tensor) -> Tensor:
        """``F X`` for ``X: [g, *stack, d, m]``."""

    @abstractmethod
    def rmatmul(self, X: Tensor) -> Tensor:
        """``X F`` for ``X: [g, *stack, m, d]``."""

    @abstractmethod
    def trace(self) -> Tensor:
        """``tr F`` per group, ``[g]``."""

    @abstractmethod
    def frobenius_sq(self) -> Tensor:
        """``‖F‖_F²`` per group, ``[g]``."""

    @abstractmethod
    def diagonal(self) -> Tensor:
        """``diag F``, ``[g, d]``."""

    @abstractmethod
    def damped_inverse(self, delta: float | Tensor) -> Factor:
        """``(F + δI)⁻¹``, a factor of the same kind; ``δ`` a number or one per group ``[g]``.

        Raises:
            NotPSDError: If ``F + δI`` is not positive definite (naming the module).
        """

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The dense matrices ``[g, d, d]``."""

    @abstractmethod
    def _eigenpairs(self) -> Eigenbasis:
        """The eigen-pairs as computed, before the PSD check."""

    def mean_eigenvalue(self) -> Tensor:
        """``tr F / d`` per group, ``[g]`` (π-damping)."""
        return self.trace() / self.side

    def _eigen(self) -> tuple[Eigenbasis, Tensor]:
        """The PSD-checked eigenbasis and spectrum, computed once."""
        if self._checked is None:
            raw = self._eigenpairs()
            k = raw.values.shape[-1]
            spectrum = psd_eigenvalues(_padded(raw.values, raw.complement, self.side), self.name)
            rest = spectrum[:, k] if k < self.side else torch.zeros_like(raw.complement)
            self._checked = Eigenbasis(spectrum[:, :k], raw.vectors, rest), spectrum
        return self._checked

    def eigenbasis(self) -> Eigenbasis:
        """The eigen-pairs per group (:class:`Eigenbasis`), PSD-checked and cached.

        Raises:
            NotPSDError: If an eigenvalue is clearly negative, or ``eigh`` fails (dense).
        """
        return self._eigen()[0]

    def spectrum(self) -> Tensor:
        """All ``d`` eigenvalues per group, ``[g, d]``, PSD-checked and cached.

        Raises:
            NotPSDError: As :meth:`eigenbasis`.
        """
        return self._eigen()[1]

    def _deltas(self, delta: float | Tensor) -> Tensor:
        """``δ`` as one value per group, ``[g]``, in the factor's dtype."""
        return torch.as_tensor(delta, dtype=self.dtype, device=self.device).expand(self.groups)

    def _check_positive(self, damped: Tensor, delta: Tensor) -> None:
        """Raise :class:`NotPSDError` unless every eigenvalue of ``F + δI`` is positive."""
        if bool((damped <= 0).any()):
            raise NotPSDError(
                f"{self.kind} factor of {self.name or 'a module'} plus damping "
                f"{float(delta.max()):g} is not positive definite (smallest eigenvalue "
                f"{float(damped.min()):.3g}); increase the damping."
            )


class DenseFactor(Factor):
    """A dense factor ``M`` (module docstring).

    Args:
        M: ``[g, d, d]``, symmetric.
        name: The module (for error messages).
    """

    kind = "Dense"

    def __init__(self, M: Tensor, name: str = "") -> None:
        super().__init__(M, M.shape[-1], name)
        self.M = M

    def matmul(self, X: Tensor) -> Tensor:  # noqa: D102
        return _per_group(self.M, X.ndim) @ X

    def rmatmul(self, X: Tensor) -> Tensor:  # noqa: D102
        return X @ _per_group(self.M, X.ndim)

    def trace(self) -> Tensor:  # noqa: D102
        return self.diagonal().sum(-1)

    def frobenius_sq(self) -> Tensor:  # noqa: D102
        return self.M.square().sum((-1, -2))

    def diagonal(self) -> Tensor:  # noqa: D102
        return self.M.diagonal(dim1=-2, dim2=-1)

    def damped_inverse(self, delta: float | Tensor) -> DenseFactor:  # noqa: D102
        return DenseFactor(cholesky_inverse(self.M, self._deltas(delta), self.name), self.name)

    def to_dense(self) -> Tensor:  # noqa: D102
        return self.M

    def _eigenpairs(self) -> Eigenbasis:
        values, Q = eigh(self.M, self.name)
        return Eigenbasis(values, Q, values.new_zeros(self.groups))


class DiagonalFactor(Factor):
    """A diagonal factor ``diag(m)``, an embedding's input factor (module docstring).

    Args:
        m: ``[g, d]``.
        name: The module (for error messages).
    """

    kind = "Diagonal"

    def __init__(self, m: Tensor, name: str = "") -> None:
        super().__init__(m, m.shape[-1], name)
        self.m = m

    def matmul(self, X: Tensor) -> Tensor:  # noqa: D102
        return _per_group(self.m, X.ndim - 1)[..., None] * X

    def rmatmul(self, X: Tensor) -> Tensor:  # noqa: D102
        return X * _per_group(self.m, X.ndim)

    def trace(self) -> Tensor:  # noqa: D102
        return self.m.sum(-1)

    def frobenius_sq(self) -> Tensor:  # noqa: D102
        return self.m.square().sum(-1)

    def diagonal(self) -> Tensor:  # noqa: D102
        return self.m

    def damped_inverse(self, delta: float | Tensor) -> DiagonalFactor:  # noqa: D102
        d = self._deltas(delta)
        damped = self.m + d[:, None]
        self._check_positive(damped, d)
        return DiagonalFactor(damped.reciprocal(), self.name)

    def to_dense(self) -> Tensor:  # noqa: D102
        return torch.diag_embed(self.m)

    def _eigenpairs(self) -> Eigenbasis:
        return Eigenbasis(self.m, None, self.m.new_zeros(self.groups))


class IdentityFactor(Factor):
    """A multiple of the identity ``c·I`` (forward-only's ``S = I``; a bias's constant input).

    Args:
        side: ``d``.
        scale: ``c`` per group, ``[g]``.
        name: The module (for error messages).
    """

    kind = "Identity"

    def __init__(self, side: int, scale: Tensor, name: str = "") -> None:
        super().__init__(scale, side, name)
        self.scale = scale

    def matmul(self, X: Tensor) -> Tensor:  # noqa: D102
        return _per_group(self.scale, X.ndim) * X

    rmatmul = matmul

    def trace(self) -> Tensor:  # noqa: D102
        return self.scale * self.side

    def frobenius_sq(self) -> Tensor:  # noqa: D102
        return self.scale.square() * self.side

    def diagonal(self) -> Tensor:  # noqa: D102
        return self.scale[:, None].expand(-1, self.side)

    def damped_inverse(self, delta: float | Tensor) -> IdentityFactor:  # noqa: D102
        d = self._deltas(delta)
        damped = self.scale + d
        self._check_positive(damped, d)
        return IdentityFactor(self.side, damped.reciprocal(), self.name)

    def to_dense(self) -> Tensor:  # noqa: D102
        eye = torch.eye(self.side, dtype=self.dtype, device=self.device)
        return self.scale[:, None, None] * eye

    def _eigenpairs(self) -> Eigenbasis:
        return Eigenbasis(self.diagonal(), None, self.scale.new_zeros(self.groups))


class ShiftedLowRankFactor(Factor):
    """A low-rank factor plus a multiple of the identity, ``c·I + U diag(λ) Uᵀ``.

    The protocol's form of :class:`LowRankFactor`, with a shift per group (a damped inverse
    with per-group ``δ`` has one). Formulas in the module docstring.

    Args:
        U: ``[g, d, k]`` orthonormal columns.
        eigenvalues: ``λ: [g, k]``.
        shift: ``c`` per group, ``[g]``.
        name: The module (for error messages).
    """

    kind = "Low-rank"

    def __init__(self, U: Tensor, eigenvalues: Tensor, shift: Tensor, name: str = "") -> None:
        super().__init__(U, U.shape[-2], name)
        self.U, self.eigenvalues, self.shift = U, eigenvalues, shift
        self._shifted = bool(shift.any())  # once: products then never synchronise

    def matmul(self, X: Tensor) -> Tensor:  # noqa: D102
        U, lam = _per_group(self.U, X.ndim), _per_group(self.eigenvalues, X.ndim - 1)
        out = U @ (lam[..., None] * (U.mT @ X))
        return out + _per_group(self.shift, X.ndim) * X if self._shifted else out

    def rmatmul(self, X: Tensor) -> Tensor:  # noqa: D102
        U, lam = _per_group(self.U, X.ndim), _per_group(self.eigenvalues, X.ndim)
        out = ((X @ U) * lam) @ U.mT
        return out + _per_group(self.shift, X.ndim) * X if self._shifted else out

    def trace(self) -> Tensor:  # noqa: D102
        return self.eigenvalues.sum(-1) + self.shift * self.side

    def frobenius_sq(self) -> Tensor:  # noqa: D102
        lam, c = self.eigenvalues, self.shift
        return lam.square().sum(-1) + 2 * c * lam.sum(-1) + c.square() * self.side

    def diagonal(self) -> Tensor:  # noqa: D102
        return (self.U.square() @ self.eigenvalues[..., None])[..., 0] + self.shift[:, None]

    def damped_inverse(self, delta: float | Tensor) -> ShiftedLowRankFactor:  # noqa: D102
        d = self._deltas(delta)
        rest = self.shift + d
        lam = self.eigenvalues + rest[:, None]
        if self.U.shape[-1] == self.side:  # complete basis: no complement, no 1/(c + δ) terms
            self._check_positive(lam, d)
            return ShiftedLowRankFactor(self.U, lam.reciprocal(), torch.zeros_like(rest), self.name)
        self._check_positive(torch.cat([lam, rest[:, None]], dim=-1), d)
        inv_rest = rest.reciprocal()
        return ShiftedLowRankFactor(
            self.U, lam.reciprocal() - inv_rest[:, None], inv_rest, self.name
        )

    def to_dense(self) -> Tensor:  # noqa: D102
        out = (self.U * self.eigenvalues[:, None, :]) @ self.U.mT
        if not self._shifted:
            return out
        eye = torch.eye(self.side, dtype=self.dtype, device=self.device)
        return out + self.shift[:, None, None] * eye

    def _eigenpairs(self) -> Eigenbasis:
        return Eigenbasis(self.eigenvalues + self.shift[:, None], self.U, self.shift)


class LowRankFactor(NamedTuple):
    """``M = shift·I + U diag(eigenvalues) Uᵀ``: a low-rank factor as stored and saved.

    What :func:`kronfac.compute_factors` returns for a factor side at least ``rank_threshold``
    (``shift = 0``), and forward-only's ``S = I`` (no columns, ``shift = 1``). ``U`` and
    ``eigenvalues`` may carry a leading group dimension ``g`` (one factor per group, sharing
    ``shift``). :func:`as_factor` turns it into a :class:`ShiftedLowRankFactor` (an
    :class:`IdentityFactor` without columns).

    Attributes:
        U: ``[side, k]`` (or ``[g, side, k]``) orthonormal columns.
        eigenvalues: ``[k]`` (or ``[g, k]``), descending.
        shift: ``c``, the eigenvalue of the orthogonal complement of ``U`` (0 for a factor).
    """

    U: Tensor
    eigenvalues: Tensor
    shift: float = 0.0

    @property
    def side(self) -> int:
        """The matrix's side."""
        return self.U.shape[-2]

    def to_dense(self) -> Tensor:
        """The dense ``[side, side]`` (or ``[g, side, side]``) matrix (small cases, tests)."""
        out = as_factor(self).to_dense()
        return out if self.U.ndim == 3 else out[0]

    def matmul(self, X: Tensor) -> Tensor:
        """``M X`` for ``X: [..., side, m]`` (with groups: ``[g, ..., side, m]``)."""
        if self.U.ndim == 3:
            return as_factor(self).matmul(X)
        return as_factor(self).matmul(X[None])[0]

    def to(self, *args: Any, **kwargs: Any) -> LowRankFactor:
        """The factor with its tensors moved / cast by ``Tensor.to``."""
        return LowRankFactor(
            self.U.to(*args, **kwargs), self.eigenvalues.to(*args, **kwargs), self.shift
        )

    def spectrum(self) -> Tensor:
        """All ``side`` eigenvalues: ``λ + c`` and ``c`` (multiplicity ``side − k``)."""
        lam = self.eigenvalues
        return _padded(lam + self.shift, lam.new_full(lam.shape[:-1], self.shift), self.side)


def as_factor(
    F: Tensor | LowRankFactor | Factor, name: str = "", *, diagonal: bool = False
) -> Factor:
    """The :class:`Factor` of a factor as :class:`~kronfac.KroneckerFactors` stores it.

    A tensor is dense, ``[d, d]`` or ``[g, d, d]`` with groups, or, with ``diagonal=True``,
    diagonal, ``[d]`` or ``[g, d]`` (a 2-D tensor reads as dense ``[d, d]`` unless the caller
    says the factor is diagonal: only the caller knows). A :class:`LowRankFactor` becomes a
    :class:`ShiftedLowRankFactor`, or the :class:`IdentityFactor` ``shift·I`` when it has no
    columns; a :class:`Factor` is returned as it is. Ungrouped factors get ``g = 1``.

    Args:
        F: The stored factor.
        name: The module (for error messages).
        diagonal: Whether a tensor ``F`` holds a diagonal factor.

    Raises:
        ValueError: If the shapes do not fit the kind.
    """
    if isinstance(F, Factor):
        return F
    if isinstance(F, LowRankFactor):
        U, lam = (F.U, F.eigenvalues) if F.U.ndim == 3 else (F.U[None], F.eigenvalues[None])
        if U.ndim != 3 or lam.shape != (*U.shape[:-2], U.shape[-1]):
            raise ValueError(
                f"Low-rank factor of {name or 'a module'}: U {tuple(F.U.shape)} and eigenvalues "
                f"{tuple(F.eigenvalues.shape)} must be [(g,) d, k] and [(g,) k]."
            )
        shift = lam.new_full(lam.shape[:1], F.shift)
        if U.shape[-1] == 0:
            return IdentityFactor(U.shape[-2], shift, name)
        return ShiftedLowRankFactor(U, lam, shift, name)
    dims = (1, 2) if diagonal else (2, 3)
    square = diagonal or F.shape[-1:] == F.shape[-2:-1]
    if F.ndim not in dims or not square:
        raise ValueError(
            f"A {'diagonal' if diagonal else 'dense'} factor of {name or 'a module'} must be "
            f"{'[(g,) d]' if diagonal else '[(g,) d, d]'}, got shape {tuple(F.shape)}."
        )
    grouped = F if F.ndim == dims[1] else F[None]
    return DiagonalFactor(grouped, name) if diagonal else DenseFactor(grouped, name)
