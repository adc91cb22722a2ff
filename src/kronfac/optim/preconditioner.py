r"""K-FAC / EKFAC preconditioning of a training loop's gradients.

Per covered module, with ``W: [p, q]`` in the canonical layout (the bias a last column with
``bias="joint"``), each step's batches (one backward pass, or several with gradient
accumulation; ``N`` data points in all) give

.. math::

    \hat A = \frac{1}{N} \sum_n \frac{1}{T} \sum_t a_{n,t} a_{n,t}^\top, \qquad
    \hat S = c \sum_{n,t} g_{n,t} g_{n,t}^\top,

``a`` the layer inputs (a trailing 1 for a joint bias), ``g`` the gradients the backward pass
leaves at the layer outputs, ``c = N`` for a loss averaged over the data points
(``reduction="mean"``: the ``g`` carry ``1/N``) and ``c = 1/N`` for a summed loss, so that
``Ŝ ⊗ Â`` estimates the Fisher of one data point's loss either way. A module called several
times in one forward pass of ``model`` is one block whose calls are more positions ``t`` of
the same data points (call ``model`` itself: its forward passes delimit the data points).
A loss averaged over more than the data points — over ``T`` positions (token-level language
modelling), or over the ``C`` outputs as torch's mean MSE / BCE does — gives an ``Ŝ`` ``T``
(``C``) times smaller than :func:`kronfac.compute_factors`' ``S``, which acts as a larger
damping. With ``fisher="mc"`` the ``g`` come from labels
sampled from the model (:meth:`KFACPreconditioner.mc_backward`) instead of the training labels.

Running estimates (every ``factor_every`` steps; the first update initialises):
``A ← ε A + (1 − ε) Â``, ``S ← ε S + (1 − ε) Ŝ`` (``ε = factor_decay``). Every
``inverse_every`` steps the factors are decomposed (``A = Q_A diag(a) Q_Aᵀ``,
``S = Q_S diag(s) Q_Sᵀ``, or Cholesky factors of the damped factors), and every step the
gradient ``V = ∇W`` becomes

- ``damping_mode="pi"`` (Martens & Grosse, 2015, §6.3): ``(S + δ_S I)⁻¹ V (A + δ_A I)⁻¹``
  with ``δ_A = π√δ``, ``δ_S = √δ/π``, ``π = √((tr A / q) / (tr S / p))`` (each at least
  ``min_damping``; the factors as last decomposed), applied as the explicit inverses
  ``Q_S diag(1/(s + δ_S)) Q_Sᵀ`` and ``Q_A diag(1/(a + δ_A)) Q_Aᵀ``;
- ``damping_mode="tikhonov"``: ``(S ⊗ A + δI)⁻¹ vec V``, i.e. the same with ``s aᵀ + δ``;
- ``ekfac=True`` (George et al., 2018): ``Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + δ)] Q_Aᵀ`` with ``Λ`` a
  running estimate of ``c Σ_n (Q_Sᵀ G_n Q_A)^{∘2}``, ``G_n = Σ_t g_{n,t} a_{n,t}ᵀ`` the
  per-example gradients of the batch, updated every ``scale_every`` steps and reset to
  ``s aᵀ`` whenever the basis is refreshed.

A separate bias (``bias="separate"``) gets ``(S + δ_S I)⁻¹`` alone (``s + δ`` in Tikhonov /
EKFAC form). With a learning rate ``η`` the update is scaled by KL clipping (Ba et al., 2017):
``ν = min(1, √(κ / |Σ η² ⟨v, ∇⟩|))`` over every covered parameter (``v`` the preconditioned
gradient, ``κ = kl_clip``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.errors import UncoveredParameterWarning, warn
from kronfac.factors.data_pass import per_example
from kronfac.factors.ekfac import rotated_second_moment
from kronfac.factors.engine import FactorSums
from kronfac.factors.selection import select_modules
from kronfac.layers import LayerAdapter
from kronfac.likelihoods import get_likelihood
from kronfac.linalg import EigenBlock, KroneckerBlock, pi_damping
from kronfac.operators import Slot

__all__ = ["KFACPreconditioner"]

Schedule = float | Callable[[int], float]

_FISHERS = ("empirical", "mc")
_DAMPING_MODES = ("pi", "tikhonov")
_INVERSE_METHODS = ("eigen", "cholesky")


@dataclass
class _Layer:
    """One covered module: its parameters, this step's sums and the running state."""

    name: str
    adapter: LayerAdapter
    tied: list[LayerAdapter]
    weight: nn.Parameter
    bias: nn.Parameter | None
    joint: bool
    slots: tuple[Slot, ...]
    sums: FactorSums | None = None
    # this step's data points (a module called k times per forward pass counts them once) and
    # the forward passes seen; the (forward pass, inputs, output gradients) kept for EKFAC
    points: int = 0
    forwards: set[int] = field(default_factory=set)
    rows: list[tuple[int, Tensor, Tensor]] = field(default_factory=list)
    A: Tensor | None = None
    S: Tensor | None = None
    # per slot: (s, Q_S, a, Q_A) eigendecompositions, or (S⁻¹, A⁻¹) damped Cholesky inverses
    decomposed: list[tuple[Tensor | None, ...]] | None = None
    scales: list[Tensor] | None = None  # EKFAC's Λ per slot
    cache: tuple[float, list[Any]] | None = None  # (damping, the damped inverse's blocks)

    def blocks(self) -> list[KroneckerBlock]:
        """The K-FAC blocks of the running factors (weight, then a separate bias)."""
        A, S = self.A, self.S
        if self.joint or self.bias is None:
            return [KroneckerBlock(S, A, self.name)]  # type: ignore[arg-type]
        return [
            KroneckerBlock(S, A, self.name),  # type: ignore[arg-type]
            KroneckerBlock(S, None, self.name, heuristic_A=A),  # type: ignore[arg-type]
        ]


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


class KFACPreconditioner:
    r"""Replaces the gradients of the covered layers by K-FAC / EKFAC natural gradients.

    Hooks record the inputs and output gradients of the covered modules during the training
    loop's own forward and backward passes; :meth:`step` turns them into running factors and
    overwrites each covered parameter's ``.grad`` by its preconditioned gradient (formulas in
    the module docstring). Any torch optimizer then applies it::

        precond = KFACPreconditioner(model, lr=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for X, y in loader:
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            precond.step()
            opt.step()

    With ``fisher="mc"``, call :meth:`mc_backward` between the forward pass and the training
    backward pass. Gradient accumulation: call backward several times (each on a loss divided
    by the number of micro-batches, as usual) before :meth:`step`. With a
    ``torch.amp.GradScaler``, pass it as ``grad_scaler`` and call ``scaler.unscale_(opt)``
    before :meth:`step`.

    Args:
        model: The model; its supported layers with a trainable weight are covered (or those
            ``modules`` selects). Grouped convolutions and embeddings are left out (warned).
        damping: ``δ`` (>= 0), or a callable ``step -> δ``.
        factor_decay: ``ε`` in ``[0, 1)``.
        factor_every: Update the running factors every this many steps.
        inverse_every: Decompose them every this many steps.
        kl_clip: ``κ`` of KL clipping (applied when ``lr`` is given); ``None`` disables it.
        lr: The learning rate (a number or callable ``step -> η``), used by KL clipping only.
        ekfac: Precondition in EKFAC's eigenbasis with running eigenvalue scales.
        scale_every: With ``ekfac``, update the scales every this many steps.
        modules: Name substrings selecting the covered modules; ``None``: every supported one.
        exclude: Name substrings of modules to leave out, applied after ``modules``.
        bias: ``"joint"`` (the bias as a last column of the weight) or ``"separate"``.
        fisher: ``"empirical"`` (the training gradients) or ``"mc"`` (sampled labels).
        damping_mode: ``"pi"`` (π-adjusted factored damping) or ``"tikhonov"``; EKFAC always
            adds ``δ`` to its scales.
        inverse_method: ``"eigen"`` or ``"cholesky"`` (``"pi"`` damping only, K-FAC only; the
            damping is that of the decomposition step).
        min_damping: Lower bound of ``δ_A`` and ``δ_S`` under π-damping.
        reduction: ``"mean"`` (the loss averages over the data points) or ``"sum"``.
        grad_scaler: The ``torch.amp.GradScaler`` scaling the backward pass, if any.
        seed: Seed of the generator drawing the labels of ``fisher="mc"``.

    Raises:
        ValueError: Out-of-range or unknown options, or a model without a covered layer.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Schedule = 1e-3,
        factor_decay: float = 0.95,
        factor_every: int = 1,
        inverse_every: int = 10,
        kl_clip: float | None = 1e-3,
        lr: Schedule | None = None,
        ekfac: bool = False,
        scale_every: int = 1,
        modules: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str | None = None,
        bias: str = "joint",
        fisher: str = "empirical",
        damping_mode: str = "pi",
        inverse_method: str = "eigen",
        min_damping: float = 1e-8,
        reduction: str = "mean",
        grad_scaler: Any = None,
        seed: int = 0,
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
        _check_choice("bias", bias, ("joint", "separate"))
        _check_choice("fisher", fisher, _FISHERS)
        _check_choice("damping_mode", damping_mode, _DAMPING_MODES)
        _check_choice("inverse_method", inverse_method, _INVERSE_METHODS)
        _check_choice("reduction", reduction, ("mean", "sum"))
        if inverse_method == "cholesky" and (ekfac or damping_mode == "tikhonov"):
            raise ValueError(
                "inverse_method='cholesky' supports K-FAC with damping_mode='pi' only; EKFAC and "
                "Tikhonov damping need inverse_method='eigen'."
            )
        self.damping, self.lr, self.kl_clip = damping, lr, kl_clip
        self.factor_decay = float(factor_decay)
        self.factor_every, self.inverse_every, self.scale_every = (
            factor_every,
            inverse_every,
            scale_every,
        )
        self.ekfac, self.fisher, self.damping_mode = bool(ekfac), fisher, damping_mode
        self.inverse_method, self.min_damping, self.reduction = (
            inverse_method,
            float(min_damping),
            reduction,
        )
        self.grad_scaler = grad_scaler
        self.steps = 0
        # the MC labels' generator lives on the model outputs' device (made at the first draw)
        self._seed = seed
        self._generator: torch.Generator | None = None
        self._layers = self._select(model, modules, exclude, bias == "joint")
        self._pending: list[tuple[_Layer, LayerAdapter, Tensor, Tensor, int]] = []
        self._recorded = False
        self._forward = 0  # counts the model's forward passes (calls of one are positions)
        self._handles = [model.register_forward_pre_hook(self._next_forward)] + [
            adapter.module.register_forward_hook(self._make_hook(layer, adapter), with_kwargs=True)
            for layer in self._layers.values()
            for adapter in [layer.adapter, *layer.tied]
        ]

    # -- setup ------------------------------------------------------------------------------
    @staticmethod
    def _select(
        model: nn.Module,
        modules: Iterable[str] | str | None,
        exclude: Iterable[str] | str | None,
        joint: bool,
    ) -> dict[str, _Layer]:
        with warnings.catch_warnings():  # uncovered parameters get the plain update
            warnings.simplefilter("ignore", UncoveredParameterWarning)
            adapters, names, tied = select_modules(model, modules, exclude=exclude)
        params = dict(model.named_parameters())
        layers, left_out = {}, []
        for name, adapter in adapters.items():
            if adapter.groups > 1 or adapter.diagonal_input:
                left_out.append(name)
                continue
            weight = params[names[name].weight]
            bias = None if names[name].bias is None else params[names[name].bias]
            nw = weight.numel()
            end = nw + (0 if bias is None else bias.numel())
            b_slice = None if bias is None else slice(nw, end)
            if joint or bias is None:
                slots: tuple[Slot, ...] = (Slot(adapter, slice(0, nw), b_slice),)
            else:
                slots = (Slot(adapter, slice(0, nw), None), Slot(adapter, None, b_slice))
            layers[name] = _Layer(
                name, adapter, tied.get(name, []), weight, bias, joint and bias is not None, slots
            )
        if left_out:
            warn(
                f"Modules {left_out} (grouped convolutions, embeddings) are not preconditioned; "
                "their parameters keep their plain gradients.",
                UncoveredParameterWarning,
            )
        if not layers:
            raise ValueError("The model has no layer K-FAC can precondition.")
        return layers

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
    def _next_forward(self, *_: Any) -> None:
        self._forward += 1

    def _records_now(self) -> bool:
        """Whether this step's passes feed the factors or the EKFAC scales."""
        return self.steps % self.factor_every == 0 or self._scale_step()

    def _scale_step(self) -> bool:
        return self.ekfac and self.steps % self.scale_every == 0

    def _make_hook(self, layer: _Layer, adapter: LayerAdapter) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if not (torch.is_grad_enabled() and isinstance(output, Tensor)):
                return
            if not output.requires_grad or not self._records_now():
                return
            x = adapter.layer_input(args, kwargs).detach()
            forward = self._forward
            if self.fisher == "mc":
                self._pending.append((layer, adapter, x, output, forward))
            else:
                output.register_hook(lambda g: self._record(layer, adapter, x, g, forward))

        return hook

    def _record(
        self, layer: _Layer, adapter: LayerAdapter, x: Tensor, g: Tensor, forward: int
    ) -> None:
        """Add one call's inputs ``x`` and output gradient ``g`` to this step's sums.

        The calls of one forward pass are positions of the same data points: ``A`` averages
        over all of them, while the data points count once (``c`` of ``Ŝ``).
        """
        n, dtype = g.shape[0], _factor_dtype(layer.weight)
        rows = per_example(adapter.input_rows(x), n, layer.name, "input", self.steps, 0)
        grads = per_example(
            adapter.output_grad_rows(g.detach()[None]), n, layer.name, "output", self.steps, 1
        )
        rows, grads = rows.to(dtype), grads.to(dtype)
        if layer.sums is None:
            layer.sums = FactorSums(adapter, dtype, rows.device, layer.joint)
        layer.sums.add_inputs(rows)
        layer.sums.add_output_grads(grads)
        if forward not in layer.forwards:
            layer.forwards.add(forward)
            layer.points += n
        if self._scale_step():
            ones = (adapter.append_bias(rows) if layer.joint else rows).clone()
            layer.rows.append((forward, ones, grads.clone()))
        self._recorded = True

    def mc_backward(self, output: Tensor, loss_fn: nn.Module) -> None:
        """Record ``fisher="mc"`` statistics: backpropagate labels sampled from ``output``.

        Call it after the forward pass and before (or instead of) the training backward pass:
        it draws one label per loss term from the model's predictive distribution (private
        generator), and backpropagates the gradient of ``loss_fn`` at those labels to the
        covered modules' outputs only (``torch.autograd.grad``, the graph is kept): no
        parameter ``.grad`` changes. It costs about one extra backward pass without the weight
        gradients.

        Raises:
            RuntimeError: If ``fisher`` is not ``"mc"``.
            ValueError: If ``loss_fn``'s reduction differs from ``reduction``.
        """
        if self.fisher != "mc":
            raise RuntimeError("mc_backward is for fisher='mc'; this preconditioner is empirical.")
        likelihood = get_likelihood(loss_fn)
        if likelihood.reduction != self.reduction:
            raise ValueError(
                f"loss_fn has reduction={likelihood.reduction!r} but the preconditioner "
                f"reduction={self.reduction!r}."
            )
        pending, self._pending = self._pending, []
        if not pending:
            return
        likelihood.check(output, None)
        terms = likelihood.to_terms(output.detach())
        if self._generator is None or self._generator.device != terms.device:
            self._generator = torch.Generator(device=terms.device).manual_seed(self._seed)
        labels = likelihood.sample(terms, 1, self._generator)
        vectors = likelihood.gradient(terms, labels)  # [1, M, C]
        divisor = likelihood.mean_divisor(terms.shape[0], terms.shape[-1])
        vector = likelihood.from_terms(vectors, output)[0] / divisor
        grads = torch.autograd.grad(
            output,
            [item[3] for item in pending],
            grad_outputs=vector.to(output.dtype),
            retain_graph=True,
            allow_unused=True,
        )
        for (layer, adapter, x, _, forward), g in zip(pending, grads, strict=True):
            if g is not None:
                self._record(layer, adapter, x, g, forward)

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
            RuntimeError: If no backward pass was recorded before the first step.
        """
        if self.steps == 0 and not self._recorded:
            raise RuntimeError(
                "step() before any recorded backward pass: run the forward pass and "
                "loss.backward() first"
                + (" (and mc_backward for fisher='mc')." if self.fisher == "mc" else ".")
            )
        damping = self._value("damping", self.damping)
        self._pending = []
        try:
            if not self._update_factors():
                return False
            if self.steps % self.inverse_every == 0 or any(
                lay.decomposed is None and lay.A is not None for lay in self._layers.values()
            ):
                self._decompose(damping)
            if self._scale_step():
                self._update_scales()
            self._precondition(damping)
        finally:
            for layer in self._layers.values():
                layer.sums, layer.rows, layer.points, layer.forwards = None, [], 0, set()
            self._forward += 1  # calls in the next step never join this step's data points
        self.steps += 1
        return True

    def _unscale(self) -> float:
        """``1 / scale²`` of the GradScaler (the recorded output gradients carry ``scale``)."""
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return 1.0
        return 1.0 / float(self.grad_scaler.get_scale()) ** 2

    def _batch_scale(self, count: int) -> float:
        """``c``: ``N`` for a mean-reduced loss, ``1/N`` for a summed one, ``/ scale²``."""
        return (count if self.reduction == "mean" else 1.0 / count) * self._unscale()

    def _update_factors(self) -> bool:
        """EMA update from this step's sums; ``False`` (and a warning) if any is non-finite."""
        if self.steps % self.factor_every != 0:
            return True
        fresh = {}
        for name, layer in self._layers.items():
            sums = layer.sums
            if sums is None or sums.count == 0:
                continue
            A = sums.input_factor(layer.joint, sums.count)
            S = sums.ggT * self._batch_scale(layer.points)
            # a NaN / Inf in any input or gradient row reaches the diagonal (as a_j², g_j²)
            diagonals = torch.cat([A.diagonal(), S.diagonal()])
            if not bool(torch.isfinite(diagonals).all()):
                if self.grad_scaler is None:
                    warn(
                        f"Non-finite values (NaN or Inf) in the K-FAC statistics of module "
                        f"{name!r} at step {self.steps}: step skipped, gradients unchanged.",
                        RuntimeWarning,
                    )
                return False
            fresh[name] = (A, S)
        eps = self.factor_decay
        for name, (A, S) in fresh.items():
            layer = self._layers[name]
            if layer.A is None:
                layer.A, layer.S = A, S
            else:
                layer.A.mul_(eps).add_(A, alpha=1 - eps)
                layer.S.mul_(eps).add_(S, alpha=1 - eps)  # type: ignore[union-attr]
        return True

    def _decompose(self, damping: float) -> None:
        """Refresh each layer's decompositions; a failure keeps the last good one and warns."""
        for name, layer in self._layers.items():
            if layer.A is None:
                continue
            try:
                parts: list[tuple[Tensor | None, ...]] = []
                for block in layer.blocks():
                    if self.inverse_method == "cholesky":
                        inv = block.inverse(damping, heuristic=True, min_damping=self.min_damping)
                        parts.append((inv.S, inv.A))  # type: ignore[attr-defined]
                    else:
                        s, Q_S, a, Q_A = block.eigen()
                        parts.append((s, Q_S, a, Q_A))
            except (ValueError, RuntimeError) as err:  # NotPSDError, LinAlgError
                warn(
                    f"Decomposing the factors of module {name!r} failed at step {self.steps} "
                    f"({err}); keeping the last good decomposition.",
                    RuntimeWarning,
                )
                continue
            layer.decomposed, layer.cache = parts, None
            if self.ekfac:  # the scales restart from K-FAC's eigenvalues in the new basis
                layer.scales = [s[:, :, None] * a[:, None, :] for s, _, a, _ in parts]  # type: ignore[index]

    def _update_scales(self) -> None:
        """EKFAC: EMA of the batch's per-example second moments in the current basis.

        The calls of one forward pass are joined along the positions first, so that the
        per-example gradient sums over every call before it is squared.
        """
        eps = self.factor_decay
        for layer in self._layers.values():
            if not layer.rows or layer.decomposed is None or layer.scales is None:
                continue
            per_forward: dict[int, list[tuple[Tensor, Tensor]]] = {}
            for forward, x, g in layer.rows:
                per_forward.setdefault(forward, []).append((x, g))
            joined = [
                (torch.cat([x for x, _ in calls], dim=1), torch.cat([g for _, g in calls], dim=2))
                for calls in per_forward.values()
            ]
            c = self._batch_scale(layer.points)
            for i, (_, Q_S, _, Q_A) in enumerate(layer.decomposed):
                is_bias = len(layer.decomposed) == 2 and i == 1
                fresh = torch.zeros_like(layer.scales[i][0])
                for x, g in joined:
                    xa = x.new_ones(*x.shape[:-1], 1) if is_bias else x
                    gt = g @ Q_S[0]  # type: ignore[index]
                    at = xa if Q_A is None else xa @ Q_A[0]
                    fresh += rotated_second_moment(gt, at)
                layer.scales[i].mul_(eps).add_(fresh[None], alpha=(1 - eps) * c)
            layer.cache = None

    def _inverse_blocks(self, layer: _Layer, damping: float) -> list[Any]:
        """The per-slot blocks applying the damped inverse to a ``[p, q, k]`` gradient.

        Cached until the damping changes or the decomposition / EKFAC scales are refreshed.
        Factored (π) damping is applied as the explicit inverses ``(S + δ_S I)⁻¹`` and
        ``(A + δ_A I)⁻¹`` (two products per step instead of four rotations).
        """
        assert layer.decomposed is not None
        if layer.cache is not None and layer.cache[0] == damping:
            return layer.cache[1]
        if self.inverse_method == "cholesky":
            out: list[Any] = [
                KroneckerBlock(S_inv, A_inv, layer.name)  # type: ignore[arg-type]
                for S_inv, A_inv in layer.decomposed
            ]
        else:
            out = []
            weight_a = layer.decomposed[0][2]  # π of a separate bias: its weight's A
            for i, (s, Q_S, a, Q_A) in enumerate(layer.decomposed):
                if self.ekfac:
                    lam = layer.scales[i] + damping  # type: ignore[index]
                elif self.damping_mode == "tikhonov":
                    lam = s[:, :, None] * a[:, None, :] + damping  # type: ignore[index]
                else:  # π from the decomposed factors' mean eigenvalues (their traces)
                    d_S, d_A = pi_damping(
                        weight_a.mean(-1),
                        s.mean(-1),
                        damping,
                        self.min_damping,  # type: ignore[union-attr]
                    )
                    S_inv = (Q_S / (s + d_S[:, None])[:, None, :]) @ Q_S.transpose(-1, -2)  # type: ignore[operator, union-attr]
                    A_inv = None
                    if i == 0:
                        A_inv = (Q_A / (a + d_A[:, None])[:, None, :]) @ Q_A.transpose(-1, -2)  # type: ignore[operator, union-attr]
                    out.append(KroneckerBlock(S_inv, A_inv, layer.name))
                    continue
                out.append(EigenBlock(Q_S, Q_A, lam.reciprocal(), layer.name))  # type: ignore[arg-type]
        layer.cache = (damping, out)
        return out

    def _precondition(self, damping: float) -> None:
        updates: list[tuple[_Layer, Tensor, Tensor]] = []
        for layer in self._layers.values():
            if layer.decomposed is None or layer.weight.grad is None:
                continue
            if layer.bias is not None and layer.bias.grad is None:
                continue
            parts = [layer.weight.grad.reshape(-1)]
            if layer.bias is not None:
                parts.append(layer.bias.grad.reshape(-1))  # type: ignore[union-attr]
            grad = torch.cat(parts)[:, None].to(_factor_dtype(layer.weight))
            out = torch.empty_like(grad)
            for slot, block in zip(layer.slots, self._inverse_blocks(layer, damping), strict=True):
                slot.scatter(block.matmat(slot.gather(grad)), out)
            updates.append((layer, grad[:, 0], out[:, 0]))
        nu = 1.0
        if self.kl_clip is not None and self.lr is not None and updates:
            lr = self._value("lr", self.lr)
            vg = sum(float((v * g).sum()) for _, g, v in updates) * lr * lr
            if vg != 0:
                nu = min(1.0, math.sqrt(self.kl_clip / abs(vg)))
        for layer, _, v in updates:
            nw = layer.weight.numel()
            layer.weight.grad.copy_(v[:nw].reshape(layer.weight.shape)).mul_(nu)  # type: ignore[union-attr]
            if layer.bias is not None:
                layer.bias.grad.copy_(v[nw:].reshape(layer.bias.shape)).mul_(nu)  # type: ignore[union-attr]

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter, running factors, decompositions, EKFAC scales and the MC generator."""
        layers = {}
        for name, layer in self._layers.items():
            layers[name] = {
                "A": layer.A,
                "S": layer.S,
                "decomposed": layer.decomposed,
                "scales": layer.scales,
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors are copied to the covered weights' devices).

        Raises:
            ValueError: If the state was saved for other modules or options.
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

        def copy(t: Any, like: Tensor) -> Any:
            if t is None:
                return None
            if isinstance(t, Tensor):
                return t.detach().clone().to(device=like.device)
            return type(t)(copy(u, like) for u in t)

        for name, layer in self._layers.items():
            saved = state["layers"][name]
            layer.A, layer.S = copy(saved["A"], layer.weight), copy(saved["S"], layer.weight)
            layer.decomposed = copy(saved["decomposed"], layer.weight)
            layer.scales = copy(saved["scales"], layer.weight)
            layer.cache = None
        self.steps = int(state["steps"])
        self._generator = None
        if state.get("generator") is not None:
            device = torch.device(state.get("generator_device") or "cpu")
            self._generator = torch.Generator(device=device)
            self._generator.set_state(state["generator"])


def _factor_dtype(weight: Tensor) -> torch.dtype:
    """Factors are float32 for half-precision weights, the weight's dtype otherwise."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
