"""One pass over the data: the canonical rows of every covered module, batch by batch.

For each batch the model runs once with forward hooks recording every covered module's input
``a`` and output ``s``. The likelihood turns the model output into ``K`` backpropagated vectors
per loss term (``type-2``: the columns of the loss Hessian's square root; ``mc``: gradients at
sampled labels, scaled by ``1/√mc_samples``; ``empirical``: gradients at the true labels). One
call of :func:`torch.autograd.grad` — batched over the ``K`` vectors with
``is_grads_batched`` — gives ``g = ∂ℓ/∂s`` (of the *summed* loss) at every covered module's
output, never the weight gradients. The pass hands each batch to a consumer as
:class:`BatchRows`: inputs ``[n, T, d_in]`` and output gradients ``[K, n, T, d_out]`` per module
(a module called several times in one forward contributes every call as more positions).

For sequence outputs the vectors of all terms of a batch are backpropagated together, so the
output gradient at one position sums the contributions of every loss term that depends on it
(for type-2 this includes products between different terms of one sequence; for MC they vanish
in expectation), the usual K-FAC treatment of shared layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kronfac.distributed import agree, all_reduce_counts, group_of, rank_of
from kronfac.errors import NonFiniteError, UncoveredParameterWarning, warn
from kronfac.factors.container import ParamNames
from kronfac.factors.hooks import Call, record_calls
from kronfac.factors.options import (
    BatchSizeFn,
    FactorOptions,
    ForwardFn,
)
from kronfac.factors.selection import select_modules
from kronfac.layers import LayerAdapter
from kronfac.likelihoods import Likelihood, get_likelihood

__all__ = [
    "BatchInfo",
    "BatchRows",
    "PassResult",
    "PassSetup",
    "PassTally",
    "batch_size",
    "check_outputs_unchanged",
    "check_reiterable",
    "grad_rows",
    "per_example",
    "random_modules",
    "run_pass",
]


# Upper bound on the elements of the output gradients held at once; type-2 with many classes
# backpropagates its K vectors in chunks that stay below it.
_MAX_BATCHED_ELEMENTS = 1 << 27


def check_reiterable(data: Iterable[Any], what: str, process_group: Any = None) -> None:
    """Refuse a one-shot iterator (a generator) as the data of a computation of two passes.

    On torch.distributed (``process_group``, or the default group) every rank learns whether
    every rank's data passed, and all raise if one did not (no rank left in a collective).

    Raises:
        TypeError: Naming ``what`` and the fix (a list or a DataLoader).
        RuntimeError: On torch.distributed, when another rank's data is a one-shot iterator.
    """
    error = None
    if isinstance(data, Iterator):
        error = TypeError(
            f"{what} makes two passes over the data, but data is a one-shot iterator "
            f"({type(data).__name__}): its second pass would be empty. Pass a list of batches "
            "or a DataLoader."
        )
    group = group_of(process_group)
    if group is not None:
        agree(group, error, what)
    elif error is not None:
        raise error


def random_modules(model: nn.Module) -> list[str]:
    """Names of the modules that make the forward pass random: active dropout in train mode.

    ``nn.Dropout`` and its variants with ``p > 0``, and modules with a positive ``dropout`` /
    ``attention_dropout`` rate (``nn.MultiheadAttention``, transformers' attention layers),
    each only while in training mode.
    """
    names = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            rate = module.p
        else:
            rates = [getattr(module, k, 0.0) for k in ("dropout", "attention_dropout")]
            rate = max((r for r in rates if isinstance(r, float)), default=0.0)
        if rate > 0:
            names.append(name or "(the model)")
    return names


@dataclass
class PassSetup:
    """Validated options of a pass, the likelihood and the covered modules.

    Build it with :meth:`create`, which checks every option and raises on bad input.
    """

    options: FactorOptions
    likelihood: Likelihood
    adapters: dict[str, LayerAdapter]
    param_names: dict[str, ParamNames]
    tied: dict[str, list[LayerAdapter]]

    @classmethod
    def create(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        options: FactorOptions | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> PassSetup:
        """Validate the options (:class:`FactorOptions`), the loss and the module selection.

        Raises:
            TypeError: A ``loss_fn`` that is not a loss module, or an unknown option.
            ValueError: Bad option values or module selections (see :func:`select_modules`).
            NotImplementedError: An unsupported loss, or options a selected layer does not
                support (low-rank grouped convolutions, ``approx="reduce"`` for embeddings).
        """
        options = FactorOptions.of(options, **kwargs)
        if not isinstance(loss_fn, nn.Module):
            raise TypeError(
                f"loss_fn must be a torch.nn loss module, got {type(loss_fn).__name__}."
            )
        likelihood = get_likelihood(loss_fn)
        adapters, param_names, tied = select_modules(
            model, options.modules, options.strict, options.exclude
        )
        setup = cls(options, likelihood, adapters, param_names, tied)
        setup._check_layers()
        return setup

    def _check_layers(self) -> None:
        """Refuse options that a selected layer does not support."""
        options = self.options
        diagonal = [n for n, a in self.adapters.items() if a.diagonal_input]
        if options.approx == "reduce" and diagonal:
            raise NotImplementedError(
                f"approx='reduce' is not supported for {', '.join(diagonal)}: averaging one-hot "
                "inputs makes their input factor dense. Use approx='expand' or leave them out "
                "with `exclude=`."
            )

    @property
    def recorded(self) -> dict[str, Any]:
        """The options recorded with the factors."""
        return self.options.recorded(self.likelihood.loss_fn, self.likelihood.reduction)

    def joint_bias(self, name: str) -> bool:
        """Whether module ``name``'s bias joins its weight's block as a last column."""
        return self.options.bias == "joint" and self.param_names[name].bias is not None


@dataclass
class BatchRows:
    """One batch in the canonical format, for a consumer of :func:`run_pass`.

    Attributes:
        index: The batch's index in the data.
        n: Its number of data points.
        dtype: The accumulation dtype (float32, or float64 for float64 models).
        inputs: Module name → layer inputs ``[n, T, d_in]`` in the accumulation dtype (token
            indices ``[n, T, 1]`` for diagonal-input layers). Modules fed the very same tensors
            (queries, keys and values of an attention block) get the same object.
        masks: Module name → ``[n, T]`` 0/1 weights of the positions (padding from the batch's
            ``attention_mask``), or ``None`` when every position counts. Inputs and gradients
            are already zero at masked positions (token indices are not: weigh them).
        grads: Module name → output gradients ``[K, n, T, d_out]`` of the summed loss (empty for
            ``fisher="forward-only"``; a module whose output does not reach the loss is absent).
    """

    index: int
    n: int
    dtype: torch.dtype
    inputs: dict[str, Tensor]
    masks: dict[str, Tensor | None]
    grads: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class PassResult:
    """What a pass counted.

    ``N``, the largest ``R``, ``C``, the loss terms counted, the selected modules left out
    (never called, or not batch-first; with a warning, when every module was selected), and
    checksums of the first batch's input and model output (sum and absolute sum): two passes
    of a deterministic model over the same data give the same ones.
    """

    num_data: int
    terms_per_example: int
    num_classes: int
    num_terms: int
    left_out: tuple[str, ...] = ()
    fingerprint: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def same_first_batch(self, other: PassResult) -> bool | None:
        """Whether ``other`` saw the same first batch give the same model output.

        ``None`` when the first inputs differ (shuffled data: nothing to compare); otherwise
        the outputs' sums must agree to ``1e-5`` of their absolute sum (GPU round-off).
        """
        (x, out, scale), (x2, out2, _) = self.fingerprint, other.fingerprint
        if x != x2:
            return None
        return abs(out - out2) <= 1e-5 * scale

    def check(self, options: FactorOptions) -> PassResult:
        """``self``, if its counts agree with the options.

        Raises:
            ValueError: Counts that disagree with ``num_data`` / ``num_per_example_loss_terms``,
                or every loss term masked.
        """
        if options.num_data is not None and options.num_data != self.num_data:
            raise ValueError(
                f"num_data={options.num_data} but the data holds {self.num_data} data points."
            )
        given = options.num_per_example_loss_terms
        if given is not None and given != self.terms_per_example:
            raise ValueError(
                f"num_per_example_loss_terms={given} but the model output has "
                f"{self.terms_per_example} loss terms per data point."
            )
        if self.num_terms == 0:
            raise ValueError("Every loss term is masked (ignore_index or attention_mask).")
        return self

    def all_reduce(self, group: Any) -> PassResult:
        """The counts of the union of every rank's shard.

        ``N`` and the loss terms summed over the ranks, ``R`` and ``C`` the largest.
        """
        n, terms = all_reduce_counts([self.num_data, self.num_terms], group)
        R, C = all_reduce_counts([self.terms_per_example, self.num_classes], group, op="max")
        return dataclasses.replace(
            self, num_data=n, num_terms=terms, terms_per_example=R, num_classes=C
        )

    def mean_divisor(self, likelihood: Likelihood) -> int:
        """``D``: the entries torch's mean averages over for the dataset loss (1 for sum)."""
        return likelihood.mean_divisor(self.num_terms, self.num_classes)


def _run_forward(model: nn.Module, X: Any, forward: ForwardFn | None, batch_index: int) -> Tensor:
    """The logits of batch ``X``: ``forward(model, X)``, ``model(**X)`` or ``model(X)``.

    Raises:
        TypeError: If the model does not return a Tensor, or fails on data of another
            floating dtype than its parameters (both named, with the first such module).
    """
    try:
        if forward is not None:
            output = forward(model, X)
        elif isinstance(X, Mapping):
            output = model(**X)
        else:
            output = model(X)
    except RuntimeError as err:
        mismatch = _dtype_mismatch(model, X)
        if mismatch is None:
            raise
        raise TypeError(f"Batch {batch_index}: {mismatch} ({err})") from err
    if not isinstance(output, Tensor):
        raise TypeError(
            f"Batch {batch_index}: the model returned {type(output).__name__}, expected the "
            "logits as a Tensor. Pass forward=lambda model, X: ... returning them "
            "(e.g. model(**X).logits for a transformers model)."
        )
    return output


def _dtype_mismatch(model: nn.Module, X: Any) -> str | None:
    """Describe data of another floating dtype than the model's parameters, or ``None``."""
    tensors = X.values() if isinstance(X, Mapping) else X if isinstance(X, (list, tuple)) else [X]
    data = {t.dtype for t in tensors if isinstance(t, Tensor) and t.is_floating_point()}
    for name, module in model.named_modules():
        params = {p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()}
        if params and data and not params & data:
            return (
                f"the data is {', '.join(map(str, sorted(data, key=str)))} but module "
                f"{name or '(the model)'!r} has {', '.join(map(str, sorted(params, key=str)))} "
                "parameters. Cast the data to the model's dtype or the model to the data's"
            )
    return None


def _backprop_vectors(
    likelihood: Likelihood,
    fisher: str,
    output: Tensor,
    y: Tensor,
    n: int,
    mc_samples: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    per_term: bool = False,
    term_mask: Tensor | None = None,
    fast_sampling: bool = False,
) -> Tensor:
    """The ``K`` vectors ``[K, *output.shape]`` whose backpropagation gives the ``g``'s.

    Terms outside ``term_mask`` (``ignore_index`` targets, padding) get zero vectors. MC labels
    come from the likelihood's ``sample``, or with ``fast_sampling`` its ``sample_fast``.

    With ``per_term=True`` and ``R > 1`` terms per data point, type-2 gets one vector per
    (term position, Hessian-root column), ``K = R·C``, each supported on a single term, so that
    the per-example gradient of vector ``k`` is that of one term only (the columns of the
    square root of the per-example loss Hessian ``Σ_r H_r``). K-FAC's ``S`` uses the ``C``
    vectors shared by all terms.

    Raises:
        ValueError: If the per-term vectors would not fit in memory.
    """
    terms = likelihood.to_terms(output.detach().to(dtype))
    if fisher == "type-2":
        root = likelihood.hessian_sqrt(terms)  # [M, C, K]
        R = terms.shape[0] // n  # terms are ordered data point by data point
        if per_term and R > 1:
            M, C, K = root.shape
            if R * K * M * C > _MAX_BATCHED_ELEMENTS:
                raise ValueError(
                    f"Type-2 per-example gradients of {R} loss terms per data point need {R}x{K} "
                    f"backpropagated vectors per batch ({R * K * M * C} elements); use "
                    "fisher='mc' or smaller batches."
                )
            eye = torch.eye(R, dtype=root.dtype, device=root.device)
            vectors = torch.einsum("nrck,rs->rknsc", root.reshape(n, R, C, K), eye)
            vectors = vectors.reshape(R * K, M, C)
        else:
            vectors = root.permute(2, 0, 1)
    elif fisher == "mc":
        assert generator is not None
        sample = likelihood.sample_fast if fast_sampling else likelihood.sample
        samples = sample(terms, mc_samples, generator)
        vectors = likelihood.gradient(terms, samples) / math.sqrt(mc_samples)
    else:  # empirical
        targets = likelihood.targets_to_terms(y, output)
        if term_mask is not None and not targets.is_floating_point():
            targets = torch.where(term_mask.view(targets.shape), targets, 0)
        vectors = likelihood.gradient(terms, targets).unsqueeze(0)
    if term_mask is not None:
        vectors = vectors * term_mask.reshape(1, -1, 1).to(vectors.dtype)
    return likelihood.from_terms(vectors, output).to(output.dtype)


def _output_gradients(
    output: Tensor, calls: list[Call], vectors: Tensor, retain_graph: bool = False
) -> list[Tensor | None]:
    """``[K, *call.output.shape]`` gradients of ``⟨vectors_k, output⟩`` at each call's output.

    ``retain_graph=True`` keeps the graph for a later backward pass (a training step's).
    """
    outs = [c.output for c in calls]
    if not outs:  # no covered module was called in this batch
        return []
    K = vectors.shape[0]
    if K == 1:
        grads = torch.autograd.grad(
            output, outs, vectors[0], retain_graph=retain_graph, allow_unused=True
        )
        return [None if g is None else g.unsqueeze(0) for g in grads]
    per_vector = output.numel() + sum(o.numel() for o in outs)
    chunk = max(1, min(K, _MAX_BATCHED_ELEMENTS // max(per_vector, 1)))
    pieces: list[list[Tensor | None]] = []
    for start in range(0, K, chunk):
        part = vectors[start : start + chunk]
        last = start + chunk >= K
        pieces.append(
            list(
                torch.autograd.grad(
                    output,
                    outs,
                    part,
                    retain_graph=retain_graph or not last,
                    is_grads_batched=True,
                    allow_unused=True,
                )
            )
        )
    return [
        None if ps[0] is None else torch.cat(ps) if len(ps) > 1 else ps[0]
        for ps in zip(*pieces, strict=True)
    ]


def run_pass(
    setup: PassSetup,
    model: nn.Module,
    data: Iterable[Any],
    consume: Callable[[BatchRows], None],
    desc: str = "kronfac factors",
    per_term: bool = False,
    reduce: Callable[[Any], object] | None = None,
) -> PassResult:
    """Run the model over ``data`` once and hand every batch's rows to ``consume``.

    On torch.distributed (:mod:`kronfac.distributed`: the options' ``process_group``, or the
    default group) ``data`` is this rank's shard: after the local pass every rank learns
    whether every rank's pass succeeded (all raise otherwise), the counts are summed over the
    ranks, and ``reduce(group)`` sums what ``consume`` accumulated.

    ``per_term=True`` backpropagates type-2 vectors term by term (see
    :func:`_backprop_vectors`), as per-example gradients need.

    A batch's ``N`` is :func:`batch_size` of its input; the loss's ``M`` terms must split into
    ``R = M / N`` per data point (outputs ``[N, ...]``, or flattened data point by data point
    ``[N·R, ...]``), and every covered module's output must have the ``N`` data points first.
    A module whose output does not (a position embedding shared across the batch) is left out
    with an :class:`~kronfac.UncoveredParameterWarning` when every module is selected, and is
    an error when it was selected by name or with ``strict``.

    Raises:
        ValueError: Empty data, a batch that is not a pair, shapes that do not fit the loss or
            the batch's ``N``, a selected module never called or not batch-first (when
            ``modules`` was given, or ``strict``), no covered module left, counts that disagree
            with the setup's ``num_data`` / ``num_per_example_loss_terms``, or an output
            modified in place.
        TypeError: Targets of the wrong dtype, a model output that is not a Tensor, or a
            covered module called on inputs of another floating dtype than its weight.
        NonFiniteError: NaN / Inf in a covered module's output (named, with the batch).
    """
    group = group_of(setup.options.process_group)
    if group is None:
        return _local_pass(setup, model, data, consume, desc, per_term, check=True)
    error: BaseException | None = None
    try:
        local = _local_pass(setup, model, data, consume, desc, per_term, check=False)
    except Exception as err:  # every rank must learn of it before the next collective
        error = err
    agree(group, error, "The pass over the data")
    result = local.all_reduce(group).check(setup.options)
    if reduce is not None:
        reduce(group)
    return result


def _local_pass(
    setup: PassSetup,
    model: nn.Module,
    data: Iterable[Any],
    consume: Callable[[BatchRows], None],
    desc: str,
    per_term: bool,
    check: bool,
) -> PassResult:
    """:func:`run_pass` over this process's ``data``; ``check``: the counts against the options."""
    backward = setup.options.fisher != "forward-only"
    tally = PassTally(setup)
    batches = tqdm(
        data,
        total=len(data) if isinstance(data, Sized) else None,
        disable=not setup.options.progress,
        desc=desc,
        unit="batch",
    )
    with record_calls(setup.adapters, setup.tied) as calls:
        for b, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"Batch {b}: expected a pair (X, y), got {type(batch).__name__}.")
            X, y = batch
            for c in calls.values():
                c.clear()
            n, source = batch_size(X, y, setup.options.batch_size_fn, b)
            with torch.set_grad_enabled(backward):
                output = _run_forward(model, X, setup.options.forward, b)
            read = tally.read(b, X, y, output, n, source)
            rows = tally.rows(read, calls)
            if backward:
                rows.grads = tally.gradients(read, rows, calls, per_term)
            consume(rows)
            del output, read, rows
    return tally.result(check)


@dataclass
class BatchInfo:
    """One batch as :meth:`PassTally.read` read it: its output, targets and term layout."""

    index: int
    n: int
    source: str  # where n was read, for error messages
    output: Tensor
    y: Tensor
    terms_per_point: int
    term_mask: Tensor | None  # [n·R] terms the loss counts (None: all)
    padding: Tensor | None  # [n, T] attention mask (None: no padding)
    dtype: torch.dtype  # the accumulation dtype


class PassTally:
    """Reads batches into :class:`BatchRows` and counts across them what a pass counts.

    ``N``, the loss terms and their size, the modules called and those left out because their
    output is not batch-first, the MC generator, and the first batch's checksums. Fed by
    :func:`run_pass`; :meth:`result` checks the counts against the options at the end.

    Args:
        setup: The pass's options and modules.
        fingerprint: Whether to take the first batch's checksums (three reductions; a
            training loop, which compares no passes, does without).
        fast_sampling: Draw MC labels with the likelihood's ``sample_fast`` (the same
            distribution, other labels per seed than :func:`kronfac.compute_factors` and
            curvlinops draw; a training loop's choice).
    """

    def __init__(
        self, setup: PassSetup, fingerprint: bool = True, fast_sampling: bool = False
    ) -> None:
        self.setup, self._fingerprint = setup, fingerprint
        self._fast_sampling = fast_sampling
        self.total = self.terms = self.R = 0
        self.C: int | None = None
        self.called = dict.fromkeys(setup.adapters, 0)
        self.not_batch_first: dict[str, str] = {}  # module → its output's shape and the N
        self.fingerprint: tuple[float, float, float] | None = None
        self.generator: torch.Generator | None = None

    def read(self, b: int, X: Any, y: Tensor, output: Tensor, n: int, source: str) -> BatchInfo:
        """Check the model output against the loss and count its terms.

        Raises:
            ValueError: Shapes that do not fit the loss or the batch's ``N``, or terms of a
                size other than the earlier batches'.
        """
        likelihood = self.setup.likelihood
        likelihood.check(output, y)
        R = _terms_per_data_point(likelihood, output, y, n, source, b)
        C = likelihood.num_classes(output)
        if self.C is not None and C != self.C:
            raise ValueError(
                f"Batch {b}: loss terms of size {C}, earlier batches had size {self.C}."
            )
        self.R, self.C = max(self.R, R), C
        if b == 0 and self._fingerprint:
            self.fingerprint = (_checksum(X), _checksum(output), _checksum(output.abs()))
        padding = _attention_mask(X, n, b)
        term_mask = likelihood.term_mask(y, output)
        if padding is not None and padding.shape[1] == R:  # one loss term per token
            pad_terms = padding.reshape(-1).to(output.device)
            term_mask = pad_terms if term_mask is None else term_mask & pad_terms
        self.terms += n * R if term_mask is None else int(term_mask.sum())
        self.total += n
        dtype = torch.float64 if output.dtype == torch.float64 else torch.float32
        return BatchInfo(b, n, source, output, y, R, term_mask, padding, dtype)

    def rows(self, batch: BatchInfo, calls: Mapping[str, list[Call]]) -> BatchRows:
        """The batch's inputs and position masks of every batch-first covered module."""
        adapters = _batch_first(
            self.setup, calls, batch.n, batch.source, batch.index, self.not_batch_first, self.called
        )
        masks = _position_masks(adapters, calls, batch.padding, batch.n, batch.dtype)
        inputs = _input_rows(adapters, calls, batch.n, batch.dtype, batch.index, masks)
        return BatchRows(batch.index, batch.n, batch.dtype, inputs, masks)

    def gradients(
        self,
        batch: BatchInfo,
        rows: BatchRows,
        calls: Mapping[str, list[Call]],
        per_term: bool,
        retain_graph: bool = False,
    ) -> dict[str, Tensor]:
        """Backpropagate the Fisher type's vectors to the modules of ``rows``.

        ``retain_graph=True`` keeps the graph for the training loop's own backward pass.

        Raises:
            ValueError: A model output outside the autograd graph, or per-term vectors that
                would not fit in memory.
            NonFiniteError: NaN / Inf in a covered module's output.
        """
        options, output = self.setup.options, batch.output
        adapters = {k: self.setup.adapters[k] for k in rows.masks}
        _check_finite_output(output, adapters, calls, batch.index)
        if not output.requires_grad:
            raise ValueError(
                f"Batch {batch.index}: the model output does not require grad; the covered "
                "modules' outputs must be part of the autograd graph."
            )
        if options.fisher == "mc" and self.generator is None:
            seed = options.seed + rank_of(group_of(options.process_group))  # ranks: other labels
            self.generator = torch.Generator(device=output.device).manual_seed(seed)
        vectors = _backprop_vectors(
            self.setup.likelihood,
            options.fisher,
            output,
            batch.y,
            batch.n,
            options.mc_samples,
            self.generator,
            batch.dtype,
            per_term,
            batch.term_mask,
            self._fast_sampling,
        )
        return _grad_rows(
            adapters,
            calls,
            output,
            vectors,
            batch.n,
            batch.dtype,
            batch.index,
            rows.masks,
            retain_graph,
        )

    def result(self, check: bool = True) -> PassResult:
        """What the pass counted, checked against the options (:meth:`PassResult.check`).

        ``check=False`` leaves the counts unchecked (a shard's, to be summed over ranks first).

        Raises:
            ValueError: Empty data, selected modules never called (see :func:`_left_out`), and
                with ``check`` what :meth:`PassResult.check` raises.
        """
        if self.total == 0:
            raise ValueError("data is empty: expected at least one batch (X, y) with data points.")
        assert self.C is not None and self.fingerprint is not None
        left_out = _left_out(self.setup, self.called, self.not_batch_first)
        result = PassResult(self.total, self.R, self.C, self.terms, left_out, self.fingerprint)
        return result.check(self.setup.options) if check else result


def batch_size(X: Any, y: Any, batch_size_fn: BatchSizeFn | None, b: int = 0) -> tuple[int, str]:
    """``N``, the number of data points of batch ``(X, y)``, and where it was read.

    ``batch_size_fn(X)`` when given; otherwise the first dimension of ``X``, or of a Mapping's
    ``input_ids``, ``attention_mask`` or first tensor value; the targets' first dimension when
    ``X`` holds no tensor.

    Raises:
        TypeError: Targets that are not a Tensor, or a ``batch_size_fn`` that does not return
            an integer.
        ValueError: Scalar targets, or a batch without data points.
    """
    if not isinstance(y, Tensor):
        raise TypeError(
            f"Batch {b}: expected targets y to be a torch.Tensor, got {type(y).__name__}."
        )
    if y.ndim == 0:
        raise ValueError(f"Batch {b}: expected batched targets [N, ...], got a scalar.")
    if batch_size_fn is not None:
        n, source = batch_size_fn(X), "batch_size_fn(X)"
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(
                f"Batch {b}: batch_size_fn(X) must return an int, got {type(n).__name__}."
            )
    elif isinstance(X, Tensor) and X.ndim > 0:
        n, source = X.shape[0], f"the first dimension of X {tuple(X.shape)}"
    else:
        key = None
        if isinstance(X, Mapping):
            tensors = [k for k, v in X.items() if isinstance(v, Tensor) and v.ndim > 0]
            preferred = [k for k in ("input_ids", "attention_mask") if k in tensors]
            key = (preferred or tensors or [None])[0]
        if key is None:
            n, source = y.shape[0], f"the first dimension of the targets {tuple(y.shape)}"
        else:
            n, source = X[key].shape[0], f"the first dimension of X[{key!r}] {tuple(X[key].shape)}"
    if n < 1:
        raise ValueError(f"Batch {b} holds no data points ({source} is {n}).")
    return n, source


def _terms_per_data_point(
    likelihood: Likelihood, output: Tensor, y: Tensor, n: int, source: str, b: int
) -> int:
    """``R = M / N``: the loss's terms per data point (outputs ``[N, ...]`` or ``[N·R, ...]``).

    Raises:
        ValueError: If the ``M`` terms do not split into ``N`` data points.
    """
    M = likelihood.num_terms(output)
    if n > M or M % n:
        raise ValueError(
            f"Batch {b}: the loss has {M} terms (model output {tuple(output.shape)}, targets "
            f"{tuple(y.shape)}), which do not split into the N = {n} data points read from "
            f"{source}. Return the outputs with the data points first (e.g. logits [N, V, T] "
            "with targets [N, T]) or flattened data point by data point ([N·T, V] with "
            "targets [N·T]), or pass batch_size_fn=lambda X: ... returning N."
        )
    return M // n


def _batch_first(
    setup: PassSetup,
    calls: Mapping[str, list[Call]],
    n: int,
    source: str,
    b: int,
    not_batch_first: dict[str, str],
    called: dict[str, int],
) -> dict[str, LayerAdapter]:
    """The modules whose every call of this batch has the ``N`` data points first.

    A module with an output of another leading size (GPT-2's position embedding returns
    ``[1, T, d]``, shared across the batch) has no per-example gradients: it is recorded in
    ``not_batch_first`` and left out from then on (an error when it was selected on purpose).
    ``called`` counts every module's calls.

    Raises:
        ValueError: For such a module selected by name or with ``strict``, or when no module
            that was called is left.
    """
    for name in setup.adapters:
        called[name] += len(calls[name])
        if name in not_batch_first:
            continue
        for c in calls[name]:
            if c.output.ndim == 0 or c.output.shape[0] != n:
                shape = tuple(c.output.shape)
                if setup.options.strict or not setup.options.select_all:
                    raise ValueError(
                        f"Batch {b}: module {name!r} returned shape {shape}, whose first "
                        f"dimension is not the batch's N = {n} data points (read from "
                        f"{source}). A module whose output is shared across the batch (e.g. "
                        "GPT-2's position embedding) has no per-example gradients: leave it "
                        f"out with exclude=[{name!r}]. If N is wrong, pass batch_size_fn=."
                    )
                not_batch_first[name] = f"{name!r}: {shape} for N = {n}"
                break
    adapters = {k: a for k, a in setup.adapters.items() if k not in not_batch_first}
    if not_batch_first and not any(called[k] for k in adapters):
        raise ValueError(
            f"Batch {b}: no covered module's output has the batch's N = {n} data points (read "
            f"from {source}) first: {'; '.join(not_batch_first.values())}. Feed batch-first "
            "inputs and return the outputs with the data points first (e.g. logits [N, V, T] "
            "with targets [N, T]), or pass batch_size_fn=lambda X: ... returning N."
        )
    return adapters


def _left_out(
    setup: PassSetup, called: Mapping[str, int], not_batch_first: Mapping[str, str]
) -> tuple[str, ...]:
    """The selected modules left out of the factors: never called, or not batch-first.

    Raises:
        ValueError: A module never called that was selected by name or with ``strict``, or
            no covered module at all.

    Warns:
        UncoveredParameterWarning: Naming the modules left out when every module was selected.
    """
    uncalled = tuple(name for name, count in called.items() if count == 0)
    why = "(e.g. nn.MultiheadAttention's out_proj, applied through its weight)"
    if uncalled and (setup.options.strict or not setup.options.select_all):
        raise ValueError(
            f"Module(s) {', '.join(map(repr, uncalled))} were never called in the forward pass "
            f"{why}; leave them out with exclude={list(uncalled)!r}."
        )
    left_out = (*uncalled, *not_batch_first)
    if len(left_out) == len(setup.adapters):
        raise ValueError(
            "No covered module was called in the forward pass; the selected modules "
            f"({', '.join(map(repr, setup.adapters))}) must be called as modules."
        )
    if uncalled:
        warn(
            f"Module(s) {', '.join(map(repr, uncalled))} were never called in the forward pass "
            f"{why}: their parameters are left out of the curvature. Leave them out with "
            f"exclude={list(uncalled)!r} to silence this.",
            UncoveredParameterWarning,
        )
    if not_batch_first:
        warn(
            f"Module(s) {', '.join(map(repr, not_batch_first))} returned outputs without the "
            f"batch's data points first ({'; '.join(not_batch_first.values())}), e.g. a "
            "position embedding shared across the batch: they have no per-example gradients "
            "and their parameters are left out of the curvature. Leave them out with "
            f"exclude={list(not_batch_first)!r} to silence this.",
            UncoveredParameterWarning,
        )
    return left_out


def _checksum(x: Any) -> float:
    """``Σ`` of every tensor in ``x`` (a Tensor, Mapping or sequence), in float64."""
    if isinstance(x, Tensor):
        return float(x.detach().sum(dtype=torch.float64)) if x.numel() else 0.0
    if isinstance(x, Mapping):
        return sum(_checksum(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_checksum(v) for v in x)
    return 0.0


def _attention_mask(X: Any, n: int, b: int) -> Tensor | None:
    """The batch's padding mask ``[n, T]`` (``X["attention_mask"]`` of a Mapping), or ``None``."""
    if not isinstance(X, Mapping) or X.get("attention_mask") is None:
        return None
    mask = X["attention_mask"]
    if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.shape[0] != n:
        raise ValueError(
            f"Batch {b}: expected attention_mask of shape [{n}, T], got "
            f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}."
        )
    return None if bool(mask.bool().all()) else mask.bool()


def _position_masks(
    adapters: Mapping[str, LayerAdapter],
    calls: Mapping[str, list[Call]],
    padding: Tensor | None,
    n: int,
    dtype: torch.dtype,
) -> dict[str, Tensor | None]:
    """Per module ``[n, T]`` position weights; ``None`` without padding.

    The padding mask applies to every call with one position per token (``T_call = T``);
    calls with another number of positions (a per-example layer after pooling) count fully.
    """
    masks: dict[str, Tensor | None] = {}
    for name in adapters:
        if padding is None or not calls[name]:
            masks[name] = None
            continue
        parts = []
        for c in calls[name]:
            width = c.adapter.out_features * c.adapter.groups
            T = c.output.numel() // (n * width)
            on = padding.to(device=c.output.device, dtype=dtype)
            parts.append(on if padding.shape[1] == T else on.new_ones(n, T))
        masks[name] = _cat_calls(parts, dim=1)
    return masks


def _input_rows(
    adapters: Mapping[str, LayerAdapter],
    calls: Mapping[str, list[Call]],
    n: int,
    dtype: torch.dtype,
    b: int,
    masks: Mapping[str, Tensor | None],
) -> dict[str, Tensor]:
    """Every called module's inputs ``[n, T, d_in]``; identical inputs share one object.

    Inputs of a diagonal-input layer (embeddings) stay token indices ``[n, T, 1]``.
    """
    cache: dict[tuple[Any, ...], Tensor] = {}
    rows = {}
    for name in adapters:
        if not calls[name]:
            continue
        key = tuple(
            (c.inputs.data_ptr(), c.inputs.shape, c.inputs.stride(), c.adapter.rows_key())
            for c in calls[name]
        )
        if key not in cache:
            parts = []
            for c in calls[name]:
                part = per_example(c.adapter.input_rows(c.inputs), n, name, "input", b, 0)
                # an adapter may reuse its buffer at its next call: keep earlier calls' rows
                parts.append(part if len(calls[name]) == 1 else part.clone())
            x = _cat_calls(parts, dim=1)
            if not adapters[name].diagonal_input:
                x = x.to(dtype)
                mask = masks[name]
                if mask is not None:
                    x = x * mask[..., None]
            cache[key] = x
        rows[name] = cache[key]
    return rows


def _grad_rows(
    adapters: Mapping[str, LayerAdapter],
    calls: Mapping[str, list[Call]],
    output: Tensor,
    vectors: Tensor,
    n: int,
    dtype: torch.dtype,
    b: int,
    masks: Mapping[str, Tensor | None],
    retain_graph: bool = False,
) -> dict[str, Tensor]:
    """Backpropagate ``vectors`` to every call's output: ``[K, n, T, d_out]`` per module."""
    flat = [(name, c) for name in adapters for c in calls[name]]
    check_outputs_unchanged(flat, b)
    grads = _output_gradients(output, [c for _, c in flat], vectors, retain_graph)
    return grad_rows(flat, grads, n, dtype, b, masks)


def check_outputs_unchanged(flat: Iterable[tuple[str, Call]], b: int) -> None:
    """Refuse module outputs changed in place after their call (their gradient is lost).

    Raises:
        ValueError: Naming the module (e.g. followed by ``ReLU(inplace=True)``).
    """
    for name, c in flat:
        if c.output._version != c.output_version:
            raise ValueError(
                f"Batch {b}: the output of module {name!r} was modified in place after it was "
                "computed (e.g. by ReLU(inplace=True)); its gradient cannot be recovered. "
                "Use an out-of-place operation after this module."
            )


def grad_rows(
    flat: Iterable[tuple[str, Call]],
    grads: Iterable[Tensor | None],
    n: int,
    dtype: torch.dtype,
    b: int,
    masks: Mapping[str, Tensor | None],
) -> dict[str, Tensor]:
    """Per module ``[K, n, T, d_out]`` rows of the gradients ``[K, *output.shape]`` of its calls.

    The calls of one module are joined along the positions, padded positions zeroed; a module
    whose every gradient is ``None`` (its output did not reach the loss) is absent.
    """
    per_module: dict[str, list[Tensor]] = {}
    for (name, c), g in zip(flat, grads, strict=True):
        if g is not None:
            rows = c.adapter.output_grad_rows(g)
            per_module.setdefault(name, []).append(per_example(rows, n, name, "output", b, 1))
    out = {}
    for name, gs in per_module.items():
        g = _cat_calls(gs, dim=2).to(dtype)
        mask = masks[name]
        out[name] = g if mask is None else g * mask[None, ..., None]
    return out


def per_example(rows: Tensor, n: int, name: str, what: str, b: int, lead: int) -> Tensor:
    """``[*lead, rows, d]`` → ``[*lead, n, T, d]``, checking the rows split into ``n`` points.

    An adapter may also return ``[*lead, n, T, d]`` directly (``lead`` leading dimensions
    before), e.g. a transposed view of channels-first patches that must not be copied.
    """
    if rows.ndim == lead + 3:
        if rows.shape[lead] != n:
            raise ValueError(
                f"Batch {b}: module {name!r} {what} has {rows.shape[lead]} data points, "
                f"expected {n}."
            )
        return rows
    if rows.shape[-2] % n:
        raise ValueError(
            f"Batch {b}: module {name!r} {what} has {rows.shape[-2]} rows, not a multiple of the "
            f"batch size {n}."
        )
    return rows.reshape(*rows.shape[:-2], n, rows.shape[-2] // n, rows.shape[-1])


def _cat_calls(parts: list[Tensor], dim: int) -> Tensor:
    """Concatenate the per-call pieces along the position dimension (no copy for one call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _check_finite_output(
    output: Tensor,
    adapters: Mapping[str, LayerAdapter],
    calls: Mapping[str, list[Call]],
    b: int,
) -> None:
    """Raise :class:`NonFiniteError` before sampling or backpropagating a non-finite output.

    Names the covered module (in call order) whose output first turned non-finite, if any.
    """
    if bool(torch.isfinite(output).all()):
        return
    bad = [
        (c.order, name)
        for name in adapters
        for c in calls[name]
        if not bool(torch.isfinite(c.output).all())
    ]
    first = min(bad, default=None)
    where = "the model output" if first is None else f"the output of module {first[1]!r}"
    raise NonFiniteError(f"Non-finite values (NaN or Inf) in {where} at batch {b}.")
