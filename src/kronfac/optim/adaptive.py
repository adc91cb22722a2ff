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

A step is rejected — the parameters stay, the momentum restarts and the damping rises by
``1/ω`` — when a batch's loss is not finite, the statistics hold NaN / Inf, the model predicts
no decrease (``M(δ) ≥ 0``) or the loss after the step is not finite (then the step is undone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.optim.quadratic import QuadraticModel, RecordedBatch

__all__ = ["AdaptiveStep"]

Params = dict[str, Tensor]


def _dots(a: Params, b: Params) -> float:
    """``Σ ⟨a_k, b_k⟩`` over the parameters, in float64."""
    return sum(float((a[k] * b[k]).sum(dtype=torch.float64)) for k in a)


class AdaptiveStep:
    """The state and arithmetic of the adaptive step (module docstring).

    Args:
        quadratic: The batch's quadratic model.
        params: The covered parameters, by name.
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
        params: Mapping[str, nn.Parameter],
        *,
        damping: float,
        damping_every: int,
        decay: float,
        min_damping: float,
        max_damping: float,
        momentum: bool,
        weight_decay: float,
    ) -> None:
        self.quadratic, self.params = quadratic, dict(params)
        self.damping = float(damping)
        self.damping_every, self.omega = damping_every, decay**damping_every
        self.min_damping, self.max_damping = min_damping, max_damping
        self.momentum, self.weight_decay = momentum, weight_decay
        self.velocity: Params | None = None
        self.steps = 0
        self.last: dict[str, float] = {}  # the last step's α, β, M, ρ (for reports and tests)

    def raise_damping(self, factor: float = 1.0) -> None:
        """``λ ← λ / ω^factor`` (at most ``max_damping``)."""
        self.damping = min(self.damping / self.omega**factor, self.max_damping)

    def reject(self) -> None:
        """A rejected step: no move, the momentum restarts, the damping rises."""
        self.velocity = None
        self.raise_damping()
        self.steps += 1

    def coefficients(
        self, batches: list[RecordedBatch], g: Params, delta: Params
    ) -> tuple[list[Params], Tensor, float] | None:
        """The directions, their coefficients ``c`` and the model's change ``M`` (or ``None``).

        ``None`` when the model predicts no decrease or is not finite.
        """
        directions = [delta] + ([self.velocity] if self.momentum and self.velocity else [])
        G = self.quadratic.curvature(batches, directions)
        k = len(directions)
        T = torch.tensor(
            [[_dots(directions[i], directions[j]) for j in range(k)] for i in range(k)],
            dtype=torch.float64,
        )
        Q = G + (self.damping + self.weight_decay) * T
        b = torch.tensor([_dots(g, t) for t in directions], dtype=torch.float64)
        c = -torch.linalg.lstsq(Q, b[:, None]).solution[:, 0]
        change = float(0.5 * c @ Q @ c + b @ c)
        self.last = {"alpha": float(c[0]), "beta": float(c[1]) if k > 1 else 0.0, "M": change}
        if not math.isfinite(change) or change >= 0 or not bool(torch.isfinite(c).all()):
            return None
        return directions, c, change

    def move(self, directions: list[Params], c: Tensor, scale: float) -> Params:
        """``δ = scale · Σ c_i t_i`` added to the parameters; it becomes the momentum."""
        step = {
            n: sum(float(scale * c[i]) * t[n] for i, t in enumerate(directions))
            for n in self.params
        }
        with torch.no_grad():
            for n, p in self.params.items():
                p.add_(step[n].to(p.dtype))  # type: ignore[union-attr]
        self.velocity = step  # type: ignore[assignment]
        return step  # type: ignore[return-value]

    def adapt(self, batches: list[RecordedBatch], step: Params, change: float) -> None:
        """Every ``damping_every`` steps, ``ρ`` on the same batches moves ``λ``.

        A loss that is not finite after the step undoes the step and raises ``λ`` fourfold.
        """
        self.steps += 1
        if (self.steps - 1) % self.damping_every:
            return
        total = sum(b.entries for b in batches)
        before = sum(b.loss * b.entries / total for b in batches)
        after = self.quadratic.loss(batches)
        if self.weight_decay:  # the L2 term of the objective: ½ w (‖θ‖² − ‖θ − δ‖²)
            after += (
                0.5
                * self.weight_decay
                * (
                    2 * _dots({n: p.detach() for n, p in self.params.items()}, step)
                    - _dots(step, step)
                )
            )
        if not math.isfinite(after):
            with torch.no_grad():
                for n, p in self.params.items():
                    p.sub_(step[n].to(p.dtype))
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
        """Restore :meth:`state_dict` (the momentum on the parameters' devices)."""
        self.damping, self.steps = float(state["damping"]), int(state["steps"])
        velocity = state["velocity"]
        self.velocity = (
            None
            if velocity is None
            else {n: velocity[n].detach().clone().to(p.device) for n, p in self.params.items()}
        )
