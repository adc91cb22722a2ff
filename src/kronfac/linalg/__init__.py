"""Pure tensor algebra for Kronecker-structured matrices (no torch.nn)."""

from kronfac.linalg.kronecker import kron_matmul

__all__ = ["kron_matmul"]
