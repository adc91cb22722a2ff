r"""K-FAC factors: one pass over the data accumulates every module's ``A`` and ``S``.

Both factors are one Gram sum each over the flattened rows of :func:`run_pass` (BLAS syrk into
the upper triangle where it is faster than a GEMM, :func:`~kronfac.linalg.accumulate_gram`;
symmetrised once when read), accumulated in float32 (float64 for float64 models):

.. math::

    A = \frac{1}{N T} \sum_{n,t} a_{n,t} a_{n,t}^\top, \qquad
    S = \frac{1}{D} \sum_{n,t,k} g_{n,t,k} g_{n,t,k}^\top,

with ``D`` the number of entries torch's ``reduction="mean"`` averages over (``N·R`` for
cross-entropy, ``N·R·C`` for MSE and BCE; ``D = 1`` for ``"sum"``). With ``approx="reduce"`` the
positions are merged first: ``ā_n = 1/T Σ_t a_{n,t}``, ``ĝ_n = Σ_t g_{n,t}`` (Eschenhagen et
al., 2023).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.distributed import all_reduce_counts, all_reduce_sums
from kronfac.errors import NonFiniteError, warn
from kronfac.factors.container import FactorPair, KroneckerFactors
from kronfac.factors.data_pass import BatchRows, PassResult, PassSetup, random_modules, run_pass
from kronfac.factors.options import BatchSizeFn, FactorOptions, ForwardFn
from kronfac.layers import LayerAdapter
from kronfac.linalg import LowRankFactor, StreamingLowRank, accumulate_gram, symmetrize_

__all__ = [
    "FactorAccumulator",
    "FactorSums",
    "check_finite",
    "compute_factors",
    "factor_pass",
]


class FactorSums:
    """Running sums of one module: ``Σ a aᵀ / T``, ``Σ a / T`` (bias column), ``N``, ``Σ g gᵀ``.

    For a diagonal-input layer ``gram`` holds only the diagonal ``[d_in]`` (token counts / T);
    for ``g > 1`` groups every sum has a leading group dimension. A side at least
    ``rank_threshold`` long (with ``rank``) is accumulated as a :class:`StreamingLowRank`
    instead, and its dense sum is never allocated. With a joint bias ``colsum`` holds the bias
    column's sums ``[.., d_in]``, joined with ``gram`` into ``A``'s ``[d + 1, d + 1]`` layout when
    read. The dense Gram sums ``gram`` and ``ggT`` are contiguous and complete in their upper
    triangles only (:func:`~kronfac.linalg.accumulate_gram`, BLAS syrk into one triangle): read
    them through :meth:`dense_input_sums`, :meth:`dense_output_sums`, :meth:`input_factor` and
    :meth:`output_factor`, which restore the lower triangles.
    """

    def __init__(
        self,
        adapter: LayerAdapter,
        dtype: torch.dtype,
        device: torch.device,
        joint_bias: bool,
        rank: int | None = None,
        threshold: int = 512,
        oversample: int | None = None,
    ) -> None:
        d_in, d_out, g = adapter.in_features, adapter.out_features, adapter.groups
        lead = (g,) if g > 1 else ()
        self.A_stream: StreamingLowRank | None = None
        if not adapter.diagonal_input:
            self.A_stream = _stream(d_in + joint_bias, rank, threshold, device, oversample, g)
        self.S_stream = _stream(d_out, rank, threshold, device, oversample, g)
        low_A, low_S = self.A_stream is not None, self.S_stream is not None
        self.groups, self.diagonal = g, adapter.diagonal_input
        gram_shape = (d_in,) if adapter.diagonal_input else (0, 0) if low_A else (d_in, d_in)
        self.gram = torch.zeros(*lead, *gram_shape, dtype=dtype, device=device)
        self.colsum: Tensor | None = None  # Σ a / T, with a joint bias (a bias column)
        if joint_bias and not (low_A or adapter.diagonal_input):
            self.colsum = torch.zeros(*lead, d_in, dtype=dtype, device=device)
        self.count = 0
        side = 0 if low_S else d_out
        self.ggT = torch.zeros(*lead, side, side, dtype=dtype, device=device)

    def add_output_grads(self, g: Tensor, groups: int = 1) -> None:
        """Add output gradients ``g: [K, n, T, d_out]`` to ``Σ g gᵀ``."""
        accumulate_gram(self.ggT, g.flatten(0, 1), groups, 1.0)

    def input_factor(self, num_data: int) -> Tensor | LowRankFactor:
        """``A`` from the running sums, with the bias row and column for a joint bias."""
        if self.A_stream is not None:
            return self.A_stream.result(1.0 / num_data, self.gram.dtype)
        return self.dense_input_sums() / num_data

    def dense_input_sums(self) -> Tensor:
        """``N·A`` of a side summed densely (no ``A_stream``): the sums in the layout of ``A``.

        Without a joint bias the buffer itself (symmetrised in place, no copy), valid until the
        next :meth:`FactorAccumulator.reset`; with one a new ``[.., d + 1, d + 1]`` tensor:
        ``[[Σ a aᵀ / T, Σ a / T], [(Σ a / T)ᵀ, N]]``.
        """
        if self.diagonal:  # token counts, not a Gram matrix
            return self.gram
        gram = symmetrize_(self.gram)
        if self.colsum is None:
            return gram
        d = gram.shape[-1]
        A = gram.new_empty(*gram.shape[:-2], d + 1, d + 1)
        A[..., :d, :d] = gram
        A[..., d, :d] = self.colsum
        A[..., :d, d] = self.colsum
        A[..., d, d] = self.count
        return A

    def dense_output_sums(self) -> Tensor:
        """``Σ g gᵀ`` of a side summed densely (no ``S_stream``): the buffer, symmetrised in place.

        Valid until the next :meth:`FactorAccumulator.reset`.
        """
        return symmetrize_(self.ggT)

    def buffers(self) -> list[Tensor]:
        """The tensors holding the sums (zeroed by :meth:`FactorAccumulator.reset`)."""
        sums = [self.gram, self.ggT] + ([] if self.colsum is None else [self.colsum])
        return sums + [st.Y for st in (self.A_stream, self.S_stream) if st is not None]

    def symmetric(self) -> list[bool]:
        """Per tensor of :meth:`buffers`: whether it is a Gram sum (upper triangle complete)."""
        flags = [not self.diagonal, True] + ([] if self.colsum is None else [False])
        return flags + [False for st in (self.A_stream, self.S_stream) if st is not None]

    def output_factor(self, divisor: int, side: int, identity: bool) -> Tensor | LowRankFactor:
        """``S``: ``Σ g gᵀ / D``, or the identity for ``fisher="forward-only"``."""
        dtype, device = self.gram.dtype, self.gram.device
        if identity:
            if self.S_stream is not None:  # the identity, held as an empty low-rank factor
                lead = (self.groups,) if self.groups > 1 else ()
                empty = torch.zeros(*lead, side, 0, dtype=dtype, device=device)
                return LowRankFactor(empty, empty.new_zeros(*lead, 0), 1.0)
            eye = torch.eye(side, dtype=dtype, device=device)
            return eye.expand_as(self.ggT).clone()
        if self.S_stream is not None:
            return self.S_stream.result(1.0 / divisor, dtype)
        return self.dense_output_sums() / divisor


def _stream(
    side: int,
    rank: int | None,
    threshold: int,
    device: torch.device,
    oversample: int | None,
    groups: int,
) -> StreamingLowRank | None:
    """The low-rank accumulator of a side at least ``threshold`` long (with ``rank``), or None."""
    if rank is None or side < threshold:
        return None
    return StreamingLowRank(side, rank, device, oversample, groups)


def _reduce_positions(
    x: Tensor, weight: Tensor | None, approx: str, colsum: bool
) -> tuple[Tensor, int, Tensor | None]:
    """Rows ``x: [n, T, d]`` ready for one Gram ``Σ a aᵀ / T``, and ``Σ a / T`` if ``colsum``.

    ``"reduce"`` averages the (unmasked) positions first (``T = 1``); padding weights ``w_n``
    (``1/T_n``) scale row ``n`` by ``√w_n`` so that the Gram is ``Σ_n w_n Σ_t a aᵀ`` (``T = 1``).

    Returns:
        The rows, the ``T`` dividing their Gram, and the column sums (``None`` unless asked).
    """
    T = x.shape[1]
    if approx == "reduce":  # inputs averaged over the (unmasked) positions
        x = x.mean(dim=1) if weight is None else x.sum(dim=1) * weight[:, None]
        return x, 1, x.sum(0) if colsum else None
    if weight is None:
        total = x.sum(dim=(0, 1)) if colsum else None
        return x, T, total.div_(T) if total is not None and T > 1 else total
    total = (x.sum(1) * weight[:, None]).sum(0) if colsum else None
    return x * weight.sqrt()[:, None, None], 1, total


def _row_weights(mask: Tensor | None, weight: Tensor | None) -> Tensor | None:
    """Per row (data point, then position) ``mask / T_n`` under padding; ``None`` without.

    ``weight`` (``1/T_n`` per data point) is ``None`` exactly when ``mask`` is.
    """
    if mask is None or weight is None:
        return None
    return (mask * weight[:, None]).reshape(-1)


def _stream_rows(
    adapter: LayerAdapter,
    x: Tensor,
    mask: Tensor | None,
    weight: Tensor | None,
    approx: str,
    joint_bias: bool,
) -> Tensor:
    """The rows ``√w [a, 1]`` whose Gram the dense path forms, for a low-rank input factor.

    ``[m, d(+1)]``; with groups ``[g, m, d(+1)]``, one set of rows per group.
    """
    n, T, d = x.shape
    if approx == "reduce":
        rows = x.mean(dim=1) if weight is None else x.sum(dim=1) * weight[:, None]
        w = rows.new_ones(n)
    else:
        rows = x.reshape(-1, d)
        masked = _row_weights(mask, weight)
        w = rows.new_full((n * T,), 1.0 / T) if masked is None else masked
    g = adapter.groups
    rows = rows.reshape(rows.shape[0], g, d // g)  # [m, g, d_group]
    if joint_bias:
        rows = adapter.append_bias(rows)  # one trailing 1 per group
    rows = rows * w.sqrt()[:, None, None]
    return rows[:, 0] if g == 1 else rows.transpose(0, 1)


def _update_stream(stream: StreamingLowRank, rows: Tensor, name: str, b: int, what: str) -> None:
    """Feed ``rows`` to a low-rank accumulator, refusing NaN / Inf with the module's name."""
    if not bool(torch.isfinite(rows).all()):
        raise NonFiniteError(
            f"Non-finite values (NaN or Inf) in the {what} of module {name!r} at batch {b}."
        )
    stream.update(rows)


def _diagonal(M: Tensor) -> Tensor:
    """The diagonal of a dense factor (per group), or a diagonal factor itself."""
    return M if M.ndim == 1 else M.diagonal(dim1=-2, dim2=-1)


def sum_tensors(ts: Iterable[Tensor]) -> Tensor:
    """``t_1 + t_2 + ...`` of a non-empty iterable (a Tensor, where the builtin ``sum`` adds 0)."""
    return functools.reduce(lambda a, b: a + b, ts)


def check_finite(checks: Mapping[str, Mapping[str, Sequence[Tensor]]], b: int) -> None:
    """Raise :class:`NonFiniteError` naming the sum, module and batch if a sum is not finite.

    ``checks`` maps what is summed (``"inputs"``, ...) to each module's tensors, checked with
    one synchronisation. Pass the diagonals of ``Σ a aᵀ`` / ``Σ g gᵀ``-like sums: a NaN or Inf in
    any row ``a`` reaches the diagonal through ``a_j²``, so the check costs ``O(d)``, not
    ``O(d²)``.
    """
    parts = [t.reshape(-1) for group in checks.values() for ts in group.values() for t in ts]
    if not parts or bool(torch.isfinite(torch.cat(parts)).all()):
        return
    for what, group in checks.items():
        for name, ts in group.items():
            if not all(bool(torch.isfinite(t).all()) for t in ts):
                raise NonFiniteError(
                    f"Non-finite values (NaN or Inf) in the {what} of module {name!r} at batch {b}."
                )


def compute_factors(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable[tuple[Any, Tensor]],
    *,
    fisher: str = "mc",
    mc_samples: int = 1,
    approx: str = "expand",
    modules: Iterable[str] | str | None = None,
    bias: str = "joint",
    forward: ForwardFn | None = None,
    num_data: int | None = None,
    num_per_example_loss_terms: int | None = None,
    seed: int = 2147483647,
    progress: bool = False,
    strict: bool = False,
    rank: int | None = None,
    rank_threshold: int = 512,
    oversample: int | None = None,
    exclude: Iterable[str] | str | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    process_group: Any = None,
) -> KroneckerFactors:
    r"""Kronecker factors of the Fisher / GGN of ``model`` over ``data``.

    Each covered module's block of the curvature of the dataset loss (as ``loss_fn`` defines
    it) is approximated as ``S ⊗ A`` in the row-major flattening of its weight ``[d_out, d_in]``
    (docs/conventions.md), with

    .. math::

        A = \frac{1}{N T} \sum_{n,t} a_{n,t} a_{n,t}^\top, \qquad
        S = \frac{1}{D} \sum_{n,t,k} g_{n,t,k} g_{n,t,k}^\top,

    ``a`` the layer input (a trailing 1 with ``bias="joint"``), ``g`` the backpropagated
    gradients of the summed loss at the layer output, and ``D`` the number of entries torch
    averages over with ``reduction="mean"`` (``N·R`` for cross-entropy, ``N·R·C`` for MSE / BCE;
    ``1`` for ``"sum"``).

    Args:
        model: The model. Its mode (train / eval) is left as it is.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` (class-index targets) or
            ``nn.BCEWithLogitsLoss``, reduction ``"mean"`` or ``"sum"``.
        data: Iterable of batches ``(X, y)``; ``X`` a Tensor or a Mapping (``model(**X)``).
            A Mapping's ``attention_mask`` ``[N, T]`` marks padding: padded positions leave
            ``A`` (each data point weighs its ``T_n`` real positions by ``1/T_n``), the output
            gradients, the loss terms (when there is one term per token) and their count in
            ``D``. Cross-entropy targets equal to ``ignore_index`` leave the loss terms and
            ``D`` as torch drops them.
        fisher: ``"type-2"`` (columns of the loss Hessian's square root: the exact GGN for one
            datum), ``"mc"`` (gradients at ``mc_samples`` labels per term sampled from the
            model), ``"empirical"`` (gradients at the true labels) or ``"forward-only"``
            (``S = I``, no backward pass).
        mc_samples: Samples per loss term for ``fisher="mc"`` (must be 1 otherwise).
        approx: ``"expand"`` (every position a term) or ``"reduce"`` (positions merged first).
        modules: Name substrings selecting modules; ``None`` covers every supported module with
            a trainable weight.
        bias: ``"joint"`` (bias as a last column of ``W``: one block) or ``"separate"``
            (blocks ``S ⊗ A`` for the weight and ``S`` for the bias).
        forward: ``forward(model, X) -> logits``, for models whose output is not the logits.
        num_data: ``N``; counted from the data when ``None`` (a given value must match).
        num_per_example_loss_terms: ``R``; inferred from the outputs when ``None`` (a given
            value must match).
        seed: Seed of the private generator used for MC sampling (the global RNG is untouched).
        progress: Show a tqdm progress bar over the batches.
        strict: Raise a ``ValueError`` instead of an
            :class:`~kronfac.UncoveredParameterWarning` when trainable parameters of the
            selected modules are left out (LayerNorm, raw ``nn.Parameter``, ...).
        rank: Keep every factor whose side is at least ``rank_threshold`` as a rank-``rank``
            :class:`~kronfac.LowRankFactor` ``U diag(λ) Uᵀ`` with the same scale as the
            full-rank factor, computed streaming (a one-pass Nyström sketch in float64 with
            ``l = min(side, 4·rank + 10)`` columns by default, memory ``O(side · l)``): exact
            when the data's rank is at most ``l``.
        rank_threshold: The side from which a factor is kept low-rank.
        oversample: Extra columns ``p`` of the low-rank sketch (``min(side, rank + p)`` in
            all); ``None``: ``p = 3·rank + 10``, the default of
            :class:`~kronfac.linalg.StreamingLowRank` (within 1.07x the optimal rank-``rank``
            Frobenius error on the spectra measured there).
        exclude: Name substrings of modules to leave out, applied after ``modules``.
        batch_size_fn: ``batch_size_fn(X) -> N``, the number of data points of a batch's
            input; default: the first dimension of ``X``, or of a Mapping's ``input_ids``,
            ``attention_mask`` or first tensor value.
        process_group: A ``torch.distributed`` group over which ``data`` is sharded (each
            rank passes its shard); default: the default group when torch.distributed is
            initialised with more than one rank. The sums and counts are all-reduced, so every
            rank gets the factors of the union of the shards; ``fisher="mc"`` draws with
            ``seed + rank`` (docs/distributed.md).

    Returns:
        The factors of every covered module.

    Raises:
        ValueError: Unknown option, empty data, no selected or supported module, shapes that do
            not fit the loss, or counts that disagree with ``num_data`` /
            ``num_per_example_loss_terms``.
        TypeError: Targets of the wrong dtype, or a model output that is not a Tensor.
        NotImplementedError: Unsupported loss or loss option.
        NonFiniteError: NaN / Inf in a module's factors (the module and batch are named).
    """
    options = {k: v for k, v in locals().items() if k not in ("model", "loss_fn", "data")}
    return factor_pass(model, loss_fn, data, FactorOptions(**options))[0]


def factor_pass(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable[tuple[Any, Tensor]],
    options: FactorOptions | PassSetup | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[KroneckerFactors, PassResult]:
    """:func:`compute_factors`, with what its pass counted.

    ``options``: a :class:`FactorOptions`, a mapping or keywords, or a :class:`PassSetup`
    already validated for this model and loss (EKFAC's two passes share one).

    Warns:
        UserWarning: Once, when the forward pass is random (active dropout in train mode,
            naming the modules), or when ``rank`` applies to no factor.
    """
    if isinstance(options, PassSetup):
        setup = options
    else:
        setup = PassSetup.create(model, loss_fn, options, **kwargs)
    random = random_modules(model)
    if random:
        warn(
            f"The model is in train mode with active dropout in "
            f"{', '.join(map(repr, random))}: every batch's factors are those of another "
            "random sub-network. Call model.eval() before computing curvature.",
            UserWarning,
        )
    _warn_unused_rank(setup)
    sums = FactorAccumulator(setup)
    result = run_pass(setup, model, data, sums.add, reduce=sums.all_reduce)
    pairs = sums.factors(result.num_data, result.mean_divisor(setup.likelihood), result.left_out)
    factors = KroneckerFactors(
        pairs,
        param_names={n: setup.param_names[n] for n in pairs},
        options=setup.recorded,
        num_data=result.num_data,
        num_per_example_loss_terms=result.terms_per_example,
    )
    return factors, result


class FactorAccumulator:
    """Every covered module's :class:`FactorSums`, fed batch by batch with :class:`BatchRows`.

    The one place where rows become factor sums: :func:`compute_factors` feeds it a pass over
    the data, the optimizer the batches of its training steps.

    Args:
        setup: The pass's options and modules.
    """

    def __init__(self, setup: PassSetup) -> None:
        self.setup = setup
        self.sums: dict[str, FactorSums] = {}

    def reset(self) -> None:
        """Empty every module's sums for another pass, keeping the buffers."""
        if not self.sums:
            return
        torch._foreach_zero_([t for acc in self.sums.values() for t in acc.buffers()])
        for acc in self.sums.values():
            acc.count = 0

    def add(self, rows: BatchRows) -> None:
        """Add one batch's inputs and output gradients (NaN / Inf raise, naming the module)."""
        if not rows.inputs:  # no covered module was called in this batch
            return
        device = next(iter(rows.inputs.values())).device
        if not self.sums or self._restart(rows.dtype, device):
            self._start(rows.dtype, device)
        self._add_inputs(rows)
        self._add_grads(rows)
        # a NaN / Inf in a's coordinate j reaches Σ a aᵀ's diagonal (a_j²), and Σ a with it
        checks = {"inputs": {n: [_diagonal(a.gram)] for n, a in self.sums.items()}}
        if rows.grads:
            checks["output gradients"] = {
                n: [a.ggT.diagonal(dim1=-2, dim2=-1)]
                + [st.sigma for st in (a.S_stream, a.A_stream) if st is not None]
                for n, a in self.sums.items()
            }
        check_finite(checks, rows.index)

    def _restart(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether empty sums (after :meth:`reset`) are of another dtype or device than rows."""
        acc = next(iter(self.sums.values()))
        if (acc.ggT.dtype, acc.ggT.device) == (dtype, device):
            return False
        return all(a.count == 0 for a in self.sums.values())

    def _start(self, dtype: torch.dtype, device: torch.device) -> None:
        options = self.setup.options
        self.sums = {
            n: FactorSums(
                a,
                dtype,
                device,
                self.setup.joint_bias(n),
                options.rank,
                options.rank_threshold,
                options.oversample,
            )
            for n, a in self.setup.adapters.items()
        }

    def _add_inputs(self, rows: BatchRows) -> None:
        shared: dict[int, list[str]] = {}  # modules fed the same tensor share one GEMM
        for name, x in rows.inputs.items():
            shared.setdefault(id(x), []).append(name)
        for names in shared.values():
            mask = rows.masks[names[0]]
            # per data point 1/T_n: T_n its unmasked positions (every position without padding)
            weight = None if mask is None else mask.sum(1).clamp(min=1).reciprocal()
            x = rows.inputs[names[0]]
            dense = []
            for name in names:
                stream = self.sums[name].A_stream
                if stream is None:
                    dense.append(name)
                    continue
                r = _stream_rows(
                    self.setup.adapters[name],
                    x,
                    mask,
                    weight,
                    self.setup.options.approx,
                    self.setup.joint_bias(name),
                )
                _update_stream(stream, r, name, rows.index, "inputs")
                self.sums[name].count += rows.n
            if dense:
                self._add_dense_inputs(dense, x, mask, weight, rows)

    def _add_dense_inputs(
        self,
        names: list[str],
        x: Tensor,
        mask: Tensor | None,
        weight: Tensor | None,
        rows: BatchRows,
    ) -> None:
        """``Σ a aᵀ / T`` (weighted by ``1/T_n`` under padding) of modules fed the same ``x``."""
        adapter, T = self.setup.adapters[names[0]], x.shape[1]
        if adapter.diagonal_input:
            w = _row_weights(mask, weight)
            for name in names:
                counts = self.setup.adapters[name].input_diagonal(x, w).to(rows.dtype)
                self.sums[name].gram += counts if w is not None else counts / T
                self.sums[name].count += rows.n
            return
        bias = any(self.sums[n].colsum is not None for n in names)  # a bias column
        x, T, colsum = _reduce_positions(x, weight, self.setup.options.approx, bias)
        gram = None
        if len(names) > 1:
            gram = torch.zeros_like(self.sums[names[0]].gram)
            accumulate_gram(gram, x, adapter.groups, 1.0 / T)
        for name in names:
            acc = self.sums[name]
            if gram is None:
                accumulate_gram(acc.gram, x, adapter.groups, 1.0 / T)
            else:
                acc.gram += gram
            if acc.colsum is not None:
                assert colsum is not None  # computed for the modules with a bias column
                acc.colsum += colsum.reshape(acc.colsum.shape)
            acc.count += rows.n

    def _add_grads(self, rows: BatchRows) -> None:
        for name, g in rows.grads.items():
            if self.setup.options.approx == "reduce":
                g = g.sum(dim=2)
            stream = self.sums[name].S_stream
            if stream is not None:
                groups = self.setup.adapters[name].groups
                rows_g = g.reshape(-1, groups, g.shape[-1] // groups).transpose(0, 1)  # [g, m, p]
                _update_stream(
                    stream,
                    rows_g[0] if groups == 1 else rows_g,
                    name,
                    rows.index,
                    "output gradients",
                )
            else:
                self.sums[name].add_output_grads(g, self.setup.adapters[name].groups)

    def all_reduce(self, group: Any) -> int:
        """Sum every module's sums and row counts over the ranks of ``group`` (in place).

        One bucketed all-reduce (:func:`kronfac.distributed.all_reduce_sums`: Gram sums as
        upper triangles). Returns the bytes sent.
        """
        tensors = [t for acc in self.sums.values() for t in acc.buffers()]
        symmetric = [f for acc in self.sums.values() for f in acc.symmetric()]
        sent = all_reduce_sums(tensors, symmetric, group)
        counts = all_reduce_counts([acc.count for acc in self.sums.values()], group)
        for acc, count in zip(self.sums.values(), counts, strict=True):
            acc.count = count
        return sent

    def factors(
        self, num_data: int, divisor: int, left_out: Iterable[str] = ()
    ) -> dict[str, FactorPair]:
        """``(A, S)`` of every module fed so far: ``A = Σ a aᵀ / N``, ``S = Σ g gᵀ / D``.

        Args:
            num_data: ``N``.
            divisor: ``D`` of the scale rule (``1`` for a summed loss).
            left_out: Modules to leave out (never called, or not batch-first).
        """
        identity = self.setup.options.fisher == "forward-only"
        out = {}
        for name, acc in self.sums.items():
            if name in left_out:
                continue
            A = acc.input_factor(num_data)
            side = self.setup.adapters[name].out_features
            out[name] = FactorPair(A, acc.output_factor(divisor, side, identity=identity))
        return out


def _warn_unused_rank(setup: PassSetup) -> None:
    """Warn when ``rank`` is given but every factor's side is below ``rank_threshold``."""
    rank, threshold = setup.options.rank, setup.options.rank_threshold
    if rank is None:
        return
    sides = {
        max(a.in_features + setup.joint_bias(n) if not a.diagonal_input else 0, a.out_features)
        for n, a in setup.adapters.items()
    }
    if max(sides) < threshold:
        warn(
            f"rank={rank} applies to no factor: every side is below rank_threshold={threshold} "
            f"(the largest is {max(sides)}), so every factor is full rank. Lower "
            "rank_threshold to make them low-rank.",
            UserWarning,
        )
