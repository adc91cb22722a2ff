r"""Products with Kronecker products, never forming them.

For ``S: [p, p]``, ``A: [q, q]`` and a matrix ``V: [p, q]`` flattened row-major
(``vec(V)[i·q + j] = V[i, j]``), Roth's lemma reads

.. math::

    (S \otimes A)\, \mathrm{vec}(V) = \mathrm{vec}(S V A^\top),

which costs ``O(p²q + pq²)`` instead of the ``O(p²q²)`` of the dense Kronecker product.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["kron_matmul"]


def kron_matmul(S: Tensor, A: Tensor, V: Tensor) -> Tensor:
    """``(S ⊗ A)`` applied to the row-major flattenings of a stack of matrices.

    Args:
        S: ``[p, p]``.
        A: ``[q, q]``.
        V: ``[p, q, k]``: ``k`` matrices stacked on the last dimension.

    Returns:
        ``[p, q, k]``: ``S V_k Aᵀ`` for every ``k``.
    """
    return (S @ V.movedim(-1, 0) @ A.T).movedim(0, -1)
