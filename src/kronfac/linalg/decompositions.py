"""Stable decompositions of symmetric factors: ``eigh`` and Cholesky with a float64 retry.

Factors are accumulated in float32; a decomposition that fails there (LAPACK's ``eigh`` not
converging, a Cholesky factor hitting a non-positive pivot) is retried in float64 and the result
cast back. Eigenvalues of a positive semi-definite factor may come out slightly negative from
round-off: :func:`psd_eigenvalues` clips those to zero and raises
:class:`~kronfac.errors.NotPSDError` for clearly negative ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kronfac.errors import NotPSDError

__all__ = ["cholesky_inverse", "eigh", "psd_eigenvalues"]


def eigh(M: Tensor, name: str = "") -> tuple[Tensor, Tensor]:
    """Eigendecomposition ``M = Q diag(λ) Qᵀ`` of a symmetric matrix, retried in float64.

    Returns:
        ``(λ, Q)`` in ``M``'s dtype, eigenvalues ascending, eigenvectors as columns.

    Raises:
        NotPSDError: If ``M`` holds NaN / Inf or ``eigh`` fails in float64 too.
    """
    if not bool(torch.isfinite(M).all()):
        raise NotPSDError(f"Factor of {name or 'a module'} holds NaN or Inf.")
    try:
        return torch.linalg.eigh(M)
    except RuntimeError as first:
        if M.dtype == torch.float64:
            raise NotPSDError(
                f"eigh failed for the factor of {name or 'a module'}: {first}"
            ) from first
    try:
        evals, evecs = torch.linalg.eigh(M.double())
    except RuntimeError as e:
        raise NotPSDError(f"eigh failed for the factor of {name or 'a module'}: {e}") from e
    return evals.to(M.dtype), evecs.to(M.dtype)


def psd_eigenvalues(evals: Tensor, name: str = "", size: int | None = None) -> Tensor:
    """Set a PSD matrix's eigenvalues within round-off of zero to exactly zero.

    With ``τ = 10·n·ε·max|λ|`` (``ε`` the dtype's machine epsilon, ``n`` the side of the
    decomposed matrix), eigenvalues in ``[−τ, τ]`` are indistinguishable from zero and become 0
    (so a singular factor has ``log det = −inf``); one below ``−τ`` is not round-off.

    Args:
        evals: The eigenvalues.
        name: The module (for error messages).
        size: ``n``; default ``evals.numel()`` (the eigenvalues of one ``[n, n]`` matrix).
            Values that are not from one decomposition — the products ``s_i a_j`` of two
            factors' cleaned eigenvalues, EKFAC's sums of squares — carry the round-off of
            one entry: ``size=1``.

    Raises:
        NotPSDError: If an eigenvalue is clearly negative.
    """
    n = evals.numel() if size is None else size
    scale = evals.abs().max() if evals.numel() else evals.new_zeros(())
    tol = 10 * n * torch.finfo(evals.dtype).eps * scale
    if evals.numel() and bool(evals.min() < -tol):
        raise NotPSDError(
            f"Factor of {name or 'a module'} is not positive semi-definite: smallest eigenvalue "
            f"{float(evals.min()):.3g} (largest {float(evals.max()):.3g})."
        )
    return torch.where(evals.abs() <= tol, torch.zeros_like(evals), evals)


def cholesky_inverse(M: Tensor, damping: float | Tensor, name: str = "") -> Tensor:
    """``(M + δI)⁻¹`` through a Cholesky factorisation, retried in float64.

    Args:
        M: ``[d, d]`` or a batch ``[g, d, d]``.
        damping: ``δ``, a number or one per batch entry ``[g]``.
        name: The module (for error messages).

    Raises:
        NotPSDError: If ``M + δI`` is not positive definite, in float64 too.
    """
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    delta = torch.as_tensor(damping, dtype=M.dtype, device=M.device)
    if delta.ndim == 1:
        delta = delta[:, None, None]
    for dtype in dict.fromkeys((M.dtype, torch.float64)):
        damped = M.to(dtype) + delta.to(dtype) * eye.to(dtype)
        L, info = torch.linalg.cholesky_ex(damped)
        if not bool(info.any()) and bool(torch.isfinite(L).all()):
            return torch.cholesky_inverse(L).to(M.dtype)
    shown = f"{float(delta.max()):g}" if delta.numel() else "0"
    raise NotPSDError(
        f"Factor of {name or 'a module'} plus damping {shown} is not positive definite "
        "(Cholesky failed in float64 too); increase the damping."
    )
