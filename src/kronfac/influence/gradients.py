r"""Per-example gradients of the covered modules, batch by batch, from the engine's rows.

One forward pass per batch records every covered module's input ``a`` and, by one backward
pass, the gradient ``g = ∂m/∂s`` of a *measurement* ``m`` at its output ``s``, the rows of
:func:`kronfac.factors.data_pass.run_pass`. The per-example gradient of a module's weight
matrix ``[d_out, d_in]`` is then

.. math::

    ∇_W m_n = \sum_t g_{n,t}\, a_{n,t}^\top,

(a joint bias a last column, with ``a``'s trailing 1), which :mod:`kronfac.influence.blocks`
forms or contracts directly. The measurement of each batch is either

- the training loss, summed over the batch's loss terms: the gradients are the likelihood's
  at the true labels (the empirical Fisher's vectors) with the engine's masks, so terms whose
  target is ``ignore_index`` and, for one term per token, padded positions contribute nothing —
  the same terms the curvature counts;
- or ``measurement(output, y)``, a scalar summed over the batch (influence's query function),
  differentiated by autograd; padded positions of the covered modules are masked as everywhere.

Either way ``g`` at data point ``n``'s positions is that of ``m_n`` alone as long as the model
treats data points independently (no batch statistics), so ``Σ_t g_{n,t} a_{n,t}ᵀ`` is the
gradient of data point ``n``'s term of ``m``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kronfac.errors import warn
from kronfac.factors.data_pass import (
    BatchInfo,
    BatchRows,
    PassSetup,
    PassTally,
    _attention_mask,
    _run_forward,
    batch_size,
    check_outputs_unchanged,
    grad_rows,
    random_modules,
)
from kronfac.factors.hooks import record_calls

__all__ = ["Measurement", "gradient_rows"]

Measurement = Callable[[Tensor, Tensor], Tensor]


def gradient_rows(
    setup: PassSetup,
    model: nn.Module,
    data: Iterable[Any],
    measurement: Measurement | None,
    what: str,
) -> Iterator[BatchRows]:
    """Every batch's inputs and measurement gradients at the covered modules (module docstring).

    Args:
        setup: The pass's modules and options (``fisher="empirical"``: the loss's gradients at
            the true labels).
        model: The model; its hooks are removed when the iteration ends, also early.
        data: Batches ``(X, y)``.
        measurement: ``measurement(output, y) -> scalar``, or ``None`` for the summed loss.
        what: The data's name in error messages (``"train_data"``).

    Yields:
        One :class:`BatchRows` per batch: ``inputs`` ``[n, T, d_in]`` and ``grads``
        ``[1, n, T, d_out]`` per module reached.

    Raises:
        ValueError: ``data`` without data points, a batch that is not a pair, targets that do
            not fit the loss (without a measurement), or a measurement that is not a scalar of
            the output.
        TypeError: Targets of the wrong dtype or kind.
    """
    random = random_modules(model)
    if random:
        warn(
            f"The model is in train mode with active dropout in {', '.join(map(repr, random))}: "
            "its gradients are those of a random sub-network. Call model.eval() first.",
            UserWarning,
        )
    tally = PassTally(setup, fingerprint=False)
    total = 0
    batches = tqdm(
        data,
        total=len(data) if isinstance(data, Sized) else None,
        disable=not setup.options.progress,
        desc=f"kronfac gradients ({what})",
        unit="batch",
    )
    with record_calls(setup.adapters, setup.tied) as calls:
        for b, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(
                    f"{what}, batch {b}: expected a pair (X, y), got {type(batch).__name__}."
                )
            X, y = batch
            for c in calls.values():
                c.clear()
            n, source = batch_size(X, y, setup.options.batch_size_fn, b)
            with torch.enable_grad():
                output = _run_forward(model, X, setup.options.forward, b)
                if measurement is None:
                    info = tally.read(b, X, y, output, n, source)
                    rows = tally.rows(info, calls)
                    rows.grads = tally.gradients(info, rows, calls, per_term=False)
                else:
                    rows = _measured(setup, tally, calls, measurement, X, y, output, n, source, b)
            total += n
            del output
            yield rows
    if total == 0:
        raise ValueError(f"{what} is empty: expected at least one batch (X, y) with data points.")


def _measured(
    setup: PassSetup,
    tally: PassTally,
    calls: Any,
    measurement: Measurement,
    X: Any,
    y: Tensor,
    output: Tensor,
    n: int,
    source: str,
    b: int,
) -> BatchRows:
    """The rows of one batch with the gradients of ``measurement(output, y)`` (autograd)."""
    dtype = torch.float64 if output.dtype == torch.float64 else torch.float32
    info = BatchInfo(b, n, source, output, y, 1, None, _attention_mask(X, n, b), dtype)
    rows = tally.rows(info, calls)
    m = measurement(output, y)
    if not isinstance(m, Tensor) or m.ndim != 0:
        shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(
            f"Batch {b}: query_loss_fn(output, target) must return a scalar tensor (summed over "
            f"the batch), got {shape}."
        )
    if not m.requires_grad:
        raise ValueError(
            f"Batch {b}: query_loss_fn(output, target) does not depend on the model output."
        )
    flat = [(name, c) for name in rows.masks for c in calls[name]]
    check_outputs_unchanged(flat, b)
    outs = [c.output for _, c in flat]
    grads = torch.autograd.grad(m, outs, allow_unused=True) if outs else ()
    per_call = [None if g is None else g.unsqueeze(0) for g in grads]
    rows.grads = grad_rows(flat, per_call, n, dtype, b, rows.masks)
    return rows
