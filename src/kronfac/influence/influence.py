r"""Influence functions with a K-FAC or EKFAC curvature (Koh & Liang 2017; Grosse et al. 2023).

For a query ``q`` and a training data point ``t``,

.. math::

    \operatorname{score}(q, t) = ∇_θ ℓ_q(θ)^\top (H + δ I)^{-1} ∇_θ ℓ_t(θ),

with ``ℓ_n`` the loss of **one** data point (summed over its terms: tokens, outputs), ``θ`` the
parameters of the selected modules (the rest of the model contributes nothing), and ``H`` the
K-FAC or EKFAC (George et al. 2018) curvature of the **summed** training loss over ``data``,
whatever ``loss_fn``'s reduction: ``D`` times the operator of the loss as ``loss_fn`` defines
it (docs/conventions.md), ``D`` the entries its mean averages over. ``H`` is block-diagonal over
the modules (a separate bias a block of its own), and each block is diagonal in its factors'
eigenbasis, so ``(H + δI)⁻¹`` is exact (K-FAC: ``(S ⊗ A + δI)⁻¹`` with eigenvalues
``1/(s_i a_j + δ)``, not a product of damped factors). With low-rank factors the bases are
partial and the complement of their span has one more eigenvalue ``c`` (K-FAC: 0; EKFAC: the
mean second moment there), inverted as ``1/(c + δ)``: still exact for this ``H``
(:mod:`kronfac.influence.blocks`).

Sign: upweighting ``t`` by ``ε`` in the summed training loss moves the minimiser by
``dθ/dε = −(H + δI)⁻¹ ∇ℓ_t``, so ``d ℓ_q / dε = −score(q, t)``: a positive score means that
upweighting ``t`` lowers the query's loss (raises its log-likelihood), a helpful example — the
convention of Grosse et al. (2023) with a log-likelihood measurement, and the negative of Koh &
Liang's ``I_up,loss``. Removing ``t`` (``ε = −1``) raises the query loss by about ``score``.

Damping: ``δ`` for every module, or by default per module ``δ_m = 0.1 · mean eigenvalue of
module m's block of H`` (kronfluence's heuristic, on the summed loss): ``0.1 · tr H_m / P_m``
over all ``P_m`` eigenvalues, the complement's included, and over a separate bias's block too.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.factors.data_pass import PassSetup, check_reiterable
from kronfac.influence.blocks import InverseBlock, LowRankQuery, Query, chunks
from kronfac.influence.gradients import Measurement, gradient_rows
from kronfac.operators import curvature_pass, eigen_block

__all__ = ["DEFAULT_MEMORY_BUDGET", "HEURISTIC_DAMPING", "Influence"]

_CURVATURES = ("ekfac", "kfac")
_FISHERS = ("type-2", "mc", "empirical")
#: Bytes of per-example gradients (and the products formed from them) held at once.
DEFAULT_MEMORY_BUDGET = 1 << 28
#: ``δ_m = HEURISTIC_DAMPING · mean eigenvalue of module m's block`` when ``damping=None``.
HEURISTIC_DAMPING = 0.1

Scores = Tensor | dict[str, Tensor]


class Influence:
    r"""Influence scores of training data on queries (module docstring for the formulas).

    The curvature is computed here, from ``data`` (one pass for K-FAC, two for EKFAC); the
    model is taken at its current parameters and left as it was (parameters, gradients,
    hooks, train / eval mode, ``requires_grad``). On torch.distributed (the default process
    group) each rank's ``data`` is its shard of the curvature's data (summed over the ranks);
    each rank scores the ``train_data`` and queries it is given.

    Usage::

        inf = kronfac.Influence(model, nn.CrossEntropyLoss(), train_loader)
        scores = inf.pairwise_scores(train_loader, query_batches)   # [n_query, n_train]
        top = scores.topk(5, dim=1).indices                           # most helpful per query
        self_influence = inf.self_scores(train_loader)              # [n_train]

    Args:
        model: The trained model (usually in eval mode: dropout makes gradients random).
        loss_fn: Its training loss: ``nn.CrossEntropyLoss`` (``ignore_index`` honoured),
            ``nn.BCEWithLogitsLoss`` or ``nn.MSELoss``, any reduction (``H`` and the gradients
            are those of the summed loss).
        data: Batches ``(X, y)`` the curvature is computed from (re-iterable for EKFAC); ``X``
            a Tensor or a Mapping (``model(**X)``; its ``attention_mask`` masks padding).
        curvature: ``"ekfac"`` or ``"kfac"``.
        damping: ``None``: per module ``δ_m = 0.1 ·`` the mean eigenvalue of its block of
            ``H`` (:data:`HEURISTIC_DAMPING`); a number ``δ ≥ 0``: the same absolute ``δ`` for
            every module. Where ``λ + δ = 0`` the inverse is taken as 0 (pseudo-inverse).
        modules: Name substrings of the modules whose parameters count (``None``: every
            supported module with a trainable weight).
        fisher: The curvature's Fisher type: ``"mc"``, ``"type-2"`` or ``"empirical"``.
        rank: Keep every factor whose side is at least ``rank_threshold`` as a rank-``rank``
            low-rank factor (as in :func:`kronfac.compute_factors`): memory ``side · rank``
            instead of ``side²``. The complement of the factors' span keeps the eigenvalue
            ``c`` (K-FAC: 0, so ``1/δ`` there; EKFAC: the mean second moment outside the
            span), and the scores are exact for this ``H``. An embedding's input factor is
            diagonal and never low-rank.
        rank_threshold: The side from which a factor is kept low-rank (with ``rank``).
        bias: ``"joint"`` (a bias as a last column of its weight's block) or ``"separate"``
            (a block of its own, ``S`` alone). Either way ``per_module`` results and the
            damping are per module.
        forward: ``forward(model, X) -> output`` when the loss does not take ``model(X)``
            (``lambda model, X: model(**X).logits.transpose(1, 2)`` for a causal LM).
        memory_budget: Bytes of per-example gradients, and of the products formed from them,
            held at once while scoring: each batch is split into chunks of data points that
            fit, one module at a time (at least one data point per chunk). Not counted: the
            batches' own activations and layer rows (their batch size sets those), the
            preconditioned query gradients (``n_query × P`` elements, less with
            ``query_rank``) and the scores.
        progress: Progress bars over the data.

    Attributes:
        model: The model.
        curvature: The K-FAC / EKFAC operator of the loss as ``loss_fn`` defines it (``H`` is
            ``hessian_scale`` times it).
        hessian_scale: ``D`` (1 for ``reduction="sum"``).
        num_data: ``N``, the data points of ``data``.
        modules: The selected modules, the keys of ``per_module`` results.
        param_names: Their parameters, in the layout of :attr:`curvature`.
        damping: ``δ_m`` of every module (a dict), as used.
        memory_budget: See above.

    Raises:
        ValueError: An unknown ``curvature``, ``fisher`` or ``bias``, a negative or
            non-finite ``damping``, a ``rank`` or ``rank_threshold`` that is not a positive
            integer, a non-positive ``memory_budget``, ``modules`` matching no module, or
            empty ``data``.
        TypeError: A ``damping`` or ``memory_budget`` that is not a number, or one-shot
            ``data`` with EKFAC.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Iterable[Any],
        *,
        curvature: str = "ekfac",
        damping: float | None = None,
        modules: Sequence[str] | str | None = None,
        fisher: str = "mc",
        rank: int | None = None,
        rank_threshold: int = 512,
        bias: str = "joint",
        forward: Callable[[nn.Module, Any], Tensor] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        progress: bool = False,
    ) -> None:
        if curvature not in _CURVATURES:
            raise ValueError(
                f"Unknown curvature {curvature!r}; expected one of {list(_CURVATURES)}."
            )
        if fisher not in _FISHERS:
            raise ValueError(f"Unknown fisher {fisher!r}; expected one of {list(_FISHERS)}.")
        delta = _check_damping(damping)
        self.memory_budget = _positive_int("memory_budget", memory_budget, "a number of bytes")
        if curvature == "ekfac":
            check_reiterable(data, "Influence(curvature='ekfac')")
        options: dict[str, Any] = {
            "fisher": fisher,
            "modules": modules,
            "rank": rank,
            "rank_threshold": rank_threshold,
            "bias": bias,
            "forward": forward,
            "progress": progress,
        }
        setup = PassSetup.create(model, loss_fn, **options)
        op, result = curvature_pass(model, loss_fn, data, setup, curvature)
        self.model, self.curvature = model, op
        self.hessian_scale = float(result.mean_divisor(setup.likelihood))
        self.num_data = result.num_data
        self.modules = list(op.factors)
        self.param_names = list(op.param_names)
        self._blocks = [
            InverseBlock(eigen_block(b), slot, self.hessian_scale)
            for slot, b in zip(op._slots, op._blocks, strict=True)
        ]
        self.damping = self._damp(delta)
        # the per-example gradients: the loss's at the true labels, for the modules of H
        self._setup = dataclasses.replace(
            setup,
            options=dataclasses.replace(setup.options, fisher="empirical"),
            adapters={n: a for n, a in setup.adapters.items() if n in op.factors},
        )

    def _damp(self, delta: float | None) -> dict[str, float]:
        """``δ_m`` per module (the heuristic for ``None``), set on its blocks."""
        out = {}
        for module in self.modules:
            blocks = [b for b in self._blocks if b.module == module]
            if delta is None:
                total = sum(b.eigenvalue_sum for b in blocks)  # with the complements'
                d = HEURISTIC_DAMPING * total / sum(b.numel for b in blocks)
            else:
                d = delta
            for b in blocks:
                b.damp(d)
            out[module] = d
        return out

    # -- scores ------------------------------------------------------------------------------
    def pairwise_scores(
        self,
        train_data: Iterable[Any],
        query_data: Iterable[Any],
        *,
        query_loss_fn: Measurement | None = None,
        query_rank: int | None = None,
        per_module: bool = False,
    ) -> Scores:
        r"""``score(q, t) = ∇m_qᵀ (H + δI)⁻¹ ∇ℓ_t`` for every query and training data point.

        The query gradients are preconditioned once (one pass over ``query_data``, held in
        memory), then each chunk of training gradients is scored by inner products (one pass
        over ``train_data``).

        Args:
            train_data: Batches ``(X, y)`` of the training data to score (one pass).
            query_data: Batches ``(X, y)`` of the queries (one pass).
            query_loss_fn: The measurement ``m(output, y)`` of a query batch, a scalar summed
                over its data points (each query's term is its own ``m_q``); default: the
                loss, summed over each query's terms (``ignore_index`` and padding masked as
                for ``H``). With another measurement a positive score means upweighting the
                training point lowers ``m``.
            query_rank: Keep each query's preconditioned gradient of every module,
                ``[d_out, d_in (+1)]``, as its rank-``r`` truncated SVD (kronfluence's
                ``query_gradient_low_rank``): memory ``n_q · r · (d_out + d_in)`` per module
                instead of ``n_q · d_out · d_in``; exact for ``r ≥ min(d_out, d_in + 1)``.
            per_module: Return a dict module → scores, whose sum is the total.

        Returns:
            ``[n_query, n_train]`` in the order of the data (or a dict of them).

        Raises:
            ValueError: Empty ``train_data`` / ``query_data``, targets that do not fit the loss
                (their length, dtype or range), a ``query_loss_fn`` with a reduction other than
                ``"sum"`` or that does not return a scalar, or a ``query_rank`` below 1.
            TypeError: A ``query_loss_fn`` that is not callable, or a ``query_rank`` that is
                not an integer.
        """
        _check_bool("per_module", per_module)
        measurement = _check_measurement(query_loss_fn)
        rank = None if query_rank is None else _positive_int("query_rank", query_rank, "a rank")
        queries, nq = self._queries(query_data, measurement, rank)

        def score(i: int, block: InverseBlock, g: Tensor, a: Tensor) -> Tensor:
            return block.pairwise(queries[i], g, a)

        def cost(i: int, block: InverseBlock, T: int) -> int:
            return block.pairwise_cost(queries[i], T)

        return self._train_pass(train_data, per_module, (nq,), score, cost)

    def self_scores(self, train_data: Iterable[Any], *, per_module: bool = False) -> Scores:
        r"""``∇ℓ_tᵀ (H + δI)⁻¹ ∇ℓ_t`` for every training data point: ``[n_train]``.

        Each block's contribution is ``w_c ‖G_t‖² + Σ (W − w_c) ⊙ (Q_Sᵀ G_t Q_A)²``,
        ``W = 1/(Λ + δ)`` and ``w_c = 1/(c + δ)`` for the complement of partial bases (0 for
        complete ones): each gradient rotated into the eigenbasis, never a dense ``P × P``
        matrix.

        Args:
            train_data: Batches ``(X, y)`` (one pass).
            per_module: Return a dict module → scores, whose sum is the total.

        Returns:
            ``[n_train]`` in the order of the data (or a dict of them).

        Raises:
            ValueError: Empty ``train_data`` or targets that do not fit the loss.
        """
        _check_bool("per_module", per_module)

        def score(i: int, block: InverseBlock, g: Tensor, a: Tensor) -> Tensor:
            return block.self_scores(g, a)

        def cost(i: int, block: InverseBlock, T: int) -> int:
            return block.self_cost(T)

        return self._train_pass(train_data, per_module, (), score, cost)

    # -- passes ------------------------------------------------------------------------------
    def _queries(
        self, query_data: Iterable[Any], measurement: Measurement | None, rank: int | None
    ) -> tuple[list[Query], int]:
        """Every block's preconditioned query gradients (low-rank with ``rank``), and ``n_q``."""
        parts: list[list[Query]] = [[] for _ in self._blocks]
        nq = 0
        for rows in gradient_rows(self._setup, self.model, query_data, measurement, "query_data"):
            for i, block in enumerate(self._blocks):
                found = block.rows(rows)
                if found is None:  # no gradient reached the block
                    shape = (rows.n, block.groups, block.p, block.q)
                    found_parts = [block.values.new_zeros(shape)]
                else:
                    g, a = found
                    cost = 4 * block.numel + g.shape[1] * block.groups * block.p
                    found_parts = [
                        block.precondition(block.per_example(g[s], a[s]))
                        for s in chunks(rows.n, cost, g.element_size(), self.memory_budget)
                    ]
                for P in found_parts:
                    parts[i].append(P if rank is None else block.low_rank(P, rank))
            nq += rows.n
        return [_join(p) for p in parts], nq

    def _train_pass(
        self,
        train_data: Iterable[Any],
        per_module: bool,
        lead: tuple[int, ...],
        score: Callable[[int, InverseBlock, Tensor, Tensor], Tensor],
        cost: Callable[[int, InverseBlock, int], int],
    ) -> Scores:
        """Scores ``[*lead, n_train]`` of every training batch, by chunks and blocks."""
        keys = self.modules if per_module else [""]
        out: dict[str, list[Tensor]] = {k: [] for k in keys}
        like = self._blocks[0].values
        for rows in gradient_rows(self._setup, self.model, train_data, None, "train_data"):
            batch = {k: like.new_zeros(*lead, rows.n) for k in keys}
            for i, block in enumerate(self._blocks):
                found = block.rows(rows)
                if found is None:
                    continue
                g, a = found
                target = batch[block.module if per_module else ""]
                size = cost(i, block, g.shape[1])
                for s in chunks(rows.n, size, g.element_size(), self.memory_budget):
                    target[..., s] += score(i, block, g[s], a[s])
            for k in keys:
                out[k].append(batch[k])
        scores = {k: torch.cat(v, dim=-1) for k, v in out.items()}
        return scores if per_module else scores[""]


def _join(parts: list[Query]) -> Query:
    """One block's query chunks joined: dense along the queries, low-rank along the columns."""
    if isinstance(parts[0], LowRankQuery):
        low = [p for p in parts if isinstance(p, LowRankQuery)]
        U = torch.cat([p.U for p in low], dim=-1)
        return LowRankQuery(U, torch.cat([p.V for p in low], dim=-1), low[0].rank)
    return torch.cat([p for p in parts if isinstance(p, Tensor)])


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}.")


def _check_damping(damping: Any) -> float | None:
    if damping is None:
        return None
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise TypeError(
            "damping must be None (the heuristic: 0.1 x each module's mean eigenvalue) or a "
            f"non-negative number, got {type(damping).__name__}."
        )
    value = float(damping)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"damping must be non-negative and finite, got {damping!r}.")
    return value


def _positive_int(name: str, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer ({what}), got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer ({what}), got {value!r}.")
    return int(value)


def _check_measurement(query_loss_fn: Any) -> Measurement | None:
    """``query_loss_fn``, checked: callable, and summed over the batch if it says how."""
    if query_loss_fn is None:
        return None
    if not callable(query_loss_fn):
        raise TypeError(
            "query_loss_fn must be a callable (output, target) -> scalar, got "
            f"{type(query_loss_fn).__name__}."
        )
    reduction = getattr(query_loss_fn, "reduction", "sum")
    if reduction != "sum":
        raise ValueError(
            f"query_loss_fn has reduction={reduction!r}; the measurement must be summed over "
            "the batch (each query's score is that of its own term): use reduction='sum'."
        )
    return query_loss_fn
