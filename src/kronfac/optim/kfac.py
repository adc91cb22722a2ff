r"""``KFAC``: a torch optimizer taking K-FAC / EKFAC natural-gradient steps.

Each :meth:`KFAC.step` preconditions the covered gradients (:class:`KFACPreconditioner`, which
records the statistics during the training loop's forward and backward passes), then moves
the covered parameters

- ``adaptive=True`` (the default): by ``δ = αΔ + βv`` along the preconditioned gradient ``Δ``
  and the previous step ``v``, with ``α``, ``β`` and the damping chosen by the quadratic model
  of the batch's loss with its exact Gauss-Newton matrix (:mod:`kronfac.optim.adaptive`);
  ``lr`` scales the chosen step (default 1);
- ``adaptive=False``: by SGD with momentum ``μ`` and learning rate ``η`` on the
  preconditioned gradients ``v``: ``m ← μ m + (v + wθ)`` (the first step sets ``m``),
  ``θ ← θ − η m`` (``w`` the weight decay).

Parameters no block covers (norms, learned position embeddings, raw parameters, modules left
out) get ``uncovered="adamw"``: AdamW with their own ``uncovered_lr`` (as Muon setups do), or
``"sgd"``: the momentum update above with their plain gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.errors import warn
from kronfac.optim.adaptive import AdaptiveStep
from kronfac.optim.preconditioner import KFACPreconditioner, Schedule
from kronfac.optim.quadratic import GGN_PRODUCTS, QuadraticModel

__all__ = ["KFAC"]

_UNCOVERED = ("adamw", "sgd")


class KFAC(torch.optim.Optimizer):
    """K-FAC / EKFAC steps, adaptive by default (module docstring).

    Usage::

        loss_fn = nn.CrossEntropyLoss()
        opt = KFAC(model, loss_fn=loss_fn)
        for X, y in loader:
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step()

    Args:
        model: The model; every parameter that requires a gradient is updated.
        lr: ``adaptive=True``: a factor on the chosen step (``None``: 1); ``adaptive=False``:
            the learning rate ``η`` (required). A number or a callable ``step -> value`` (then
            it overrides ``param_groups``' ``lr`` at every step; a float works with torch's
            learning-rate schedulers).
        loss_fn: The loss module the training loop calls on the model's output.
        adaptive: Choose the step by the quadratic model (module docstring).
        momentum: ``adaptive=False``: ``μ`` in ``[0, 1)``; ``adaptive=True``: ``0`` drops the
            momentum direction (the learning rate alone is chosen).
        weight_decay: ``w >= 0``: an ``L2`` term ``½ w ‖θ‖²`` of the objective of the covered
            parameters (adaptive) or decoupled (fixed); AdamW's decay for uncovered ones.
        damping: The damping ``λ``: the initial one of the adaptive step, in the units of the
            loss's curvature (a mean loss: per entry it averages over); the preconditioner's
            ``δ = damping_ratio · λ``. ``adaptive=False``: the preconditioner's ``δ`` (a number
            or a schedule).
        damping_every: Adaptive: steps between two Levenberg–Marquardt updates of ``λ``.
        damping_decay: Adaptive: ``λ`` moves by ``damping_decay^damping_every`` per update.
        damping_range: Adaptive: the bounds of ``λ``.
        damping_ratio: Adaptive: ``η`` of the preconditioner's damping ``ηλ``.
        ggn_products: Adaptive: how the Gauss-Newton products are computed: ``"fd"`` (finite
            differences, one forward pass per direction) or ``"jvp"`` (exact forward mode).
        forward: ``forward(model, X) -> loss input`` when the loss does not take the model's
            output as it is (``model(**X).logits.reshape(-1, V)``); the adaptive step re-runs
            the batch through it.
        uncovered: ``"adamw"`` or ``"sgd"`` for the parameters no block covers.
        uncovered_lr: AdamW's learning rate for them.
        fisher: The preconditioner's Fisher type (``"mc"``: the true Fisher).
        factor_every: Steps between two updates of the running factors (every other step:
            half the statistics' cost, measured to lose no wall-clock).
        inverse_every: Steps between two inversions of the running factors.
        inverse_method: ``"cholesky"`` (damped inverses by Cholesky, the damping of the
            latest inversion) or ``"eigen"`` (eigendecompositions, the damping applied at every
            step); ``None``: Cholesky for K-FAC with π damping, eigen for EKFAC and Tikhonov
            damping, which need the eigenbasis.
        **options: Further options of :class:`KFACPreconditioner` (``factor_decay``,
            ``ekfac``, ``damping_mode``, ``kl_clip`` (``adaptive=False`` only),
            ``grad_scaler``, the engine's ``modules``, ``exclude``, ``rank``, ...).

    Attributes:
        preconditioner: The :class:`KFACPreconditioner` (``preconditioner.steps`` counts the
            steps taken).
        adaptive_step: The :class:`~kronfac.optim.adaptive.AdaptiveStep` (its ``damping`` is
            the current ``λ``), or ``None``.

    Raises:
        ValueError: Out-of-range or missing ``lr``, ``momentum``, ``weight_decay`` or damping
            options, or a bad option.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: Schedule | None = None,
        *,
        loss_fn: nn.Module,
        adaptive: bool = True,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: Schedule = 1e-3,
        damping_every: int = 5,
        damping_decay: float = 0.95,
        damping_range: tuple[float, float] = (1e-8, 1e4),
        damping_ratio: float = 1.0,
        ggn_products: str = "fd",
        forward: Callable[[nn.Module, Any], Tensor] | None = None,
        uncovered: str = "adamw",
        uncovered_lr: float = 1e-3,
        fisher: str = "mc",
        factor_every: int = 2,
        inverse_every: int = 10,
        inverse_method: str | None = None,
        **options: Any,
    ) -> None:
        schedule: Callable[[int], float] | None = lr if callable(lr) else None
        given = float(schedule(0)) if schedule is not None else lr
        if given is None and not adaptive:
            raise ValueError("lr is required with adaptive=False.")
        first: float = 1.0 if given is None else given  # type: ignore[assignment]
        _check_positive("lr", first)
        if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
        if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
        if uncovered not in _UNCOVERED:
            raise ValueError(
                f"Unknown uncovered {uncovered!r}; expected one of {list(_UNCOVERED)}."
            )
        _check_positive("uncovered_lr", uncovered_lr)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The model has no parameter that requires a gradient.")
        defaults = {"lr": float(first), "momentum": float(momentum), "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self._schedule = schedule
        if adaptive:
            if "kl_clip" in options:
                raise ValueError("kl_clip applies to adaptive=False (the model sizes the step).")
            options["kl_clip"] = None
            _check_adaptive(damping, damping_every, damping_decay, damping_range, damping_ratio)
        else:
            options.setdefault("lr", self._current_lr)
        self.preconditioner = KFACPreconditioner(
            model,
            loss_fn=loss_fn,
            damping=damping_ratio * damping if adaptive else damping,  # type: ignore[operator]
            fisher=fisher,
            factor_every=factor_every,
            inverse_every=inverse_every,
            inverse_method=_inverse_method(inverse_method, options),
            **options,
        )
        covered = {id(p) for p in self.preconditioner.parameters()}
        names = dict(model.named_parameters())
        self._covered = {n: p for n, p in names.items() if id(p) in covered}
        rest = [p for p in params if id(p) not in covered]
        self._uncovered: torch.optim.Optimizer | None = None
        if uncovered == "adamw" and rest:
            self._uncovered = torch.optim.AdamW(rest, lr=uncovered_lr, weight_decay=weight_decay)
        self._uncovered_ids = {id(p) for p in rest} if self._uncovered is not None else set()
        self.adaptive_step: AdaptiveStep | None = None
        if adaptive:
            self.preconditioner.keep_batches = True
            quadratic = QuadraticModel(
                model,
                self._covered,
                self.preconditioner.setup.likelihood,
                forward,
                _checked_products(ggn_products),
                self.preconditioner.group,
            )
            self.adaptive_step = AdaptiveStep(
                quadratic,
                damping=float(damping),  # type: ignore[arg-type]
                damping_every=damping_every,
                decay=damping_decay,
                min_damping=damping_range[0],
                max_damping=damping_range[1],
                momentum=momentum > 0,
                weight_decay=float(weight_decay),
            )
            self._damping_ratio = float(damping_ratio)
            self._checked_forward = False

    def _current_lr(self, step: int) -> float:
        return float(self.param_groups[0]["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Precondition the gradients and take the step (module docstring).

        A step whose statistics hold NaN / Inf is skipped (with a warning naming the module):
        parameters, momentum and factors stay unchanged; the adaptive step also raises its
        damping.

        Args:
            closure: Re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._schedule is not None:
            lr = float(self._schedule(self.preconditioner.steps))
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"lr at step {self.preconditioner.steps} must be > 0, got {lr}.")
            for group in self.param_groups:
                group["lr"] = lr
        if self.adaptive_step is not None:
            self._adaptive()
            return loss
        if not self.preconditioner.step():
            return loss
        self._step_uncovered()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in self._uncovered_ids:
                    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
                    self._momentum_step(p, p.grad, lr, mu, wd)
        return loss

    def _step_uncovered(self) -> None:
        if self._uncovered is not None:
            with torch.enable_grad():  # (AdamW's own no_grad step)
                self._uncovered.step()

    def _adaptive(self) -> None:
        """One adaptive step (:mod:`kronfac.optim.adaptive`)."""
        adaptive, pre = self.adaptive_step, self.preconditioner
        assert adaptive is not None
        batches, pre.batches = pre.batches, []
        pre._kept.clear()
        if not batches:
            raise RuntimeError(
                "step() without a recorded batch: compute loss = loss_fn(model(X), y) with the "
                "optimizer's loss_fn (or preconditioner.observe(output, y)) and loss.backward() "
                "first."
            )
        if not self._checked_forward:
            self._check_forward(batches[0])
        params = adaptive.quadratic.params
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if adaptive.weight_decay:
            torch._foreach_add_(grads, params, alpha=adaptive.weight_decay)  # type: ignore[arg-type]
        g = adaptive.quadratic.flatten(grads)  # type: ignore[arg-type]
        pre.damping = self._damping_ratio * adaptive.damping
        finite = all(math.isfinite(b.loss) for b in batches)
        if pre.group is not None:  # one rank's non-finite loss rejects the step on every rank
            finite = not pre._any_rank(not finite)
        if not finite:
            pre.discard()
            adaptive.reject()
            warn(
                f"Non-finite loss at step {pre.steps}: step rejected, parameters unchanged, "
                f"damping raised to {adaptive.damping:.3g}.",
                RuntimeWarning,
            )
            return
        if not pre.step():
            adaptive.reject()
            return
        delta = -adaptive.quadratic.flatten([p.grad for p in params])  # type: ignore[misc]
        with pre.quiet():
            found = adaptive.coefficients(batches, g, delta)
        if found is None:
            adaptive.reject()
            return
        directions, c, change = found
        scale = float(self.param_groups[0]["lr"])
        moved = adaptive.move(directions, c, scale)
        with pre.quiet():
            adaptive.adapt(batches, moved, change * scale * (2 - scale))
        self._step_uncovered()

    def _check_forward(self, batch: Any) -> None:
        """The loss input must be what the re-run gives (``forward=`` otherwise)."""
        quadratic = self.adaptive_step.quadratic  # type: ignore[union-attr]
        with self.preconditioner.quiet():
            again = quadratic._rerun(batch)
        same = again.shape == batch.output.shape and torch.allclose(
            again, batch.output, rtol=1e-4, atol=1e-6 * float(batch.output.abs().max())
        )
        if not same:
            raise ValueError(
                "The loss input is not the model's output: the adaptive step re-runs the batch "
                "and needs the function from the model's input to the loss's input. Pass "
                "forward=lambda model, X: ... (e.g. model(**X).logits.reshape(-1, V))."
            )
        self._checked_forward = True

    def _momentum_step(
        self, p: torch.Tensor, grad: torch.Tensor, lr: float, mu: float, wd: float
    ) -> None:
        """``m ← μ m + (v + λθ)`` (the first step sets ``m``), ``θ ← θ − η m``; ``v``: ``grad``."""
        d = grad if wd == 0 else grad.add(p, alpha=wd)
        if mu:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.detach().clone()
            else:
                buf.mul_(mu).add_(d)
            d = buf
        p.add_(d, alpha=-lr)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state: torch's, the preconditioner's, the adaptive step's, AdamW's."""
        state = super().state_dict()
        state["kfac"] = self.preconditioner.state_dict()
        if self.adaptive_step is not None:
            state["kfac_adaptive"] = self.adaptive_step.state_dict()
        if self._uncovered is not None:
            state["kfac_uncovered"] = self._uncovered.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: If the state has no K-FAC part or does not fit this optimizer.
        """
        state_dict = dict(state_dict)
        kfac = state_dict.pop("kfac", None)
        if kfac is None:
            raise ValueError("Not a kronfac.optim.KFAC state: the 'kfac' entry is missing.")
        adaptive = state_dict.pop("kfac_adaptive", None)
        uncovered = state_dict.pop("kfac_uncovered", None)
        if (adaptive is None) != (self.adaptive_step is None):
            raise ValueError("The state was saved with another adaptive setting.")
        if (uncovered is None) != (self._uncovered is None):
            raise ValueError("The state was saved with another uncovered setting.")
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(kfac)
        if self.adaptive_step is not None:
            self.adaptive_step.load_state_dict(adaptive)
        if self._uncovered is not None:
            self._uncovered.load_state_dict(uncovered)


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")


def _check_adaptive(damping: Any, every: Any, decay: Any, bounds: Any, ratio: Any) -> None:
    """The adaptive step's damping options."""
    if callable(damping):
        raise ValueError("damping must be a number with adaptive=True (the step adapts it).")
    _check_positive("damping", damping)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"damping_every must be a positive integer, got {every!r}.")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise ValueError(f"damping_decay must be in (0, 1), got {decay!r}.")
    low, high = bounds
    if not 0 <= low <= damping <= high:
        raise ValueError(
            f"damping_range must hold the damping: 0 <= {low!r} <= {damping!r} <= {high!r}."
        )
    _check_positive("damping_ratio", ratio)


def _inverse_method(method: str | None, options: dict[str, Any]) -> str:
    """The default (``None``): Cholesky, but eigen where the eigenbasis is needed."""
    if method is not None:
        return method
    eigen = options.get("ekfac") or options.get("damping_mode") == "tikhonov"
    return "eigen" if eigen else "cholesky"


def _checked_products(products: str) -> str:
    if products not in GGN_PRODUCTS:
        raise ValueError(
            f"Unknown ggn_products {products!r}; expected one of {list(GGN_PRODUCTS)}."
        )
    return products
