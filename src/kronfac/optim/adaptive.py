r"""The adaptive K-FAC step: learning rate, momentum and damping from the quadratic model.

Each step (Martens & Grosse, 2015, §6–7; the recipe of kfac-jax) takes the preconditioned
gradient ``Δ = −(K + ηλI)⁻¹ g`` of the covered parameters (``K`` the K-FAC / EKFAC curvature,
``η`` = ``damping_ratio``) and the previous step ``v``, and moves by ``δ = αΔ + βv`` with
``(α, β)`` minimising the quadratic model of the batch's loss (:mod:`kronfac.optim.quadratic`)

.. math::

    M(α, β) = g^\top δ + \tfrac12 δ^\top (G + (λ + w) I) δ,

``G`` the exact Gauss-Newton matrix of the batch and ``w`` the weight decay (an ``L2`` term of
the objective). Every ``damping_every`` steps the reduction ratio
``ρ = (L(θ + δ) − L(θ)) / M(δ)`` on the same batch moves the damping by Levenberg–Marquardt
(Martens & Grosse, 2015, §6.5): ``λ ← ωλ`` when ``ρ > ¾``, ``λ ← λ/ω`` when ``ρ < ¼``, with
``ω = decay^damping_every``, within ``[min_damping, max_damping]``.

Every supported loss is ``≥ 0``, so no step can decrease the objective ``L + ½w‖θ‖²`` by more
than its value: a model predicting ``−M`` beyond it is outside the region it describes (a
nearly flat Gauss-Newton matrix early in training), and ``λ`` rises by ``1/ω`` until the
prediction is within it — at no cost (``G`` is kept, only the 2x2 system is solved again).

A step is rejected — the parameters stay, the momentum restarts and the damping rises by
``1/ω`` — when a batch's loss is not finite, the statistics hold NaN / Inf, the model predicts
no decrease (``M(δ) ≥ 0``) or the loss after the step is not finite (then the step is undone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kronfac.optim.quadratic import QuadraticModel, RecordedBatch

__all__ = ["AdaptiveStep"]


class AdaptiveStep:
    """The state and arithmetic of the adaptive step (module docstring).

    Directions, gradients and steps are flat vectors over the covered parameters, in the order
    of :class:`~kronfac.optim.quadratic.QuadraticModel` (its ``flatten`` / ``views``).

    Args:
        quadratic: The batch's quadratic model.
        damping: The initial ``λ``.
        damping_every: Steps between two updates of ``λ``.
        decay: ``ω^(1/damping_every)``.
        min_damping: The lower bound of ``λ``.
        max_damping: Its upper bound.
        momentum: Whether the previous step is a second direction.
        weight_decay: ``w``.
    """

    def __init__(
        self,
        quadratic: QuadraticModel,
        *,
        damping: float,
        damping_every: int,
        decay: float,
        min_damping: float,
        max_damping: float,
        momentum: bool,
        weight_decay: float,
    ) -> None:
        self.quadratic = quadratic
        self.damping = float(damping)
        self.damping_every, self.omega = damping_every, decay**damping_every
        self.min_damping, self.max_damping = min_damping, max_damping
        self.momentum, self.weight_decay = momentum, weight_decay
        self.velocity: Tensor | None = None
        self.steps = 0
        self.last: dict[str, float] = {}  # the last step's α, β, M, ρ (for reports and tests)

    def recorded_loss(self, batches: list[RecordedBatch]) -> float:
        """The step's loss as the training loop computed it: the entries-weighted batch mean.

        On torch.distributed, over every rank's part of the batch.
        """
        return self.quadratic.mean_loss([(b.loss, b.entries) for b in batches])

    def raise_damping(self, factor: float = 1.0) -> None:
        """``λ ← λ / ω^factor`` (at most ``max_damping``)."""
        self.damping = min(self.damping / self.omega**factor, self.max_damping)

    def reject(self) -> None:
        """A rejected step: no move, the momentum restarts, the damping rises."""
        self.velocity = None
        self.raise_damping()
        self.steps += 1

    def coefficients(
        self, batches: list[RecordedBatch], g: Tensor, delta: Tensor
    ) -> tuple[Tensor, Tensor, float] | None:
        """The directions ``[k, P]``, their coefficients ``c`` and the model's change ``M``.

        ``None`` when the model predicts no decrease or is not finite.
        """
        rows = [delta] + ([self.velocity] if self.momentum and self.velocity is not None else [])
        directions = torch.stack(rows)
        G = self.quadratic.curvature(batches, directions)
        # inner products in the parameters' dtype (accumulated in it), the 2x2 algebra in float64
        DD = self.quadratic.agreed((directions @ directions.T).double())
        b = self.quadratic.agreed((directions @ g).double())
        bound = self._objective(batches)
        while True:
            Q = G + (self.damping + self.weight_decay) * DD
            c = -torch.linalg.lstsq(Q, b[:, None]).solution[:, 0]
            change = float(0.5 * c @ Q @ c + b @ c)
            if not -change > bound or self.damping >= self.max_damping:
                break
            self.raise_damping()  # a decrease below the loss's floor: outside the trust region
        k = len(rows)
        self.last = {"alpha": float(c[0]), "beta": float(c[1]) if k > 1 else 0.0, "M": change}
        if not math.isfinite(change) or change >= 0 or not bool(torch.isfinite(c).all()):
            return None
        return directions, c, change

    def _objective(self, batches: list[RecordedBatch]) -> float:
        """The objective before the step, ``L + ½ w ‖θ‖²``: the most any step can decrease it."""
        value = self.recorded_loss(batches)
        if self.weight_decay:
            with torch.no_grad():
                norms = torch.stack(torch._foreach_norm(self.quadratic.params))
            value += 0.5 * self.weight_decay * float(norms.square().sum())
        return value

    def move(self, directions: Tensor, c: Tensor, scale: float) -> Tensor:
        """``δ = scale · Σ c_i t_i`` added to the parameters; it becomes the momentum."""
        coefficients = (scale * c).to(directions.dtype).tolist()
        step = directions[0] * coefficients[0]  # elementwise: the same bits on every rank
        for ci, direction in zip(coefficients[1:], directions[1:], strict=True):
            step.add_(direction, alpha=ci)
        params = self.quadratic.params
        with torch.no_grad():
            torch._foreach_add_(params, self.quadratic.views(step))
        self.velocity = step
        return step

    def adapt(self, batches: list[RecordedBatch], step: Tensor, change: float) -> None:
        """Every ``damping_every`` steps, ``ρ`` on the same batches moves ``λ``.

        A loss that is not finite after the step undoes the step and raises ``λ`` fourfold.
        """
        self.steps += 1
        if (self.steps - 1) % self.damping_every:
            return
        before = self.recorded_loss(batches)
        after = self.quadratic.loss(batches)
        if self.weight_decay:  # the L2 term of the objective: ½ w (‖θ‖² − ‖θ − δ‖²)
            theta = self.quadratic.flatten([p.detach() for p in self.quadratic.params])
            after += 0.5 * self.weight_decay * float(2 * theta @ step - step @ step)
        if not math.isfinite(after):
            with torch.no_grad():
                torch._foreach_sub_(self.quadratic.params, self.quadratic.views(step))
            self.velocity = None
            self.raise_damping(4.0)
            return
        rho = (after - before) / change
        self.last["rho"] = rho
        if rho > 0.75:
            self.damping = max(self.damping * self.omega, self.min_damping)
        elif rho < 0.25:
            self.raise_damping()

    def state_dict(self) -> dict[str, Any]:
        """``λ``, the momentum direction and the step counter."""
        return {"damping": self.damping, "velocity": self.velocity, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the momentum on the parameters' device).

        Raises:
            ValueError: If the momentum direction does not fit the covered parameters.
        """
        velocity = state["velocity"]
        size = sum(self.quadratic.sizes)
        if velocity is not None and velocity.shape != (size,):
            raise ValueError(
                f"The state's momentum direction has shape {tuple(velocity.shape)}, the "
                f"covered parameters {size} entries."
            )
        self.damping, self.steps = float(state["damping"]), int(state["steps"])
        device = self.quadratic.params[0].device
        self.velocity = None if velocity is None else velocity.detach().clone().to(device)
