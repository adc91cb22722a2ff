"""Pure tensor algebra for Kronecker-structured matrices (no torch.nn)."""

from kronfac.linalg.base import Block, pi_damping
from kronfac.linalg.decompositions import cholesky_inverse, eigh, psd_eigenvalues
from kronfac.linalg.eigen import EigenBlock
from kronfac.linalg.kronecker import KroneckerBlock, kron_matmul
from kronfac.linalg.lowrank import LowRankFactor, LowRankKroneckerBlock, StreamingLowRank

__all__ = [
    "Block",
    "EigenBlock",
    "KroneckerBlock",
    "LowRankFactor",
    "LowRankKroneckerBlock",
    "StreamingLowRank",
    "cholesky_inverse",
    "eigh",
    "kron_matmul",
    "pi_damping",
    "psd_eigenvalues",
]
