r"""``KFAC``: a torch optimizer taking K-FAC / EKFAC natural-gradient steps with momentum.

Each :meth:`KFAC.step` preconditions the covered gradients (:class:`KFACPreconditioner`, which
records the statistics during the training loop's forward and backward passes) and then, for
every parameter ``θ`` with gradient ``v`` (preconditioned where covered, plain elsewhere:
norms, excluded layers),

.. math::

    m \leftarrow \mu\, m + (v + \lambda \theta), \qquad \theta \leftarrow \theta - \eta\, m,

with momentum ``μ``, weight decay ``λ`` (not preconditioned) and learning rate ``η``; the first
step sets ``m = v + λθ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kronfac.optim.preconditioner import KFACPreconditioner, Schedule

__all__ = ["KFAC"]


class KFAC(torch.optim.Optimizer):
    """SGD with momentum on K-FAC / EKFAC-preconditioned gradients (module docstring).

    Usage::

        loss_fn = nn.CrossEntropyLoss()
        opt = KFAC(model, lr=0.1, loss_fn=loss_fn, damping=1e-3, inverse_every=10)
        for X, y in loader:
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step()

    Args:
        model: The model; every parameter that requires a gradient is updated.
        lr: ``η`` (> 0), or a callable ``step -> η`` (then it overrides ``param_groups``' ``lr``
            at every step; a float works with torch's learning-rate schedulers).
        momentum: ``μ`` in ``[0, 1)``.
        weight_decay: ``λ >= 0``.
        **options: Options of :class:`KFACPreconditioner`: ``loss_fn`` (required: the loss
            module the training loop calls), ``damping``, ``factor_decay``, ``inverse_every``,
            ``kl_clip``, ``ekfac``, ``fisher``, ``grad_scaler``, the engine's options
            (``modules``, ``exclude``, ``rank``, ...); its KL clipping uses ``lr``.

    Attributes:
        preconditioner: The :class:`KFACPreconditioner` (``preconditioner.steps`` counts the
            steps taken).

    Raises:
        ValueError: Out-of-range ``lr``, ``momentum`` or ``weight_decay``, or a bad option.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: Schedule,
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> None:
        schedule: Callable[[int], float] | None = lr if callable(lr) else None
        first = float(schedule(0)) if schedule is not None else lr
        if isinstance(first, bool) or not isinstance(first, (int, float)) or not first > 0:
            raise ValueError(f"lr must be positive, got {first!r}.")
        if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
        if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The model has no parameter that requires a gradient.")
        defaults = {"lr": float(first), "momentum": float(momentum), "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self._schedule = schedule
        self.preconditioner = KFACPreconditioner(model, lr=self._current_lr, **options)

    def _current_lr(self, step: int) -> float:
        return float(self.param_groups[0]["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Precondition the gradients and take the momentum step (module docstring).

        A step whose K-FAC statistics hold NaN / Inf is skipped with a warning naming the
        module: parameters, momentum and factors stay unchanged.

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
        if not self.preconditioner.step():
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
                    self._momentum_step(p, p.grad, lr, mu, wd)
        return loss

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
        """The optimizer's state (momentum buffers, groups) plus the preconditioner's."""
        state = super().state_dict()
        state["kfac"] = self.preconditioner.state_dict()
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
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(kfac)
