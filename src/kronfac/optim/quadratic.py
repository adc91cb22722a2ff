r"""The quadratic model of a step: the exact Gauss-Newton matrix of the batch, along directions.

For parameters ``θ`` (the covered ones), the training loss ``L`` of a batch, its gradient ``g``
and the Gauss-Newton matrix ``G = Jᵀ H J`` (``J`` the Jacobian of the loss input — the model
output — with respect to ``θ``, ``H`` the loss's Hessian in output space), a step
``δ = Σ_i c_i t_i`` along directions ``t_i`` (the preconditioned gradient, the previous step)
changes the loss by about

.. math::

    M(c) = g^\top δ + \tfrac12 δ^\top (G + λI) δ = b^\top c + \tfrac12 c^\top Q c, \qquad
    Q_{ij} = (J t_i)^\top H (J t_j) + λ\, t_i^\top t_j, \quad b_i = g^\top t_i,

minimised by ``c = −Q⁻¹ b`` with ``M = −½ bᵀ Q⁻¹ b`` (Martens & Grosse, 2015, §7: the
learning rate and the momentum from the quadratic model). ``J t`` is a Jacobian-vector product
of the model's forward pass: exact forward-mode differentiation (:func:`torch.func.jvp`), or a
one-sided finite difference ``(f(θ + εt) − f(θ)) / ε`` with ``ε`` a relative step of
``√(machine ε)``-order, one forward pass each. ``H`` is applied in output space by the
likelihood (:meth:`~kronfac.likelihoods.Likelihood.hessian_matvec`), scaled as the loss is:
divided by the entries a mean averages over (``ignore_index`` terms left out).

The batches are re-run as they were recorded — the same arguments, the RNG state of their
forward pass (the same dropout masks), copies of the buffers (batch-norm statistics are not
updated) — through :func:`torch.func.functional_call`, so the model itself is never changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from kronfac.distributed import all_reduce_sums
from kronfac.likelihoods import Likelihood

__all__ = ["GGN_PRODUCTS", "QuadraticModel", "RecordedBatch"]

GGN_PRODUCTS = ("fd", "jvp")


@dataclass
class RecordedBatch:
    """One batch of a training step, as the quadratic model re-runs it.

    Attributes:
        args: The model's positional arguments.
        kwargs: Its keyword arguments.
        output: The loss input (detached).
        targets: The targets.
        loss: The loss value the training loop computed.
        entries: The entries the loss averaged over (``1`` for a summed loss).
        keep: ``[M]`` terms the loss counts (``None``: all; ``ignore_index`` drops some).
        rng: The CPU and CUDA RNG states at the start of the forward pass.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Tensor
    targets: Tensor
    loss: float
    entries: int
    keep: Tensor | None
    rng: tuple[Tensor, list[Tensor]]


def rng_state() -> tuple[Tensor, list[Tensor]]:
    """The CPU RNG state and, when CUDA is in use, every device's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


@contextmanager
def _replayed_rng(state: tuple[Tensor, list[Tensor]]) -> Iterator[None]:
    """Run the block with the recorded RNG state; the caller's RNG continues unchanged."""
    cpu, cuda = state
    devices = list(range(len(cuda)))
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
        yield


class _Call(nn.Module):
    """``forward(model, args, kwargs)`` as a module, so its parameters can be substituted."""

    def __init__(self, model: nn.Module, forward: Callable[..., Tensor] | None) -> None:
        super().__init__()
        self.model, self.fn = model, forward

    def forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        if self.fn is not None:
            return self.fn(self.model, kwargs if kwargs and not args else args[0])
        return self.model(*args, **kwargs)


class QuadraticModel:
    """Gauss-Newton products and losses of recorded batches at shifted parameters.

    Directions are flat vectors ``[P]`` over the parameters, in their order (``views`` gives
    the parameter-shaped views of one).

    Args:
        model: The model.
        params: The parameters ``θ`` the directions live in, by name.
        likelihood: The loss's likelihood.
        forward: ``forward(model, X) -> loss input`` when the loss does not take the model's
            output as it is; ``None``: ``model(*args, **kwargs)``.
        products: ``"fd"`` (finite differences, one forward pass per direction) or ``"jvp"``
            (exact forward-mode products).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        likelihood: Likelihood,
        forward: Callable[..., Tensor] | None = None,
        products: str = "fd",
        group: Any = None,
    ) -> None:
        if products not in GGN_PRODUCTS:
            raise ValueError(
                f"Unknown ggn_products {products!r}; expected one of {list(GGN_PRODUCTS)}."
            )
        self.call = _Call(model, forward)
        self.keys = [f"model.{k}" for k in params]
        self.params: list[Tensor] = list(params.values())
        self.sizes = [p.numel() for p in self.params]
        self.likelihood, self.products = likelihood, products
        self.group = group  # torch.distributed: every rank holds its part of each batch
        self._backup: list[Tensor] | None = None  # θ while shifted (not re-entrant)

    def flatten(self, tensors: list[Tensor]) -> Tensor:
        """Parameter-shaped tensors → one flat ``[P]`` vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def views(self, flat: Tensor) -> list[Tensor]:
        """The parameter-shaped views of a flat vector (no copy)."""
        pieces = flat.split(self.sizes)
        return [v.view(p.shape) for v, p in zip(pieces, self.params, strict=True)]

    def _rerun(self, batch: RecordedBatch) -> Tensor:
        """The recorded batch through the model as it is now (no gradients, its RNG state)."""
        with torch.no_grad(), _replayed_rng(batch.rng):
            return self.call(batch.args, batch.kwargs)

    @contextmanager
    def shifted(self, shift: Tensor | None, scale: float = 1.0) -> Iterator[None]:
        """The model at ``θ + scale·shift`` within the block, restored exactly after it.

        The buffers (batch-norm statistics) are restored too. Not re-entrant.
        """
        buffers = list(self.call.buffers())
        kept = [b.clone() for b in buffers]
        try:
            with torch.no_grad():
                if shift is not None:
                    if self._backup is None:
                        self._backup = [torch.empty_like(p) for p in self.params]
                    torch._foreach_copy_(self._backup, self.params)
                    torch._foreach_add_(self.params, self.views(shift), alpha=scale)
            yield
        finally:
            with torch.no_grad():
                if shift is not None:
                    torch._foreach_copy_(self.params, self._backup)  # type: ignore[arg-type]
                if buffers:
                    torch._foreach_copy_(buffers, kept)

    def _products(self, batch: RecordedBatch, directions: Tensor) -> list[Tensor]:
        """``J t`` for every direction (the rows of ``directions [k, P]``)."""
        if self.products == "jvp":
            base = {k: v.detach() for k, v in self.call.named_buffers()}
            base.update((k, v.detach()) for k, v in self.call.named_parameters())
            primal = {k: base[k] for k in self.keys}

            def f(theta: dict[str, Tensor]) -> Tensor:
                state = {**base, **theta}
                with _replayed_rng(batch.rng):
                    return functional_call(self.call, state, (batch.args, batch.kwargs))

            return [
                jvp(f, (primal,), (dict(zip(self.keys, self.views(t), strict=True)),))[1]
                for t in directions
            ]
        with torch.no_grad():
            theta = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.params))))
        rel = math.sqrt(torch.finfo(batch.output.dtype).eps) * 3.0
        out = []
        for t, norm in zip(
            directions, torch.linalg.vector_norm(directions, dim=1).tolist(), strict=True
        ):
            eps = rel * max(theta, 1.0) / max(norm, 1e-30)
            with self.shifted(t, eps):
                out.append((self._rerun(batch) - batch.output) / eps)
        return out

    def curvature(self, batches: list[RecordedBatch], directions: Tensor) -> Tensor:
        """``[(J t_i)ᵀ H (J t_j)]``, ``[k, k]`` in float64, of the mean (sum) over the batches.

        ``directions``: ``[k, P]``. A loss averaged over entries is read as one mean over every
        batch's entries (the batches of a step with gradient accumulation, equal in size).
        """
        k = directions.shape[0]
        G = torch.zeros(k, k, dtype=torch.float64)
        total = sum(b.entries for b in batches)
        for batch in batches:
            Js = [self.likelihood.to_terms(J) for J in self._products(batch, directions)]
            terms = self.likelihood.to_terms(batch.output)
            HJ = [self.likelihood.hessian_matvec(terms, J) for J in Js]
            if batch.keep is not None:
                HJ = [h * batch.keep[:, None].to(h.dtype) for h in HJ]
            flat_HJ = torch.stack([h.reshape(-1) for h in HJ])
            flat_J = torch.stack([j.reshape(-1) for j in Js])
            G += (flat_HJ @ flat_J.T).double()
        G, entries = self._summed(G, total)
        return (G + G.T) / (2 * entries)

    def _summed(self, value: Tensor, total: float) -> tuple[Tensor, float]:
        """``value`` and ``total`` summed over the ranks (as they are without a group)."""
        if self.group is None:
            return value, total
        flat = value.detach().reshape(-1).double().cpu()
        both = torch.cat([flat, flat.new_tensor([total])])
        all_reduce_sums([both], [False], self.group)
        return both[:-1].reshape(value.shape).to(value), float(both[-1])

    def agreed(self, value: Tensor) -> Tensor:
        """``value`` averaged over the ranks: the same bits on every rank (itself without one).

        Inner products of equal vectors can differ in their last bits between processes (the
        BLAS's kernels at other memory alignments); the replicas' steps must not.
        """
        if self.group is None:
            return value
        summed, _ = self._summed(value, 0.0)
        return summed / torch.distributed.get_world_size(self.group)

    def mean_loss(self, values: list[tuple[float, int]]) -> float:
        """The entries-weighted mean of ``(loss, entries)`` pairs, over the ranks' batches."""
        weighted, entries = sum(v * n for v, n in values), sum(n for _, n in values)
        if self.group is None:  # (the step's hot path: no tensor)
            return weighted / entries
        summed, total = self._summed(torch.tensor([weighted], dtype=torch.float64), entries)
        return float(summed[0]) / total

    def loss(self, batches: list[RecordedBatch], shift: Tensor | None = None) -> float:
        """The loss at ``θ + shift`` on the batches: their entries-weighted mean (or sum)."""
        loss_fn = self.likelihood.loss_fn
        values = []
        with self.shifted(shift):
            for batch in batches:
                out = self._rerun(batch)
                with torch.no_grad():
                    values.append((float(loss_fn(out, batch.targets)), batch.entries))
        return self.mean_loss(values)
