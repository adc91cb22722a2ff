r"""Gram sums ``C += α Σ_rows x xᵀ`` into one triangle, by BLAS syrk where that is faster.

A Gram matrix is symmetric, so a symmetric rank-k update (BLAS ``?syrk``) forms its upper
triangle in half the flops of a GEMM. torch exposes no syrk; SciPy's BLAS wrappers do, and they
work on the memory of CPU float32 / float64 tensors without a copy: a C-contiguous ``[m, d]``
array is the Fortran ``[d, m]`` array ``Xᵀ``, so ``Xᵀ X`` is syrk's ``A Aᵀ`` (``trans=0``) of
that array; a C-contiguous ``[d, T]`` array (the rows of one convolution example, channels
first) is the Fortran ``[T, d]`` array, and ``X Xᵀ`` is syrk's ``Aᵀ A`` (``trans=1``). The
accumulator ``C: [d, d]`` is, in Fortran order, its own transpose: syrk's *lower* triangle
there is the upper triangle here, written in place (``beta=1``, ``overwrite_c``).

**Contract.** :func:`accumulate_gram` leaves the upper triangle of ``C`` (diagonal included)
complete; the strict lower triangle holds a partial sum or nothing, whichever kernel ran.
:func:`symmetrize_` restores the whole matrix once, before the sums are read (``O(d²)``), not
per batch. Mixing kernels on one accumulator is safe: every kernel completes the upper
triangle.

**Kernel choice** (:func:`gram_kernel`): ``"auto"`` (the default) runs syrk where it applies —
a CPU tensor of float32 / float64, one group, the accumulator and the rows contiguous (SciPy
would copy a non-contiguous operand: no longer in place, or a copy per call) — and the side is
at least :data:`SYRK_MIN_SIDE`; otherwise, on CPU, the triangular block split (small sides,
bf16 / fp16, strided rows; a single ``addmm_`` for sides up to :data:`TRIANGLE_BLOCK`), and
``addmm_`` / ``baddbmm_`` on CUDA (torch has no syrk there) and for grouped convolutions.
``"gemm"`` forces ``addmm_`` / ``baddbmm_`` everywhere, ``"syrk"`` forces syrk wherever it
applies, whatever the side (both for tests), ``"blocks"`` forces the block split (one group, any
device). SciPy's BLAS runs on its own threads (``OPENBLAS_NUM_THREADS`` or ``threadpoolctl``),
not on those of ``torch.set_num_threads``.

**Triangular block split.** The side is cut into ``k = ⌈d / TRIANGLE_BLOCK⌉`` row blocks and
block row ``i`` gets one ``addmm_`` of ``X_iᵀ X_{i:}`` into the view ``C[i, i:]``: the upper
triangle in ``(k + 1) / (2k)`` of a GEMM's flops, in ``k`` launches — the form a GPU can run
without syrk. On this CPU it took 0.65–0.86 of ``addmm_``'s time in bf16 for sides 512–1024
(float32: 0.62–0.78, syrk 0.42–0.58), hence its use under ``"auto"`` where syrk does not apply.
On CUDA ``"auto"`` keeps ``addmm_`` until the split is measured there: ``benchmarks/gram.py``
times every kernel on each device it finds.

Measured on a 2-core x86 CPU with AVX-512 (torch 2.13 with MKL against SciPy 1.17 with OpenBLAS
0.3.31, one thread each, float32), syrk's time over ``addmm_``'s for ``m`` rows of side ``d``:

===== ====== ====== ====== ====== ======= ======= =======
m     d = 64 80     96     128    256     512     688
===== ====== ====== ====== ====== ======= ======= =======
256   0.91   1.00   0.86   0.64   0.60    0.52
1024  0.99   0.93   0.88   0.77   0.60            0.55
8192  1.02          0.87   0.80
===== ====== ====== ====== ====== ======= ======= =======

(float64: 0.51 at 256 x 512 and 1024 x 256; convolution rows ``[d, T = 1024]`` per example, 128
examples: 1.42 at ``d = 32``, 1.08 at 64, 0.63 at 288; a grouped sum by one syrk per group,
whose column slices SciPy copies: 0.78–1.79, hence ``baddbmm_`` for groups.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GRAM_KERNELS",
    "SYRK_MIN_SIDE",
    "TRIANGLE_BLOCK",
    "accumulate_gram",
    "gram_kernel",
    "set_gram_kernel",
    "symmetrize_",
]

GRAM_KERNELS = ("auto", "gemm", "syrk", "blocks")
"""The kernel choices of :func:`set_gram_kernel` / :func:`gram_kernel`."""

SYRK_MIN_SIDE = 96
"""The smallest side ``d`` for which ``"auto"`` uses syrk (module docstring's table)."""

TRIANGLE_BLOCK = 256
"""The row-block height of the ``"blocks"`` kernel (module docstring)."""

_kernel = "auto"


def set_gram_kernel(kernel: str) -> str:
    """Choose the kernel of :func:`accumulate_gram` for the whole process.

    Args:
        kernel: ``"auto"`` (syrk where it applies and measured faster), ``"gemm"``
            (``addmm_`` / ``baddbmm_`` everywhere), ``"syrk"`` (syrk wherever it applies) or
            ``"blocks"`` (the triangular block split, one group, any device).

    Returns:
        The previous choice.

    Raises:
        ValueError: For another name.
    """
    global _kernel
    if kernel not in GRAM_KERNELS:
        raise ValueError(f"Unknown Gram kernel {kernel!r}; expected one of {GRAM_KERNELS}.")
    previous, _kernel = _kernel, kernel
    return previous


@contextlib.contextmanager
def gram_kernel(kernel: str) -> Iterator[None]:
    """Use ``kernel`` (:func:`set_gram_kernel`) inside a ``with`` block, then restore the choice.

    Example::

        with gram_kernel("gemm"):  # the addmm_ path, e.g. as a reference in a test
            factors = compute_factors(model, loss_fn, data)
    """
    previous = set_gram_kernel(kernel)
    try:
        yield
    finally:
        set_gram_kernel(previous)


def accumulate_gram(C: Tensor, x: Tensor, groups: int = 1, alpha: float = 1.0) -> None:
    """``C += α Σ_rows x xᵀ`` per group, complete in the upper triangle (module docstring).

    Rows stored channels-first (``x: [m, T, g·d]``, a transposed view of a contiguous
    ``[m, g·d, T]``, as convolution patches and gradients are) are reduced per example,
    ``C += α X_i X_iᵀ`` with ``X_i: [g·d, T]``, instead of through a transposing copy to
    ``[m·T, g·d]``.

    Args:
        C: The accumulator ``[d, d]``, or ``[g, d, d]`` for ``g > 1`` groups; the dtype and
            device of ``x``. Only its upper triangle is guaranteed: :func:`symmetrize_` it
            before reading.
        x: Rows ``[..., g·d]`` (any leading shape), group ``j`` in columns ``j·d : (j+1)·d``.
        groups: ``g``.
        alpha: ``α``.
    """
    if x.ndim == 3 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
        xt = x.transpose(1, 2)  # [m, g·d, T], contiguous
        if groups == 1:
            kernel = _kernel_for(C, xt)
            for xi in xt:
                kernel(C, xi, alpha, False)
        else:
            for xi in xt.reshape(xt.shape[0], groups, -1, xt.shape[-1]):
                C.baddbmm_(xi, xi.transpose(1, 2), alpha=alpha)
        return
    x = x.reshape(-1, x.shape[-1])
    if groups == 1:
        _kernel_for(C, x)(C, x, alpha, True)
    else:
        xg = x.reshape(x.shape[0], groups, -1).transpose(0, 1)  # [g, rows, d]
        C.baddbmm_(xg.transpose(1, 2), xg, alpha=alpha)


def symmetrize_(C: Tensor) -> Tensor:
    """Copy the upper triangle of ``C: [..., d, d]`` onto the lower one, in place (``O(d²)``).

    Afterwards ``C`` equals ``C.mT`` exactly. Returns ``C``.
    """
    d = C.shape[-1]
    lower = torch.ones(d, d, dtype=torch.bool, device=C.device).tril_(-1)
    return C.copy_(torch.where(lower, C.mT, C))


Kernel = Callable[[Tensor, Tensor, float, bool], None]
"""``kernel(C, x, α, rows_first)``: ``C += α xᵀ x`` (rows first) or ``α x xᵀ``, upper triangle."""


def _kernel_for(C: Tensor, x: Tensor) -> Kernel:
    """The kernel of one group's sum: syrk where it applies, else the block split or a GEMM.

    ``x``: the rows, ``[m, d]``, or stacked examples ``[m, d, T]`` (side ``d`` second).
    """
    syrk = _syrk_kernel(C, x)
    if syrk is not None:
        return lambda C, x, alpha, rows_first: _syrk_(syrk, C, x, alpha, rows_first)
    if _kernel == "blocks" or (_kernel == "auto" and C.device.type == "cpu"):
        return _triangle_
    return _gemm_


def _syrk_kernel(C: Tensor, x: Tensor) -> Callable[..., Any] | None:
    """SciPy's ``ssyrk`` / ``dsyrk`` when the chosen kernel runs syrk on these operands."""
    if _kernel in ("gemm", "blocks"):
        return None
    if C.device.type != "cpu" or C.dtype not in (torch.float32, torch.float64):
        return None
    if x.dtype != C.dtype or not (C.is_contiguous() and x.is_contiguous()):
        return None
    if _kernel == "auto" and C.shape[-1] < SYRK_MIN_SIDE:
        return None
    from scipy.linalg import blas  # on first use: importing scipy.linalg takes ~0.25 s

    return blas.ssyrk if C.dtype == torch.float32 else blas.dsyrk


def _gemm_(C: Tensor, x: Tensor, alpha: float, rows_first: bool) -> None:
    """``C += α xᵀ x`` (``x: [m, d]``, ``rows_first``) or ``α x xᵀ`` by one ``addmm_``."""
    if rows_first:
        C.addmm_(x.T, x, alpha=alpha)
    else:
        C.addmm_(x, x.T, alpha=alpha)


def _syrk_(syrk: Callable[..., Any], C: Tensor, x: Tensor, alpha: float, rows_first: bool) -> None:
    """``C += α xᵀ x`` (``x: [m, d]``, ``rows_first``) or ``C += α x xᵀ`` (``x: [d, T]``).

    Both operands are contiguous, so their Fortran views are zero-copy: ``xᵀ`` is the Fortran
    ``[d, m]`` (``A Aᵀ``: ``trans=0``) or ``[T, d]`` (``Aᵀ A``: ``trans=1``), and ``C``'s
    Fortran view's lower triangle is ``C``'s upper triangle.

    Raises:
        RuntimeError: If SciPy wrote into a copy instead of ``C``'s memory.
    """
    c = C.numpy().T
    a = x.detach().numpy().T
    out = syrk(alpha, a, beta=1.0, c=c, trans=0 if rows_first else 1, lower=1, overwrite_c=1)
    if out.ctypes.data != c.ctypes.data:
        raise RuntimeError("SciPy's syrk did not write into the accumulator in place.")


def _triangle_(C: Tensor, x: Tensor, alpha: float, rows_first: bool) -> None:
    """The upper triangle of ``C += α xᵀ x`` (``x: [m, d]``, ``rows_first``) or ``α x xᵀ``.

    Row block ``i`` (``TRIANGLE_BLOCK`` rows of ``C``) gets ``X_iᵀ X_{i:}``: the blocks on and
    above the diagonal, one ``addmm_`` each into a view of ``C``.
    """
    d = C.shape[-1]
    for s in range(0, d, TRIANGLE_BLOCK):
        e = min(s + TRIANGLE_BLOCK, d)
        if rows_first:
            C[s:e, s:].addmm_(x[:, s:e].T, x[:, s:], alpha=alpha)
        else:
            C[s:e, s:].addmm_(x[s:e], x[s:].T, alpha=alpha)
