r"""One block of ``(H + δI)⁻¹`` in its eigenbasis, and the per-example contractions of influence.

A block of the K-FAC / EKFAC curvature ``H`` (of the summed loss) acts on a module's weight
matrix ``[g·p, q]`` (``g`` groups of ``p`` output rows; ``q = d_in``, ``+ 1`` with a joint bias;
a separate bias is a block of its own, ``q = 1``) and is

.. math::

    H_b = c I + (Q_S ⊗ Q_A) \operatorname{diag}(Λ − c) (Q_S ⊗ Q_A)^\top,

``Λ: [g, k_S, k_A]`` (K-FAC: ``s_i a_j``; EKFAC: the corrected ones) on the span of the bases
``Q_S: [p, k_S]``, ``Q_A: [q, k_A]`` and ``c`` on its orthogonal complement, which is there only
for partial bases (low-rank factors, ``k_S < p`` or ``k_A < q``; K-FAC: ``c = 0``, EKFAC: the
mean second moment outside the span). That complement is not ``Q_S^⊥ ⊗ Q_A^⊥``: it also holds
``Q_S ⊗ Q_A^⊥`` and ``Q_S^⊥ ⊗ Q_A``. With ``W = 1/(Λ + δ)`` entrywise and ``w_c = 1/(c + δ)``
(each ``0`` where its denominator is ``0``: the pseudo-inverse; ``w_c = 0`` for complete bases),

.. math::

    (H + δI)^{-1} \operatorname{vec}(X) = \operatorname{vec}\big(w_c X +
    Q_S ((Q_S^\top X Q_A) ⊙ (W − w_c)) Q_A^\top\big),

two products per side, never a dense ``pq × pq`` matrix (a basis held as ``None`` is the
identity, skipped). A data point's gradient is ``G_n = Σ_t g_{n,t} a_{n,t}ᵀ`` (rows of
:mod:`kronfac.influence.gradients`; a separate bias's is ``Σ_t g_{n,t}``, ``a = 1``), so

- a pairwise score is ``⟨P_q, G_n⟩`` with the preconditioned query ``P_q = (H + δI)⁻¹ G_q``
  computed once: one GEMM ``[n_q, pq] × [pq, n]`` per chunk of training data;
- a self-score is ``w_c ‖G_n‖_F² + Σ (W − w_c) ⊙ (Q_Sᵀ G_n Q_A)²``, from the rotated rows
  ``g̃ = Q_Sᵀ g``, ``ã = Q_Aᵀ a``: for one position ``Σ_ij g̃_i² (W − w_c)_ij ã_j²`` and
  ``‖G_n‖² = ‖g‖² ‖a‖²`` without forming ``G_n``; for ``T`` positions
  ``‖G_n‖² = Σ_{t,t'} (g_tᵀ g_t')(a_tᵀ a_t')`` where that costs less than forming ``G_n``;
- a low-rank query ``P_q ≈ Σ_k σ_k u_k v_kᵀ`` (truncated SVD) scores
  ``Σ_k σ_k Σ_t (u_kᵀ g_t)(v_kᵀ a_t)`` from the rows (``O(T (p + q))`` per rank and data point),
  or ``Σ_k σ_k u_kᵀ G_n v_k`` where forming ``G_n`` is cheaper.

An embedding (a diagonal input factor, ``Q_A = I``; only its ``S`` can be low-rank) has one-hot
inputs held as token indices: its gradients are summed per (data point, token) and its columns
gathered, never a one-hot matrix; the row of ``padding_idx``, which torch never updates, gets
no gradient.
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
            eigenvalues of the curvature of the loss as ``loss_fn`` defines it; partial bases
            (low-rank factors) with their complement eigenvalue.
        slot: Where its matrix lies in the parameter layout (the adapter, weight and bias; a
            separate bias's block holds no weight).
        scale: ``D``: the eigenvalues times ``scale`` are those of the summed loss.

    Attributes:
        module: The module's name.
        values: ``Λ``, ``[g, k_S, k_A]``, of the summed loss (round-off negatives set to 0).
        complement: ``c`` of the summed loss, the eigenvalue of the complement of partial bases
            (0 for complete ones).
        rest: How many eigenvalues equal ``c`` (0 for complete bases).
        groups, p, q: The block's matrix is ``[groups·p, q]``.
        weights: ``W = 1/(Λ + δ)`` after :meth:`damp` (0 where ``Λ + δ = 0``).
        complement_weight: ``w_c = 1/(c + δ)`` after :meth:`damp` (0 where ``c + δ = 0`` or for
            complete bases).
    """

    def __init__(self, eigen: EigenBlock, slot: Slot, scale: float) -> None:
        self.module = eigen.name
        self.adapter = slot.adapter
        self.bias_only = slot.weight is None  # a separate bias: [p, 1], its input a constant 1
        self.joint = slot.weight is not None and slot.bias is not None  # a last column
        self.diagonal = slot.adapter.diagonal_input and not self.bias_only
        lam = eigen.spectrum()
        self.values = lam.reshape(eigen.eigenvalues.shape) * scale
        self.Q_S, self.Q_A = eigen.Q_S, eigen.Q_A
        self.groups = self.values.shape[0]
        rows, self.q = eigen.shape
        self.p = rows // self.groups
        self.rest = eigen.complement_size
        self.complement = max(eigen.complement, 0.0) * scale if self.rest else 0.0
        self.weights = self.values.new_zeros(())
        self.complement_weight = 0.0
        self._excess = self.weights  # W − w_c: the weights of the span beyond the complement's

    @property
    def numel(self) -> int:
        """``g·p·q``: the block's parameters."""
        return self.groups * self.p * self.q

    def damp(self, delta: float) -> None:
        """Set :attr:`weights` to ``1/(Λ + δ)`` and :attr:`complement_weight` to ``1/(c + δ)``.

        Each 0 where its denominator is 0 (the pseudo-inverse).
        """
        damped = self.values + delta
        self.weights = torch.where(damped > 0, damped.reciprocal(), torch.zeros_like(damped))
        rest = self.complement + delta
        self.complement_weight = 1.0 / rest if self.rest and rest > 0 else 0.0
        self._excess = self.weights - self.complement_weight

    @property
    def eigenvalue_sum(self) -> float:
        """``tr H_b = Σ Λ + c · rest``, every eigenvalue of the block."""
        return float(self.values.sum()) + self.complement * self.rest

    # -- rows --------------------------------------------------------------------------------
    def rows(self, batch: BatchRows) -> tuple[Tensor, Tensor] | None:
        """``(g [n, T, g, p], a)`` of one batch, or ``None`` when no gradient reached the block.

        ``a`` is ``[n, T, g, q]`` (with the bias's trailing 1 for a joint bias), or the token
        indices ``[n, T]`` of a diagonal-input layer; ``g`` is zero at masked positions and,
        for an embedding, at the tokens of ``padding_idx``. A separate bias's block gets the
        gradients summed over the positions, ``[n, 1, g, p]``, and ``a = 1``, ``[n, 1, g, 1]``.
        """
        grads = batch.grads.get(self.module)
        if grads is None:
            return None
        n, T = grads.shape[1], grads.shape[2]
        g = grads[0].reshape(n, T, self.groups, self.p)
        if self.bias_only:  # G_n = Σ_t g_t · 1: one position
            return g.sum(1, keepdim=True), g.new_ones(n, 1, self.groups, 1)
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
        """``(H_b + δI)⁻¹ X = w_c X + Q_S ((Q_Sᵀ X Q_A) ⊙ (W − w_c)) Q_Aᵀ``, ``X: [k, g, p, q]``."""
        R = X
        if self.Q_S is not None:
            R = self.Q_S.mT @ R
        if self.Q_A is not None:
            R = R @ self.Q_A
        R = R * self._excess
        if self.Q_S is not None:
            R = self.Q_S @ R
        if self.Q_A is not None:
            R = R @ self.Q_A.mT
        return R + self.complement_weight * X if self.complement_weight else R

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
        kS, kA = self.values.shape[1:]
        if self.diagonal:
            return T * (self.p + kS) + (T * self.p if self.complement_weight else 0)
        out = T * self.groups * (kS + kA) + 2 * self.groups * kS * kA
        if self.complement_weight and T > 1:
            out += 2 * self.groups * (T * T if self._gram_route(T) else self.p * self.q)
        return out

    def _gram_route(self, T: int) -> bool:
        """Whether ``‖G_n‖²`` from the rows' Grams (``T²(p + q)``) costs less than ``G_n``."""
        return T * (self.p + self.q) < self.p * self.q

    def _norms(self, g: Tensor, a: Tensor) -> Tensor:
        """``‖G_n‖_F²`` (summed over the groups) of dense-input rows: ``[n]``."""
        T = g.shape[1]
        if T == 1:
            return (g[:, 0].square().sum(-1) * a[:, 0].square().sum(-1)).sum(-1)
        if self._gram_route(T):  # Σ_{t,t'} (g_tᵀ g_t')(a_tᵀ a_t')
            gg = torch.einsum("nsgp,ntgp->ngst", g, g)
            return (gg * torch.einsum("nsgq,ntgq->ngst", a, a)).sum((1, 2, 3))
        return self.per_example(g, a).square().sum((1, 2, 3))

    def self_scores(self, g: Tensor, a: Tensor) -> Tensor:
        """``w_c ‖G_n‖² + Σ (W − w_c) ⊙ (Q_Sᵀ G_n Q_A)²`` for every data point of the rows."""
        n, T = g.shape[:2]
        w_c, excess = self.complement_weight, self._excess
        gt = g if self.Q_S is None else torch.einsum("ntgp,gpi->ntgi", g, self.Q_S)
        if self.diagonal:  # Q_A = I: G̃_n's columns are the sums of g̃ over a token's positions
            key = (torch.arange(n, device=a.device)[:, None] * self.q + a).reshape(-1)
            uniq, inverse = torch.unique(key, return_inverse=True)
            summed = gt.new_zeros(uniq.numel(), gt.shape[-1])
            summed.index_add_(0, inverse, gt.reshape(n * T, -1))
            per_token = (summed.square() * excess[0].T[uniq % self.q]).sum(-1)
            if w_c:  # ‖G_n‖²: the columns of G_n itself
                if self.Q_S is not None:
                    summed = g.new_zeros(uniq.numel(), self.p)
                    summed.index_add_(0, inverse, g.reshape(n * T, self.p))
                per_token = per_token + w_c * summed.square().sum(-1)
            return gt.new_zeros(n).index_add_(0, uniq // self.q, per_token)
        at = a if self.Q_A is None else torch.einsum("ntgq,gqj->ntgj", a, self.Q_A)
        if T == 1:  # G̃_n = g̃ ãᵀ: Σ_ij g̃_i² (W − w_c)_ij ã_j²
            out = torch.einsum("ngi,gij,ngj->n", gt[:, 0].square(), excess, at[:, 0].square())
        else:
            Gt = torch.einsum("ntgi,ntgj->ngij", gt, at)
            out = (Gt.square() * excess).sum((1, 2, 3))
        return out + w_c * self._norms(g, a) if w_c else out
