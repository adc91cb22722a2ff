r"""K-FAC / EKFAC preconditioning of a training loop's gradients, on the factor engine.

The preconditioner watches the training loop: hooks record the covered modules' inputs and
outputs during the model's forward pass, and the loss module's call ``loss_fn(output, y)``
hands it the model output and the targets. Each batch then goes through the same steps as a
pass of :func:`kronfac.compute_factors` (:class:`~kronfac.factors.data_pass.PassTally`: the
number of data points ``N`` from the input, the loss terms, padding masks and
``ignore_index``; :class:`~kronfac.factors.engine.FactorAccumulator`: the factor sums), so a
step's factors follow the scale of :func:`kronfac.compute_factors` (docs/conventions.md):

.. math::

    \hat A = \frac{1}{N} \sum_n \frac{1}{T} \sum_t a_{n,t} a_{n,t}^\top, \qquad
    \hat S = \frac{1}{D} \sum_{n,t,k} g_{n,t,k} g_{n,t,k}^\top,

``g`` the output gradients of the **summed** loss and ``D`` the number of entries torch's mean
averages over (``1`` for ``reduction="sum"``), over every batch of the step (several with
gradient accumulation). The gradients ``g`` are

- ``fisher="mc"`` (and ``"type-2"``): backpropagated by the preconditioner itself from labels
  sampled from the model (the Hessian's square root), at the loss call, to the covered
  modules' outputs only (the graph is kept for the training backward pass). The labels come
  from the likelihood's ``sample_fast`` (cross-entropy: by the inverse CDF), the distribution
  :func:`kronfac.compute_factors` samples, with other labels per seed;
- ``fisher="empirical"``: those the training backward pass leaves at the outputs. They carry
  the loss's own scale: for a mean over ``D'`` entries (``D'`` counts the entries the loss
  averaged, ``ignore_index`` excluded, padding included) ``g = g_sum / D'``, so the step uses
  ``Ŝ = D'²/D · Σ g gᵀ``, which is the formula above whenever the padded positions are
  ignored by the loss (or there is no padding). A loss the training loop scales further (the
  ``1/M`` of gradient accumulation over ``M`` equal micro-batches) is read as one mean over
  the step's batches; a ``torch.amp.GradScaler``'s scale is divided out.

Running estimates (every ``factor_every`` steps; the first update initialises):
``A ← ε A + (1 − ε) Â``, ``S ← ε S + (1 − ε) Ŝ`` (``ε = factor_decay``; for a low-rank side,
the EMA of its one-pass sketch, which is linear). Every ``inverse_every`` steps the factors are
decomposed (eigendecompositions, or Cholesky inverses of the damped factors), and every step
the gradient ``V = ∇W`` of each covered module (``[p, q]``, the bias a last column with
``bias="joint"``) becomes the product of the damped inverse of its Kronecker block
(:class:`~kronfac.linalg.KroneckerBlock`):

- ``damping_mode="pi"`` (Martens & Grosse, 2015, §6.3): ``(S + δ_S I)⁻¹ V (A + δ_A I)⁻¹``
  with ``δ_A = π√δ``, ``δ_S = √δ/π``, ``π = √((tr A / q) / (tr S / p))`` (each at least
  ``min_damping``; the factors as last decomposed);
- ``damping_mode="tikhonov"``: ``(S ⊗ A + δI)⁻¹ vec V``;
- ``ekfac=True`` (George et al., 2018): ``Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + δ)] Q_Aᵀ`` with ``Λ`` a
  running estimate of the per-example gradients' second moments in the eigenbasis
  (:class:`~kronfac.factors.ekfac.CorrectionSums`, the scale of ``Ŝ``), updated every
  ``scale_every`` steps and reset to ``s aᵀ`` whenever the basis is refreshed.

A separate bias (``bias="separate"``) gets ``(S + δ_S I)⁻¹`` alone. With a learning rate ``η``
the update is scaled by KL clipping (Ba et al., 2017): ``ν = min(1, √(κ / |Σ η² ⟨v, ∇⟩|))``
over every covered parameter (``v`` the preconditioned gradient, ``κ = kl_clip``).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.distributed import all_reduce_counts, group_of, rank_of
from kronfac.errors import NonFiniteError, UncoveredParameterWarning, warn
from kronfac.factors import EigenCorrection, FactorPair, KroneckerFactors
from kronfac.factors.data_pass import (
    BatchInfo,
    BatchRows,
    PassSetup,
    PassTally,
    batch_size,
    check_outputs_unchanged,
    grad_rows,
)
from kronfac.factors.ekfac import CorrectionSums
from kronfac.factors.engine import FactorAccumulator
from kronfac.factors.hooks import Call, install_call_hooks
from kronfac.factors.options import FactorOptions
from kronfac.layers import LayerAdapter, Slot
from kronfac.linalg import (
    Block,
    DenseFactor,
    EigenBlock,
    Factor,
    IdentityFactor,
    KroneckerBlock,
    LowRankFactor,
    ShiftedLowRankFactor,
    StreamingLowRank,
    as_factor,
)
from kronfac.optim.quadratic import RecordedBatch, rng_state

__all__ = ["KFACPreconditioner"]

Schedule = float | Callable[[int], float]

_DAMPING_MODES = ("pi", "tikhonov")
_INVERSE_METHODS = ("eigen", "cholesky")
# options of compute_factors that have no meaning in a training loop
_PASS_ONLY = ("forward", "num_data", "num_per_example_loss_terms", "progress")


@dataclass
class _Layer:
    """One covered module: its parameters and the running state.

    ``A`` / ``S`` hold the running factors: a dense ``[(g,) d, d]`` or diagonal tensor, or, for
    a low-rank side, its sketch ``Y = C Ω`` (``sketched`` says which); ``None`` is the identity
    (``S`` of ``fisher="forward-only"``) or no statistics yet.
    """

    name: str
    adapter: LayerAdapter
    weight: nn.Parameter
    bias: nn.Parameter | None
    joint: bool
    slots: tuple[Slot, ...]
    A: Tensor | None = None
    S: Tensor | None = None
    sketched: tuple[bool, bool] = (False, False)
    # per slot: (S, A) factors in eigen form (eigen method) or their damped inverses (cholesky)
    decomposed: list[tuple[Factor, Factor | None]] | None = None
    scales: list[Tensor] | None = None  # EKFAC's Λ per slot [g, k_S, k_A] (or [g, k_S])
    complements: list[Tensor] | None = None  # EKFAC's complement eigenvalue per slot
    cache: tuple[float, list[Block]] | None = None  # (damping, the damped inverse's blocks)


@dataclass
class _Step:
    """What one step records: the factor sums, the rows for EKFAC's scales and the counts."""

    tally: PassTally
    sums: FactorAccumulator | None
    scale_rows: list[BatchRows] | None  # kept until the step's basis is known
    loss_entries: int = 0  # D': the entries the training loss averaged (empirical scale)
    pending: list[tuple[BatchRows, list[tuple[str, Call]], list[Tensor | None]]] = field(
        default_factory=list
    )  # empirical: rows waiting for the training backward pass's gradients
    failed: str | None = None  # a NaN / Inf met while recording
    # model outputs already read (weak references: a new output may reuse a freed one's id)
    observed: list[weakref.ReferenceType[Tensor]] = field(default_factory=list)


def _check_schedule(name: str, value: Any, positive: bool) -> None:
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number or a callable of the step, got {value!r}.")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'positive' if positive else '>= 0'}, got {value!r}.")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {list(choices)}.")


def _loop_options(model: nn.Module, options: FactorOptions, ekfac: bool) -> FactorOptions:
    """``options``, if a training loop can run with them on ``model``.

    Raises:
        NotImplementedError: For a model with sharded parameters (FSDP).
        ValueError: EKFAC with ``fisher="forward-only"``.
    """
    sharded = type(model).__name__ == "FullyShardedDataParallel" or any(
        type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"
        for p in model.parameters()
    )
    if sharded:
        raise NotImplementedError(
            "The K-FAC optimizer needs the whole model on every rank: sharded parameters "
            "(FSDP, DTensor) are not supported. Replicate the model (plain, or wrapped in "
            "DistributedDataParallel)."
        )
    if ekfac and options.fisher == "forward-only":
        raise ValueError("EKFAC needs output gradients: fisher='forward-only' has none.")
    return options


class KFACPreconditioner:
    r"""Replaces the gradients of the covered layers by K-FAC / EKFAC natural gradients.

    Give it the model and the loss module the training loop calls; :meth:`step` turns the
    recorded batches into running factors and overwrites each covered parameter's ``.grad``
    by its preconditioned gradient (formulas in the module docstring). Any torch optimizer
    then applies it::

        loss_fn = nn.CrossEntropyLoss()
        precond = KFACPreconditioner(model, loss_fn=loss_fn, lr=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for X, y in loader:
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            precond.step()
            opt.step()

    ``fisher="mc"`` needs nothing more: the labels are drawn at the loss call. Gradient
    accumulation: call backward several times (each on a loss divided by the number of
    micro-batches, as usual) before :meth:`step`. With a ``torch.amp.GradScaler``, pass it as
    ``grad_scaler`` and call ``scaler.unscale_(opt)`` before :meth:`step`. A loop that computes
    its loss otherwise calls :meth:`observe` with the model output and the targets.

    Args:
        model: The model; its supported layers with a trainable weight are covered (or those
            ``modules`` / ``exclude`` select), grouped convolutions and embeddings included.
        loss_fn: The loss module the training loop calls on the model's output
            (``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss``).
        damping: ``δ`` (>= 0), or a callable ``step -> δ``, in the units of the curvature.
        factor_decay: ``ε`` in ``[0, 1)``.
        factor_every: Update the running factors every this many steps.
        inverse_every: Decompose them every this many steps.
        kl_clip: ``κ`` of KL clipping (applied when ``lr`` is given); ``None`` disables it.
        lr: The learning rate (a number or callable ``step -> η``), used by KL clipping only.
        ekfac: Precondition in EKFAC's eigenbasis with running eigenvalue scales.
        scale_every: With ``ekfac``, update the scales every this many steps.
        damping_mode: ``"pi"`` (π-adjusted factored damping) or ``"tikhonov"``; EKFAC always
            adds ``δ`` to its scales.
        inverse_method: ``"eigen"`` or ``"cholesky"`` (``"pi"`` damping only, K-FAC only; the
            damping is that of the decomposition step).
        min_damping: Lower bound of ``δ_A`` and ``δ_S`` under π-damping.
        grad_scaler: The ``torch.amp.GradScaler`` scaling the backward pass, if any.
        fisher: ``"empirical"`` (the training gradients), ``"mc"`` (sampled labels),
            ``"type-2"`` or ``"forward-only"`` (``S = I``).
        seed: Seed of the generator drawing the labels of ``fisher="mc"`` (the likelihood's
            ``sample_fast``: other labels than :func:`kronfac.compute_factors` draws for it).
        **factor_options: The engine's options (:class:`~kronfac.factors.FactorOptions`):
            ``modules``, ``exclude``, ``bias``, ``approx``, ``mc_samples``, ``rank``,
            ``rank_threshold``, ``oversample``, ``batch_size_fn``, ``strict``.

    Raises:
        ValueError: Out-of-range or unknown options, or a model without a covered layer.
        TypeError: An option of a pass over data (``forward``, ``num_data``, ...), or a
            ``loss_fn`` that is not a supported loss module.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_fn: nn.Module,
        damping: Schedule = 1e-3,
        factor_decay: float = 0.95,
        factor_every: int = 1,
        inverse_every: int = 10,
        kl_clip: float | None = 1e-3,
        lr: Schedule | None = None,
        ekfac: bool = False,
        scale_every: int = 1,
        damping_mode: str = "pi",
        inverse_method: str = "eigen",
        min_damping: float = 1e-8,
        grad_scaler: Any = None,
        fisher: str = "empirical",
        seed: int = 0,
        **factor_options: Any,
    ) -> None:
        _check_schedule("damping", damping, positive=False)
        if lr is not None:
            _check_schedule("lr", lr, positive=True)
        if (
            isinstance(factor_decay, bool)
            or not isinstance(factor_decay, (int, float))
            or not 0 <= factor_decay < 1
        ):
            raise ValueError(f"factor_decay must be in [0, 1), got {factor_decay!r}.")
        for name, value in (
            ("factor_every", factor_every),
            ("inverse_every", inverse_every),
            ("scale_every", scale_every),
        ):
            _check_int(name, value)
        if kl_clip is not None:
            _check_schedule("kl_clip", kl_clip, positive=True)
            if callable(kl_clip):
                raise ValueError("kl_clip must be a positive number or None.")
        if callable(min_damping):
            raise ValueError("min_damping must be a number >= 0.")
        _check_schedule("min_damping", min_damping, positive=False)
        _check_choice("damping_mode", damping_mode, _DAMPING_MODES)
        _check_choice("inverse_method", inverse_method, _INVERSE_METHODS)
        if inverse_method == "cholesky" and (ekfac or damping_mode == "tikhonov"):
            raise ValueError(
                "inverse_method='cholesky' supports K-FAC with damping_mode='pi' only; EKFAC and "
                "Tikhonov damping need inverse_method='eigen'."
            )
        passed = sorted(set(factor_options) & set(_PASS_ONLY))
        if passed:
            raise TypeError(
                f"{', '.join(passed)}: options of a pass over data, not of a training loop "
                "(the loop's own forward pass and loss are recorded)."
            )
        options = FactorOptions.of(factor_options, fisher=fisher, seed=seed)
        options = _loop_options(model, options, ekfac)
        self.damping, self.lr, self.kl_clip = damping, lr, kl_clip
        self.factor_decay = float(factor_decay)
        self.factor_every, self.inverse_every = factor_every, inverse_every
        self.scale_every = scale_every
        self.ekfac, self.damping_mode = bool(ekfac), damping_mode
        self.inverse_method, self.min_damping = inverse_method, float(min_damping)
        self.grad_scaler = grad_scaler
        self.steps = 0
        with warnings.catch_warnings():  # uncovered parameters get the plain update
            warnings.simplefilter("ignore", UncoveredParameterWarning)
            self.setup = PassSetup.create(model, loss_fn, options)
        self.loss_fn = loss_fn
        self.group = group_of(options.process_group)  # torch.distributed: statistics summed
        self._layers = self._covered(model)
        self._generator: torch.Generator | None = None  # on the outputs' device, at first use
        self._sums = FactorAccumulator(self.setup)  # the factor steps' sums (buffers reused)
        self._calls: dict[str, list[Call]] = {name: [] for name in self.setup.adapters}
        self._inputs: Any = None  # the model's latest input (the batch's N, padding)
        self._call: tuple[tuple[Any, ...], dict[str, Any], Any] | None = None  # args, kwargs, RNG
        # with keep_batches, every batch of the step (the adaptive step re-runs them)
        self.keep_batches = False
        self.batches: list[RecordedBatch] = []
        self._kept: list[weakref.ReferenceType[Tensor]] = []  # the outputs kept this step
        self._quiet = False
        self._step: _Step | None = None
        self._recorded = False
        self._model_outputs: set[Any] = set()  # autograd nodes of the latest forward's outputs
        self._handles = [
            model.register_forward_pre_hook(self._record_input, with_kwargs=True),
            model.register_forward_hook(self._record_output),
            loss_fn.register_forward_hook(self._record_loss, with_kwargs=True),
            *install_call_hooks(
                self._calls, self.setup.adapters, self.setup.tied, active=self._records_now
            ),
        ]

    # -- setup ------------------------------------------------------------------------------
    def _covered(self, model: nn.Module) -> dict[str, _Layer]:
        params = dict(model.named_parameters())
        layers = {}
        for name, adapter in self.setup.adapters.items():
            names = self.setup.param_names[name]
            weight = params[names.weight]
            bias = None if names.bias is None else params[names.bias]
            nw = weight.numel()
            b_slice = None if bias is None else slice(nw, nw + bias.numel())
            joint = self.setup.joint_bias(name)
            slots = adapter.slots(slice(0, nw), b_slice, joint)
            layers[name] = _Layer(name, adapter, weight, bias, joint, slots)
        return layers

    @property
    def fisher(self) -> str:
        """The Fisher type of the statistics."""
        return self.setup.options.fisher

    @property
    def modules(self) -> list[str]:
        """Names of the covered modules."""
        return list(self._layers)

    def parameters(self) -> list[nn.Parameter]:
        """The covered parameters (weights and biases of the covered modules)."""
        return [
            p
            for layer in self._layers.values()
            for p in (layer.weight, layer.bias)
            if p is not None
        ]

    def remove(self) -> None:
        """Remove the hooks (the preconditioner records nothing afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- recording --------------------------------------------------------------------------
    def _records_now(self) -> bool:
        """Whether this step's passes feed the factors or the EKFAC scales."""
        return (
            not self._quiet
            and torch.is_grad_enabled()
            and (self._factor_step() or self._scale_step())
        )

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Within the block, forward passes and loss calls are not recorded (extra passes)."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def _factor_step(self) -> bool:
        return self.steps % self.factor_every == 0

    def _scale_step(self) -> bool:
        return self.ekfac and self.steps % self.scale_every == 0

    def _record_input(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """A new forward pass: its input, and none of the previous pass's calls."""
        if self._quiet or not torch.is_grad_enabled():
            return
        if self.keep_batches:
            self._call = (args, kwargs, rng_state())
        if self._records_now():
            self._inputs = kwargs if kwargs and not args else args[0] if len(args) == 1 else args
            for calls in self._calls.values():
                calls.clear()

    def _record_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """The autograd nodes of the model's outputs (a Tensor, or a mapping / tuple of them)."""
        if self._quiet:
            return
        values = (
            output.values()
            if isinstance(output, dict)
            else (output if isinstance(output, (tuple, list)) else [output])
        )
        self._model_outputs = {
            v.grad_fn for v in values if isinstance(v, Tensor) and v.grad_fn is not None
        }

    def _from_model(self, output: Tensor, depth: int = 64) -> bool:
        """Whether ``output`` is computed from the latest forward's outputs (a graph search)."""
        frontier, seen = [output.grad_fn], 0
        while frontier and seen < depth:
            node = frontier.pop()
            if node is None:
                continue
            if node in self._model_outputs:
                return True
            seen += 1
            frontier.extend(f for f, _ in node.next_functions)
        return False

    def _record_loss(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], loss: Tensor
    ) -> None:
        values = [*args, *kwargs.values()]
        if len(values) >= 2 and isinstance(values[0], Tensor) and values[0].requires_grad:
            self.observe(values[0], values[1], loss)

    def observe(self, output: Tensor, targets: Tensor, loss: Tensor | None = None) -> None:
        """Record one batch: the model's ``output`` (from its latest forward pass) and targets.

        The loss module's call does this; a training loop that computes its loss otherwise
        calls it after the forward pass and before the backward pass. A batch is recorded once
        (a second call with the same output does nothing). For ``fisher="mc"`` / ``"type-2"``
        it backpropagates the sampled labels' (the Hessian root's) gradients to the covered
        modules' outputs now, keeping the graph for the training backward pass; no parameter
        ``.grad`` changes.

        ``loss`` (the loss's value on the batch) is kept with the batch when the adaptive step
        asks for the step's batches.

        Raises:
            ValueError: Shapes that do not fit the loss or the batch's data points.
            TypeError: Targets of the wrong dtype.
        """
        if self._quiet or not torch.is_grad_enabled() or not output.requires_grad:
            return
        if not self._from_model(output):
            return  # not an output of this model's latest forward pass
        if self.keep_batches:
            self._keep(output, targets, loss)
        if not self._records_now() or not any(self._calls.values()):
            return
        step = self._step or self._new_step()
        if _seen(step.observed, output):
            return
        step.observed.append(weakref.ref(output))
        b = len(step.observed) - 1
        n, source = batch_size(self._inputs, targets, self.setup.options.batch_size_fn, b)
        batch = step.tally.read(b, self._inputs, targets, output, n, source)
        try:
            rows = step.tally.rows(batch, self._calls)
            self._drop_not_batch_first(step)
            self._read_gradients(step, batch, rows, targets)
        except NonFiniteError as err:
            step.failed = str(err)
        finally:
            for calls in self._calls.values():
                calls.clear()
        self._recorded = True

    def discard(self) -> None:
        """Drop what this step recorded (a step that is not taken)."""
        self._step, self.batches = None, []
        self._kept.clear()

    def _keep(self, output: Tensor, targets: Tensor, loss: Tensor | None) -> None:
        """Keep the batch for the adaptive step (once per output)."""
        if self._call is None or _seen(self._kept, output):
            return
        self._kept.append(weakref.ref(output))
        likelihood = self.setup.likelihood
        likelihood.check(output, targets)
        keep = likelihood.term_mask(targets, output)
        terms = likelihood.num_terms(output) if keep is None else int(keep.sum())
        entries = likelihood.mean_divisor(terms, likelihood.num_classes(output))
        args, kwargs, rng = self._call
        if loss is None:
            with self.quiet(), torch.no_grad():
                loss = self.loss_fn(output, targets)
        value = float(loss.detach())
        self.batches.append(
            RecordedBatch(args, kwargs, output.detach(), targets, value, entries, keep, rng)
        )
        self._recorded = True

    def mc_backward(
        self, output: Tensor, loss_fn: nn.Module | None = None, targets: Tensor | None = None
    ) -> None:
        """:meth:`observe` for loops written for earlier versions (``fisher="mc"``).

        Nothing to do when the loss module already saw ``output`` (it records the batch).

        Raises:
            RuntimeError: If ``fisher`` is not ``"mc"``.
            ValueError: A ``loss_fn`` other than the preconditioner's, or no ``targets`` for an
                output the loss has not seen.
        """
        if self.fisher != "mc":
            raise RuntimeError("mc_backward is for fisher='mc'; this preconditioner is empirical.")
        if loss_fn is not None and loss_fn is not self.loss_fn:
            raise ValueError(
                "mc_backward got another loss_fn than the preconditioner's loss_fn; the labels "
                "are drawn from the loss given to the preconditioner."
            )
        step = self._step
        if step is not None and _seen(step.observed, output):
            return
        if targets is None:
            raise ValueError(
                "mc_backward needs the targets (ignore_index, shapes): pass targets=, or call "
                "the preconditioner's loss_fn(output, targets) first, which records the batch."
            )
        self.observe(output, targets)

    def _new_step(self) -> _Step:
        tally = PassTally(self.setup, fingerprint=False, fast_sampling=True)
        tally.generator = self._generator
        sums = None
        if self._factor_step():
            sums = self._sums
            sums.reset()
        self._step = _Step(tally, sums, [] if self._scale_step() else None)
        return self._step

    def _drop_not_batch_first(self, step: _Step) -> None:
        """Leave out (with a warning) modules whose output is not batch-first, once."""
        dropped = [n for n in step.tally.not_batch_first if n in self._layers]
        for name in dropped:
            del self._layers[name]
        if dropped:
            warn(
                f"Module(s) {', '.join(map(repr, dropped))} returned outputs without the "
                f"batch's data points first ({'; '.join(step.tally.not_batch_first.values())})"
                ": they are not preconditioned and keep their plain gradients.",
                UncoveredParameterWarning,
            )

    def _read_gradients(
        self, step: _Step, batch: BatchInfo, rows: BatchRows, targets: Tensor
    ) -> None:
        """The batch's output gradients: backpropagated now, or from the training backward."""
        fisher = self.fisher
        if fisher == "forward-only":
            self._add(step, rows)
            return
        if fisher != "empirical":
            rows.grads = step.tally.gradients(batch, rows, self._calls, False, retain_graph=True)
            self._generator = step.tally.generator
            if step.scale_rows is not None and fisher == "type-2" and batch.terms_per_point > 1:
                per_term = step.tally.gradients(batch, rows, self._calls, True, retain_graph=True)
                self._add(step, rows, BatchRows(**{**vars(rows), "grads": per_term}))
            else:
                self._add(step, rows)
            return
        likelihood = self.setup.likelihood
        ignored = likelihood.term_mask(targets, batch.output)
        terms = likelihood.num_terms(batch.output) if ignored is None else int(ignored.sum())
        step.loss_entries += likelihood.mean_divisor(terms, likelihood.num_classes(batch.output))
        flat = [(name, c) for name in rows.masks for c in self._calls[name]]
        captured: list[Tensor | None] = [None] * len(flat)
        for i, (_, c) in enumerate(flat):
            c.output.register_hook(_capture(captured, i))
        step.pending.append((rows, flat, captured))

    def _add(self, step: _Step, rows: BatchRows, scale_rows: BatchRows | None = None) -> None:
        """Feed one batch to the step's factor sums and EKFAC scale sums."""
        if step.sums is not None:
            step.sums.add(rows)
        if step.scale_rows is not None:
            step.scale_rows.append(scale_rows or rows)

    def _finish_empirical(self, step: _Step) -> None:
        """Turn the gradients the training backward pass left into the pending rows' ``g``."""
        for rows, flat, captured in step.pending:
            check_outputs_unchanged(flat, rows.index)
            grads = [None if g is None else g.detach()[None] for g in captured]
            rows.grads = grad_rows(flat, grads, rows.n, rows.dtype, rows.index, rows.masks)
            self._add(step, rows)
        step.pending.clear()

    # -- the step ---------------------------------------------------------------------------
    def _value(self, name: str, value: Schedule) -> float:
        v = float(value(self.steps)) if callable(value) else float(value)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} at step {self.steps} must be finite and >= 0, got {v!r}.")
        return v

    @torch.no_grad()
    def step(self) -> bool:
        """Update the factors (when due) and precondition the covered gradients in place.

        Returns:
            ``True``; ``False`` when the step was skipped because this step's statistics hold
            NaN / Inf (a warning names the module; gradients and running state unchanged).

        Raises:
            RuntimeError: If no batch was recorded before the first step.
        """
        if self.steps == 0 and not self._recorded:
            raise RuntimeError(
                "step() before any recorded batch: run the forward pass, "
                "loss = loss_fn(output, y) with the preconditioner's loss_fn (or "
                "observe(output, y)) and loss.backward() first."
            )
        damping = self._value("damping", self.damping)
        step, self._step = self._step, None
        try:
            if step is not None and not self._update(step):
                return False
            if self.steps % self.inverse_every == 0 or any(
                lay.decomposed is None and lay.A is not None for lay in self._layers.values()
            ):
                self._decompose(damping)
            if step is not None and step.scale_rows:
                self._update_scales(step.scale_rows, self._gradient_scale(step))
            self._precondition(damping)
        finally:
            self._inputs = None
        self.steps += 1
        return True

    def _update(self, step: _Step) -> bool:
        """Running factors from the step's sums; ``False``: skip the step (NaN / Inf)."""
        if step.failed is None:
            try:
                self._finish_empirical(step)
            except NonFiniteError as err:
                step.failed = str(err)
        if self.group is not None and step.failed is None and self._any_rank(False):
            step.failed = "Another rank's statistics hold NaN / Inf."
        elif self.group is not None and step.failed is not None:
            self._any_rank(True)
        if step.failed is not None:
            if self.grad_scaler is None:
                warn(
                    f"{step.failed} Step {self.steps} skipped: gradients and running state "
                    "unchanged.",
                    RuntimeWarning,
                )
            return False
        if self.group is not None:
            self._all_reduce_step(step)
        if step.tally.total == 0:
            return True
        if step.sums is not None:
            self._update_factors(step.sums, step.tally.total, self._gradient_scale(step))
        return True

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (one all-reduce)."""
        return bool(all_reduce_counts([int(flag)], self.group, op="max")[0])

    def _all_reduce_step(self, step: _Step) -> None:
        """The step's counts and factor sums over every rank's part of the batch.

        With the empirical Fisher the recorded gradients carry each rank's ``1 / D'`` of its
        own mean loss: every rank's batch must average as many entries (as
        DistributedDataParallel's gradient average assumes too).

        Raises:
            ValueError: Empirical Fisher with batches of different sizes on the ranks.
        """
        tally = step.tally
        total, terms = all_reduce_counts([tally.total, tally.terms], self.group)
        if self.fisher == "empirical" and self.setup.likelihood.reduction == "mean":
            entries = [-step.loss_entries, step.loss_entries]
            low, high = all_reduce_counts(entries, self.group, op="max")
            if -low != high:
                raise ValueError(
                    "fisher='empirical' on torch.distributed needs every rank's batch to average "
                    f"as many loss entries; they range from {-low} to {high}."
                )
        (C,) = all_reduce_counts([tally.C or 0], self.group, op="max")
        tally.total, tally.terms, tally.C = total, terms, C or None
        if step.sums is not None:
            step.sums.all_reduce(self.group)

    def _gradient_scale(self, step: _Step) -> float:
        """``c`` with ``Ŝ = c Σ g gᵀ`` for the recorded ``g`` (module docstring)."""
        likelihood, tally = self.setup.likelihood, step.tally
        D = likelihood.mean_divisor(tally.terms, tally.C or 1)
        if self.fisher != "empirical":
            return 1.0 / D
        c = 1.0 if likelihood.reduction == "sum" else step.loss_entries**2 / D
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            c /= float(self.grad_scaler.get_scale()) ** 2
        return c

    def _update_factors(self, sums: FactorAccumulator, num_data: int, scale: float) -> None:
        """EMA of the step's normalised factor sums (sketches for low-rank sides), in place.

        The sums are normalised in the accumulator's buffers (symmetrised as they are read),
        which the next step empties; a joint bias's ``A`` is a new tensor.
        """
        eps, identity = self.factor_decay, self.fisher == "forward-only"
        updated: list[_Layer] = []
        A_new: list[Tensor] = []
        S_new: list[Tensor] = []
        for name, acc in sums.sums.items():
            layer = self._layers.get(name)
            if layer is None or acc.count == 0:
                continue
            updated.append(layer)
            A_new.append(acc.A_stream.Y if acc.A_stream is not None else acc.dense_input_sums())
            if not identity:
                S_new.append(
                    acc.S_stream.Y if acc.S_stream is not None else acc.dense_output_sums()
                )
            layer.sketched = (acc.A_stream is not None, acc.S_stream is not None)
        _scalar_op_(torch._foreach_div_, A_new, num_data)
        _scalar_op_(torch._foreach_mul_, S_new, scale)
        running: list[Tensor] = []
        fresh: list[Tensor] = []
        for i, layer in enumerate(updated):
            A, S = A_new[i], None if identity else S_new[i]
            if layer.A is None:  # the first update initialises (a copy: the buffers are reused)
                layer.A, layer.S = A.clone(), None if S is None else S.clone()
                continue
            running.append(layer.A)
            fresh.append(A)
            if S is not None:
                assert layer.S is not None  # S is the identity (None) at every step or at none
                running.append(layer.S)
                fresh.append(S)
        if running:
            _scalar_op_(torch._foreach_mul_, running, eps)
            torch._foreach_add_(running, fresh, alpha=1 - eps)

    def _factor(self, layer: _Layer, side: str) -> Tensor | LowRankFactor:
        """A running factor as :class:`~kronfac.KroneckerFactors` holds it."""
        options, adapter, A = self.setup.options, layer.adapter, layer.A
        assert A is not None  # asked for layers with statistics only
        value = A if side == "A" else layer.S
        d = adapter.in_features + layer.joint if side == "A" else adapter.out_features
        if value is None:  # forward-only: S = I, as compute_factors returns it
            eye = torch.eye(d, dtype=A.dtype, device=A.device)
            return eye if adapter.groups == 1 else eye.expand(adapter.groups, d, d).clone()
        if not layer.sketched["AS".index(side)]:
            return value
        assert options.rank is not None  # a side is sketched with rank= only
        stream = StreamingLowRank(d, options.rank, value.device, options.oversample, adapter.groups)
        stream.Y = value
        return stream.result(1.0, self._dtype(layer))

    def _dtype(self, layer: _Layer) -> torch.dtype:
        return torch.float64 if layer.weight.dtype == torch.float64 else torch.float32

    def _blocks(self, layer: _Layer) -> list[KroneckerBlock]:
        """The K-FAC blocks of the running factors (weight, then a separate bias)."""
        A = as_factor(self._factor(layer, "A"), layer.name, diagonal=layer.adapter.diagonal_input)
        if layer.S is None:  # forward-only: S = I, never a matrix
            ones = torch.ones(A.groups, dtype=A.dtype, device=A.device)
            S: Factor = IdentityFactor(layer.adapter.out_features, ones, layer.name)
        else:
            S = as_factor(self._factor(layer, "S"), layer.name)
        blocks = [KroneckerBlock(S, A, layer.name)]
        if len(layer.slots) == 2:
            blocks.append(KroneckerBlock(S, None, layer.name, heuristic_A=A))
        return blocks

    def _decompose(self, damping: float) -> None:
        """Refresh each layer's decompositions; a failure keeps the last good one and warns.

        On torch.distributed the layers are spread over the ranks by cost (greedy on the
        factors' ``side³``, Pauloski et al.'s KAISA): each rank decomposes its share of the
        same (all-reduced) factors and sends it to the others, so every rank holds the very
        same decompositions.
        """
        names = [n for n, lay in self._layers.items() if lay.A is not None]
        owners = None if self.group is None else self._owners(names)
        mine = rank_of(self.group)
        done: dict[str, list[tuple[Factor, Factor | None]]] = {}
        for name in names:
            if owners is not None and owners[name] != mine:
                continue
            try:
                done[name] = self._decomposed(self._layers[name], damping)
            except (ValueError, RuntimeError) as err:  # NotPSDError, LinAlgError
                warn(
                    f"Decomposing the factors of module {name!r} failed at step {self.steps} "
                    f"({err}); keeping the last good decomposition.",
                    RuntimeWarning,
                )
        if owners is not None:
            done = self._exchanged(done, owners)
        for name, parts in done.items():
            layer = self._layers[name]
            layer.decomposed, layer.cache = parts, None
            if self.ekfac:  # the scales restart from K-FAC's eigenvalues in the new basis
                self._reset_scales(layer, parts)

    def _decomposed(self, layer: _Layer, damping: float) -> list[tuple[Factor, Factor | None]]:
        """One layer's decompositions: Cholesky inverses or eigen forms, per block."""
        parts = []
        for block in self._blocks(layer):
            if self.inverse_method == "cholesky":
                inv = block.inverse(damping, heuristic=True, min_damping=self.min_damping)
                parts.append((inv.factor_S, None if block.single else inv.factor_A))
            else:
                A = None if block.single else _eigen_form(block.factor_A)
                parts.append((_eigen_form(block.factor_S), A))
        return parts

    def _owners(self, names: list[str]) -> dict[str, int]:
        """The rank decomposing each layer: the largest costs first, each to the least loaded."""
        world = torch.distributed.get_world_size(self.group)
        load = [0] * world
        owners = {}
        for name in sorted(names, key=lambda n: (-self._cost(n), n)):
            rank = min(range(world), key=lambda r: (load[r], r))
            owners[name] = rank
            load[rank] += self._cost(name)
        return owners

    def _cost(self, name: str) -> int:
        """``Σ side³`` of a layer's dense factors (what decomposing them costs)."""
        layer = self._layers[name]
        adapter = layer.adapter
        sides = [adapter.out_features, 0 if adapter.diagonal_input else adapter.in_features]
        return adapter.groups * sum(
            (d // adapter.groups if adapter.groups > 1 else d) ** 3 for d in sides
        )

    def _exchanged(
        self, done: dict[str, list[tuple[Factor, Factor | None]]], owners: dict[str, int]
    ) -> dict[str, list[tuple[Factor, Factor | None]]]:
        """Every rank's share sent to the others (one object broadcast per rank).

        A layer whose owner failed keeps its last good decomposition on every rank.
        """
        world = torch.distributed.get_world_size(self.group)
        out: dict[str, list[tuple[Factor, Factor | None]]] = {}
        for rank in range(world):
            share = [n for n in owners if owners[n] == rank]
            box: list[Any] = [{n: done[n] for n in share if n in done}]
            src = torch.distributed.get_global_rank(self.group, rank)
            torch.distributed.broadcast_object_list(box, src=src, group=self.group)
            out.update(box[0])
            for name in set(share) - set(box[0]):
                if rank != rank_of(self.group):
                    warn(
                        f"Decomposing the factors of module {name!r} failed on rank {rank} at "
                        f"step {self.steps}; keeping the last good decomposition.",
                        RuntimeWarning,
                    )
        return out

    def _bases(self, layer: _Layer) -> tuple[Tensor | None, Tensor]:
        """``(Q_A, Q_S)`` of the decomposition (the weight's block), per group if grouped."""
        assert layer.decomposed is not None  # called for decomposed layers only
        S, A = layer.decomposed[0]
        assert A is not None  # the weight's block has both factors
        Q_A, Q_S = A.eigenbasis().vectors, S.eigenbasis().vectors
        assert Q_S is not None  # EKFAC's S is never the identity (no forward-only)
        if layer.adapter.groups == 1:
            return None if Q_A is None else Q_A[0], Q_S[0]
        return Q_A, Q_S

    def _reset_scales(self, layer: _Layer, decomposed: list[tuple[Factor, Factor | None]]) -> None:
        scales, complements = [], []
        for S, A in decomposed:
            s, a = S.eigenbasis(), None if A is None else A.eigenbasis()
            if a is None:
                scales.append(s.values)
                complements.append(s.complement)
            else:
                scales.append(s.values[:, :, None] * a.values[:, None, :])
                complements.append(s.complement * a.complement)
        layer.scales, layer.complements = scales, complements

    def _update_scales(self, rows: list[BatchRows], scale: float) -> None:
        """EKFAC: EMA of the step's per-example second moments in the current basis."""
        eps = self.factor_decay
        layers = {n: lay for n, lay in self._layers.items() if lay.decomposed is not None}
        partial = {n for n, lay in layers.items() if any(lay.sketched)}
        sums = CorrectionSums(
            self.setup, {n: self._bases(lay) for n, lay in layers.items()}, partial
        )
        for batch in rows:
            sums.add(
                BatchRows(
                    **{
                        **vars(batch),
                        "grads": {k: g for k, g in batch.grads.items() if k in layers},
                    }
                )
            )
        if self.group is not None:
            sums.all_reduce(self.group)
        for name, corr in sums.corrections(1.0).items():
            layer = self._layers.get(name)
            if layer is None or layer.scales is None or layer.complements is None:
                continue
            rest = [corr.complement, corr.bias_complement]
            for i, lam in enumerate(_slot_eigenvalues(corr, len(layer.slots))):
                lam = lam if lam.ndim == layer.scales[i].ndim else lam[None]
                layer.scales[i].mul_(eps).add_(lam, alpha=(1 - eps) * scale)
                c = rest[i]
                if c is not None:
                    layer.complements[i].mul_(eps).add_(c, alpha=(1 - eps) * scale)
            layer.cache = None

    def _inverse_blocks(self, layer: _Layer, damping: float) -> list[Block]:
        """The per-slot blocks applying the damped inverse to a ``[p, q, k]`` gradient.

        Cached until the damping changes or the decomposition / EKFAC scales are refreshed.
        Factored (π) inverses of dense factors are held as dense matrices: two products per
        step instead of four rotations.
        """
        assert layer.decomposed is not None
        if layer.cache is not None and layer.cache[0] == damping:
            return layer.cache[1]
        out: list[Block] = []
        weight_A = layer.decomposed[0][1]
        for i, (S, A) in enumerate(layer.decomposed):
            if self.inverse_method == "cholesky":
                out.append(KroneckerBlock(S, A, layer.name))
            elif self.ekfac:
                out.append(_scaled_inverse(layer, i, S, A, damping))
            else:
                block = KroneckerBlock(
                    S, A, layer.name, heuristic_A=weight_A if A is None else None
                )
                heuristic = self.damping_mode == "pi"
                inv = block.inverse(
                    damping,
                    heuristic=heuristic,
                    min_damping=self.min_damping,
                    exact=not heuristic,
                )
                if isinstance(inv, KroneckerBlock):
                    inv = KroneckerBlock(
                        _densified(inv.factor_S),
                        None if inv.single else _densified(inv.factor_A),
                        layer.name,
                    )
                out.append(inv)
        layer.cache = (damping, out)
        return out

    def _precondition(self, damping: float) -> None:
        """Overwrite the decomposed layers' ``.grad`` by the damped inverses' products, clipped.

        Each block reads its matrix straight from the ``.grad`` tensors (a joint bias: one
        copy) and its product is copied back into them once; KL clipping's ``ν`` stays on the
        device (no synchronisation).
        """
        clip = self.kl_clip is not None and self.lr is not None
        products: list[tuple[Slot, Tensor, Tensor, Tensor | None]] = []  # slot, v, .grads
        inner: list[Tensor] = []  # ⟨v, ∇⟩ per block (KL clipping)
        for layer in self._layers.values():
            grads = _grads(layer)
            if layer.decomposed is None or grads is None:
                continue
            weight, bias = grads
            parts = (weight.reshape(-1, 1), None if bias is None else bias.reshape(-1, 1))
            dtype = self._dtype(layer)
            blocks = self._inverse_blocks(layer, damping)
            for slot, block in zip(layer.slots, blocks, strict=True):
                V = slot.join(*parts)
                V = V if V.dtype == dtype else V.to(dtype)
                v = block.matmat(V)
                products.append((slot, v, weight, bias))
                if clip:
                    inner.append((v * V).sum())
        written = []
        for slot, v, weight, bias in products:
            for grad, part in zip((weight, bias), slot.split(v), strict=True):
                if part is not None:
                    assert grad is not None  # the slot holds this parameter
                    written.append(grad.copy_(part.reshape(grad.shape)))
        if clip and inner:
            assert self.kl_clip is not None and self.lr is not None  # (clip)
            lr = self._value("lr", self.lr)
            device = inner[0].device
            vg = torch.stack([t if t.device == device else t.to(device) for t in inner])
            vg = vg.sum(dtype=torch.float64) * lr * lr
            nu = (self.kl_clip / vg.abs()).sqrt().clamp(max=1.0)  # 1 where ⟨v, ∇⟩ = 0
            _scalar_op_(torch._foreach_mul_, written, nu)

    # -- the factors as an operator ---------------------------------------------------------
    def factors(self) -> KroneckerFactors:
        """The running factors as :class:`~kronfac.KroneckerFactors` (current, not decomposed).

        ``kronfac.KFAC.from_factors(precond.factors(), model)`` is the curvature the
        preconditioner damps and inverts (at a refresh).

        Raises:
            RuntimeError: Before the first factor update.
        """
        pairs = {
            name: FactorPair(*(_copy(self._factor(layer, side)) for side in "AS"))
            for name, layer in self._layers.items()
            if layer.A is not None
        }
        if not pairs:
            raise RuntimeError("No factors yet: take a step first.")
        return KroneckerFactors(
            pairs,
            param_names={n: self.setup.param_names[n] for n in pairs},
            options=self.setup.recorded,
            num_data=1,
            num_per_example_loss_terms=1,
        )

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter, running factors, decompositions, EKFAC scales and the MC generator."""
        layers = {}
        for name, layer in self._layers.items():
            layers[name] = {
                "A": layer.A,
                "S": layer.S,
                "sketched": layer.sketched,
                "decomposed": None
                if layer.decomposed is None
                else [tuple(_factor_state(F) for F in pair) for pair in layer.decomposed],
                "scales": layer.scales,
                "complements": layer.complements,
            }
        return {
            "steps": self.steps,
            "generator": None if self._generator is None else self._generator.get_state(),
            "generator_device": None if self._generator is None else str(self._generator.device),
            "options": self._options(),
            "layers": layers,
        }

    def _options(self) -> dict[str, Any]:
        return {
            "ekfac": self.ekfac,
            "inverse_method": self.inverse_method,
            "joint": {n: layer.joint for n, layer in self._layers.items()},
        }

    def _check_state_S(self, layers: dict[str, Any]) -> None:
        """Refuse saved ``S`` factors of the other kind than this preconditioner's.

        The identity (``None``, forward-only) where the updates continue a running matrix, or
        a matrix where the identity stays (and the matrix would be used, never updated).
        """
        identity = self.fisher == "forward-only"
        for name, saved in layers.items():
            if saved["A"] is not None and (saved["S"] is None) != identity:
                kind = "a matrix" if identity else 'the identity (fisher="forward-only")'
                raise ValueError(
                    f"The state's S of module {name!r} is {kind}; this preconditioner has "
                    f"fisher={self.fisher!r}."
                )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors are copied to the covered weights' devices).

        Raises:
            ValueError: If the state was saved for other modules or options, or its ``S``
                factors are the identity (``fisher="forward-only"``) and this preconditioner's
                are not, or the other way round.
        """
        if set(state.get("layers", {})) != set(self._layers):
            raise ValueError(
                f"The state covers modules {sorted(state.get('layers', {}))}, this "
                f"preconditioner {sorted(self._layers)}."
            )
        if state.get("options") != self._options():
            raise ValueError(
                f"The state was saved with options {state.get('options')}, this preconditioner "
                f"has {self._options()}."
            )
        self._check_state_S(state["layers"])

        def copy(t: Any, like: Tensor) -> Any:
            if t is None or isinstance(t, (bool, int, float, str)):
                return t
            if isinstance(t, Tensor):
                return t.detach().clone().to(device=like.device)
            return type(t)(copy(u, like) for u in t)

        for name, layer in self._layers.items():
            saved = state["layers"][name]
            layer.A, layer.S = copy(saved["A"], layer.weight), copy(saved["S"], layer.weight)
            layer.sketched = tuple(saved["sketched"])
            decomposed = saved["decomposed"]
            layer.decomposed = (
                None
                if decomposed is None
                else [_pair_from_state(copy(pair, layer.weight), name) for pair in decomposed]
            )
            layer.scales = copy(saved["scales"], layer.weight)
            layer.complements = copy(saved["complements"], layer.weight)
            layer.cache = None
        self.steps = int(state["steps"])
        self._generator = None
        if state.get("generator") is not None:
            device = torch.device(state.get("generator_device") or "cpu")
            self._generator = torch.Generator(device=device)
            self._generator.set_state(state["generator"])


def _copy(F: Tensor | LowRankFactor) -> Tensor | LowRankFactor:
    """A copy that the running (in-place) updates do not reach."""
    return F.clone() if isinstance(F, Tensor) else F


def _scalar_op_(
    op: Callable[[list[Tensor], Tensor], None], tensors: list[Tensor], value: float | Tensor
) -> None:
    """``op(tensors, value)`` in place (``torch._foreach_mul_`` / ``_foreach_div_``).

    The value becomes one 0-d tensor per dtype (at least float32) and device, with which each
    product is one kernel (a Python number is converted for every tensor); the products are
    those of the number.
    """
    kinds: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        kinds.setdefault((torch.promote_types(t.dtype, torch.float32), t.device), []).append(t)
    for (dtype, device), group in kinds.items():
        op(group, torch.as_tensor(value, dtype=dtype, device=device))


def _seen(refs: list[weakref.ReferenceType[Tensor]], output: Tensor) -> bool:
    """Whether ``output`` is one of the (live) tensors of ``refs``."""
    return any(ref() is output for ref in refs)


def _capture(store: list[Tensor | None], i: int) -> Callable[[Tensor], None]:
    def hook(g: Tensor) -> None:
        previous = store[i]
        store[i] = g if previous is None else previous + g

    return hook


def _grads(layer: _Layer) -> tuple[Tensor, Tensor | None] | None:
    """The ``.grad`` of the weight and bias (``None``: no bias); ``None`` if one is unset."""
    weight = layer.weight.grad
    if weight is None or (layer.bias is not None and layer.bias.grad is None):
        return None
    return weight, None if layer.bias is None else layer.bias.grad


def _slot_eigenvalues(corr: EigenCorrection, slots: int) -> list[Tensor]:
    """EKFAC's corrected eigenvalues per slot: the weight's, then a separate bias's."""
    if slots == 1:
        return [corr.eigenvalues]
    assert corr.bias_eigenvalues is not None  # a separate bias's corrections carry them
    return [corr.eigenvalues, corr.bias_eigenvalues]


def _scaled_inverse(
    layer: _Layer, i: int, S: Factor, A: Factor | None, damping: float
) -> EigenBlock:
    """EKFAC's damped inverse of slot ``i``: its running scales in the basis of ``(S, A)``."""
    assert layer.scales is not None and layer.complements is not None  # set with the basis
    Q_A = None if A is None else A.eigenbasis().vectors
    lam = layer.scales[i] + damping
    rest = float(layer.complements[i].max()) + damping
    lam = lam[..., None] if A is None else lam
    Q_S = S.eigenbasis().vectors
    return EigenBlock(Q_S, Q_A, lam.reciprocal(), layer.name, 1 / rest if rest else 0.0)


def _eigen_form(F: Factor) -> Factor:
    """``F`` held as its eigendecomposition (dense factors; the others already are)."""
    if not isinstance(F, DenseFactor):
        return F
    basis = F.eigenbasis()
    assert basis.vectors is not None  # a dense factor's basis is a matrix, never the identity
    return ShiftedLowRankFactor(basis.vectors, basis.values, basis.complement, F.name)


def _densified(F: Factor) -> Factor:
    """A complete-basis eigen form as a dense matrix (one GEMM per product instead of two)."""
    if isinstance(F, ShiftedLowRankFactor) and F.U.shape[-1] == F.side:
        return DenseFactor(F.to_dense(), F.name)
    return F


def _factor_state(F: Factor | None) -> tuple[Any, ...] | None:
    """A factor as plain tensors (a checkpoint)."""
    if F is None:
        return None
    if isinstance(F, ShiftedLowRankFactor):
        return ("lowrank", F.U, F.eigenvalues, F.shift)
    if isinstance(F, DenseFactor):
        return ("dense", F.to_dense())
    return ("diagonal", F.diagonal())


def _pair_from_state(
    pair: tuple[tuple[Any, ...], tuple[Any, ...] | None], name: str
) -> tuple[Factor, Factor | None]:
    """A decomposition's ``(S, A)`` from :func:`_factor_state` (``A``: ``None``, no factor)."""
    S, A = pair
    return _factor_from_state(S, name), None if A is None else _factor_from_state(A, name)


def _factor_from_state(state: tuple[Any, ...], name: str) -> Factor:
    kind, *tensors = state
    if kind == "lowrank":
        U, eigenvalues, shift = tensors
        return ShiftedLowRankFactor(U, eigenvalues, shift, name)
    return as_factor(tensors[0], name, diagonal=kind == "diagonal")
