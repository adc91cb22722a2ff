r"""One block of ``(H + δI)⁻¹`` in its eigenbasis, and the per-example contractions of influence.

A block of the K-FAC / EKFAC curvature ``H`` (of the summed loss) acts on a module's weight
matrix ``[g·p, q]`` (``g`` groups of ``p`` output rows; ``q = d_in``, ``+ 1`` with a joint bias)
and is diagonal in the basis ``Q_S ⊗ Q_A`` with eigenvalues ``Λ: [g, p, q]`` (K-FAC:
``s_i a_j``; EKFAC: the corrected ones). With ``W = 1/(Λ + δ)`` entrywise (``0`` where
``Λ + δ = 0``: the pseudo-inverse),

.. math::

    (H + δI)^{-1} \operatorname{vec}(X) = \operatorname{vec}\big(Q_S ((Q_S^\top X Q_A) ⊙ W)
    Q_A^\top\big),

two products per side, never a dense ``pq × pq`` matrix. A data point's gradient is
``G_n = Σ_t g_{n,t} a_{n,t}ᵀ`` (rows of :mod:`kronfac.influence.gradients`), so

- a pairwise score is ``⟨P_q, G_n⟩`` with the preconditioned query ``P_q = (H + δI)⁻¹ G_q``
  computed once: one GEMM ``[n_q, pq] × [pq, n]`` per chunk of training data;
- a self-score is ``Σ W ⊙ (Q_Sᵀ G_n Q_A)²``, from the rotated rows ``g̃ = Q_Sᵀ g``,
  ``ã = Q_Aᵀ a``: for one position ``Σ_ij g̃_i² W_ij ã_j²`` without forming ``G_n``;
- a low-rank query ``P_q ≈ Σ_k σ_k u_k v_kᵀ`` (truncated SVD) scores
  ``Σ_k σ_k Σ_t (u_kᵀ g_t)(v_kᵀ a_t)`` from the rows (``O(T (p + q))`` per rank and data point),
  or ``Σ_k σ_k u_kᵀ G_n v_k`` where forming ``G_n`` is cheaper.

An embedding (a diagonal input factor, ``Q_A = I``) has one-hot inputs held as token indices:
its gradients are summed per (data point, token) and its columns gathered, never a one-hot
matrix; the row of ``padding_idx``, which torch never updates, gets no gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from kronfac.factors.data_pass import BatchRows
from kronfac.layers import Slot
from kronfac.linalg import EigenBlock

__all__ = ["InverseBlock", "LowRankQuery", "chunks"]


@dataclass
class LowRankQuery:
    """Rank-``r`` factors of every query's preconditioned gradient in one block.

    ``P_q ≈ U_q V_qᵀ`` (the singular values folded into ``U``), the queries side by side:

    Attributes:
        U: ``[g, p, n_q·r]``: query ``i``'s columns ``i·r … i·r + r − 1``.
        V: ``[q, n_q·r]``.
        rank: ``r``.
    """

    U: Tensor
    V: Tensor
    rank: int


Query = Tensor | LowRankQuery  # dense: [n_q, g, p, q]


def chunks(n: int, per_example: int, itemsize: int, budget: int) -> Iterator[slice]:
    """Slices of ``range(n)`` whose ``per_example`` elements each fit ``budget`` bytes together.

    At least one data point per slice, whatever the budget.
    """
    size = max(1, budget // max(1, per_example * itemsize))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class InverseBlock:
    """``(H_b + δI)⁻¹`` of one block of a K-FAC / EKFAC operator (module docstring).

    Args:
        eigen: The block in its eigenbasis (:func:`kronfac.operators.eigen_block`), with the
            eigenvalues of the curvature of the loss as ``loss_fn`` defines it.
        slot: Where its matrix lies in the parameter layout (the adapter, weight and bias).
        scale: ``D``: the eigenvalues times ``scale`` are those of the summed loss.

    Attributes:
        module: The module's name.
        values: ``Λ``, ``[g, p, q]``, of the summed loss (round-off negatives set to 0).
        weights: ``1/(Λ + δ)`` after :meth:`damp` (0 where ``Λ + δ = 0``).
    """

    def __init__(self, eigen: EigenBlock, slot: Slot, scale: float) -> None:
        if eigen.complement_size or slot.weight is None:
            raise NotImplementedError(
                f"Influence of {eigen.name}: partial eigenbases (low-rank factors) and separate "
                "bias blocks are not supported."
            )
        self.module = eigen.name
        self.adapter = slot.adapter
        self.joint = slot.bias is not None  # the bias is a last column of the block
        self.diagonal = slot.adapter.diagonal_input
        lam = eigen.spectrum()
        self.values = lam.reshape(eigen.eigenvalues.shape) * scale
        self.Q_S, self.Q_A = eigen.Q_S, eigen.Q_A
        self.groups, self.p, self.q = self.values.shape
        self.weights = self.values.new_zeros(())

    @property
    def numel(self) -> int:
        """``g·p·q``: the block's parameters."""
        return self.groups * self.p * self.q

    def damp(self, delta: float) -> None:
        """Set :attr:`weights` to ``1/(Λ + δ)`` (0 where ``Λ + δ`` is 0)."""
        damped = self.values + delta
        self.weights = torch.where(damped > 0, damped.reciprocal(), torch.zeros_like(damped))

    # -- rows --------------------------------------------------------------------------------
    def rows(self, batch: BatchRows) -> tuple[Tensor, Tensor] | None:
        """``(g [n, T, g, p], a)`` of one batch, or ``None`` when no gradient reached the block.

        ``a`` is ``[n, T, g, q]`` (with the bias's trailing 1 for a joint bias), or the token
        indices ``[n, T]`` of a diagonal-input layer; ``g`` is zero at masked positions and,
        for an embedding, at the tokens of ``padding_idx``.
        """
        grads = batch.grads.get(self.module)
        if grads is None:
            return None
        n, T = grads.shape[1], grads.shape[2]
        g = grads[0].reshape(n, T, self.groups, self.p)
        x = batch.inputs[self.module]
        if self.diagonal:
            idx = x.reshape(n, T)
            inert = self.adapter.inert_inputs
            if inert:
                keep = ~torch.isin(idx, torch.tensor(inert, device=idx.device))
                g = g * keep[..., None, None].to(g.dtype)
            return g, idx
        a = x.reshape(n, T, self.groups, -1)
        return g, self.adapter.append_bias(a) if self.joint else a

    def per_example(self, g: Tensor, a: Tensor) -> Tensor:
        """The per-example gradients ``G_n = Σ_t g_{n,t} a_{n,t}ᵀ``, ``[n, g, p, q]``."""
        if not self.diagonal:
            return torch.einsum("ntgp,ntgq->ngpq", g, a)
        n, T = a.shape
        key = (torch.arange(n, device=a.device)[:, None] * self.q + a).reshape(-1)
        G = g.new_zeros(n * self.q, self.p).index_add_(0, key, g.reshape(n * T, self.p))
        return G.reshape(n, self.q, self.p).transpose(1, 2).unsqueeze(1)

    # -- the inverse -------------------------------------------------------------------------
    def precondition(self, X: Tensor) -> Tensor:
        """``(H_b + δI)⁻¹ X`` for ``X: [k, g, p, q]``."""
        if self.Q_S is not None:
            X = self.Q_S.mT @ X
        if self.Q_A is not None:
            X = X @ self.Q_A
        X = X * self.weights
        if self.Q_S is not None:
            X = self.Q_S @ X
        if self.Q_A is not None:
            X = X @ self.Q_A.mT
        return X

    def low_rank(self, P: Tensor, rank: int) -> Query:
        """The preconditioned queries ``P: [n_q, g, p, q]`` truncated to rank ``rank``.

        Each query's ``[g·p, q]`` matrix by its truncated SVD; ``P`` itself when ``rank`` is at
        least ``min(g·p, q)`` (nothing to truncate).
        """
        nq = P.shape[0]
        if rank >= min(self.groups * self.p, self.q):
            return P
        U, S, Vh = torch.linalg.svd(
            P.reshape(nq, self.groups * self.p, self.q), full_matrices=False
        )
        U = U[..., :rank] * S[:, None, :rank]  # [n_q, g·p, r]
        V = Vh[:, :rank].mT  # [n_q, q, r]
        U = U.reshape(nq, self.groups, self.p, rank).permute(1, 2, 0, 3)
        return LowRankQuery(
            U.reshape(self.groups, self.p, nq * rank),
            V.permute(1, 0, 2).reshape(self.q, nq * rank),
            rank,
        )

    # -- scores ------------------------------------------------------------------------------
    def pairwise_cost(self, query: Query, T: int) -> int:
        """Elements one training data point needs in :meth:`pairwise` (for the chunk size)."""
        if isinstance(query, LowRankQuery):
            K = query.V.shape[-1]
            if self._rows_route(query, T):
                return 2 * T * self.groups * K
            return self.numel + self.groups * self.p * K
        if self.diagonal:
            return query.shape[0] * self.p * T
        return self.numel

    def _rows_route(self, query: LowRankQuery, T: int) -> bool:
        """Whether scoring a low-rank query from the rows costs less than forming ``G_n``."""
        K = query.V.shape[-1]
        rows = T * K * (self.p + self.q)
        return self.diagonal or rows <= self.p * self.q * (T + K)

    def pairwise(self, query: Query, g: Tensor, a: Tensor) -> Tensor:
        """``⟨P_q, G_n⟩`` for every query ``q`` and data point ``n`` of the rows: ``[n_q, n]``."""
        n, T = g.shape[:2]
        if isinstance(query, LowRankQuery):
            U, V = query.U, query.V
            if self._rows_route(query, T):
                gU = torch.einsum("ntgp,gpk->ntgk", g, U)
                aV = V[a].unsqueeze(2) if self.diagonal else torch.einsum("ntgq,qk->ntgk", a, V)
                s = (gU * aV).sum((1, 2))  # [n, n_q·r]
            else:
                s = ((self.per_example(g, a) @ V) * U).sum((1, 2))
            return s.reshape(n, -1, query.rank).sum(-1).T
        nq = query.shape[0]
        if self.diagonal:  # the columns of the tokens seen: ⟨P_q, G_n⟩ = Σ_t g_tᵀ P_q[:, i_t]
            columns = query[:, 0][:, :, a.reshape(-1)]  # [n_q, p, n·T]
            s = torch.einsum("kpm,mp->km", columns, g.reshape(n * T, self.p))
            return s.reshape(nq, n, T).sum(-1)
        return query.reshape(nq, -1) @ self.per_example(g, a).reshape(n, -1).T

    def self_cost(self, T: int) -> int:
        """Elements one data point needs in :meth:`self_scores` (for the chunk size)."""
        if self.diagonal:
            return 2 * T * self.p
        return T * self.groups * (self.p + self.q) + 2 * self.numel

    def self_scores(self, g: Tensor, a: Tensor) -> Tensor:
        """``Σ W ⊙ (Q_Sᵀ G_n Q_A)²`` for every data point of the rows: ``[n]``."""
        n, T = g.shape[:2]
        gt = g if self.Q_S is None else torch.einsum("ntgp,gpi->ntgi", g, self.Q_S)
        if self.diagonal:  # Q_A = I: G̃_n's columns are the sums of g̃ over a token's positions
            key = (torch.arange(n, device=a.device)[:, None] * self.q + a).reshape(-1)
            uniq, inverse = torch.unique(key, return_inverse=True)
            summed = gt.new_zeros(uniq.numel(), self.p)
            summed.index_add_(0, inverse, gt.reshape(n * T, self.p))
            per_token = (summed.square() * self.weights[0].T[uniq % self.q]).sum(-1)
            return gt.new_zeros(n).index_add_(0, uniq // self.q, per_token)
        at = a if self.Q_A is None else torch.einsum("ntgq,gqj->ntgj", a, self.Q_A)
        if T == 1:  # G̃_n = g̃ ãᵀ: Σ_ij g̃_i² W_ij ã_j²
            return torch.einsum(
                "ngi,gij,ngj->n", gt[:, 0].square(), self.weights, at[:, 0].square()
            )
        Gt = torch.einsum("ntgi,ntgj->ngij", gt, at)
        return (Gt.square() * self.weights).sum((1, 2, 3))
