"""Pure tensor algebra for Kronecker-structured matrices (no torch.nn).

Factors (dense, diagonal, low-rank, identity; :mod:`kronfac.linalg.factor`) behind one
protocol, :class:`Factor`; one Kronecker block over any two of them, :class:`KroneckerBlock`;
blocks diagonal in a Kronecker-factored eigenbasis, :class:`EigenBlock`; the streaming low-rank
sketch; decompositions with a float64 retry; Gram sums by BLAS syrk (:mod:`kronfac.linalg.gram`).
"""

from kronfac.linalg.base import Block, pi_damping
from kronfac.linalg.decompositions import cholesky_inverse, eigh, psd_eigenvalues
from kronfac.linalg.eigen import EigenBlock
from kronfac.linalg.factor import (
    DenseFactor,
    DiagonalFactor,
    Eigenbasis,
    Factor,
    IdentityFactor,
    LowRankFactor,
    ShiftedLowRankFactor,
    as_factor,
)
from kronfac.linalg.gram import accumulate_gram, gram_kernel, set_gram_kernel, symmetrize_
from kronfac.linalg.kronecker import KroneckerBlock
from kronfac.linalg.lowrank import StreamingLowRank

__all__ = [
    "Block",
    "DenseFactor",
    "DiagonalFactor",
    "EigenBlock",
    "Eigenbasis",
    "Factor",
    "IdentityFactor",
    "KroneckerBlock",
    "LowRankFactor",
    "ShiftedLowRankFactor",
    "StreamingLowRank",
    "accumulate_gram",
    "as_factor",
    "cholesky_inverse",
    "eigh",
    "gram_kernel",
    "pi_damping",
    "psd_eigenvalues",
    "set_gram_kernel",
    "symmetrize_",
]
