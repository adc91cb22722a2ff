"""Scoped forward hooks that record every call of the covered modules."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kronfac.layers import LayerAdapter

__all__ = ["Call", "check_input_dtype", "install_call_hooks", "record_calls"]


@dataclass
class Call:
    """One call of a covered module.

    Holds its input (detached), its output (in the graph), the adapter of the module called
    (a tied module may differ from its block's first module), the output's version counter at
    the call (to detect later in-place changes) and the call's rank in the forward pass.
    """

    inputs: Tensor
    output: Tensor
    adapter: LayerAdapter
    output_version: int = field(default=0)
    order: int = field(default=0)


@contextmanager
def record_calls(
    adapters: Mapping[str, LayerAdapter],
    tied: Mapping[str, list[LayerAdapter]] | None = None,
) -> Iterator[dict[str, list[Call]]]:
    """Record the calls of each module in ``adapters`` while the block runs.

    The calls of the modules in ``tied[name]`` are recorded as calls of block ``name``.

    Yields a dict ``name → [Call, ...]`` that the caller clears between batches. Every hook is
    removed when the block exits, also when it raises.
    """
    calls: dict[str, list[Call]] = {name: [] for name in adapters}
    handles = install_call_hooks(calls, adapters, tied)
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def install_call_hooks(
    calls: dict[str, list[Call]],
    adapters: Mapping[str, LayerAdapter],
    tied: Mapping[str, list[LayerAdapter]] | None = None,
    active: Callable[[], bool] | None = None,
) -> list[RemovableHandle]:
    """Hooks appending every call of the modules of ``adapters`` (and ``tied``) to ``calls``.

    A forward pre-hook refuses inputs of another floating dtype than the module's weight
    (:func:`check_input_dtype`); a forward hook records the :class:`Call`, only while
    ``active()`` (default: always) and gradients are enabled for an output that needs them
    or ``active`` is not given. Returns the handles (the caller removes them).
    """
    counter = itertools.count()

    def make_hook(name: str, adapter: LayerAdapter) -> Any:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            if active is not None and not (
                active() and isinstance(out, Tensor) and out.requires_grad
            ):
                return
            x = adapter.layer_input(args, kwargs).detach()
            calls[name].append(Call(x, out, adapter, out._version, next(counter)))

        return hook

    def make_check(name: str, adapter: LayerAdapter) -> Any:
        def check(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            check_input_dtype(name, adapter.layer_input(args, kwargs), adapter.weight)

        return check

    handles = []
    try:
        for name, adapter in adapters.items():
            for a in [adapter, *(tied or {}).get(name, [])]:
                handles.append(
                    a.module.register_forward_pre_hook(make_check(name, a), with_kwargs=True)
                )
                handles.append(a.module.register_forward_hook(make_hook(name, a), with_kwargs=True))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


def check_input_dtype(name: str, x: Any, weight: Tensor) -> None:
    """Refuse a floating input of another dtype than the module's weight (outside autocast).

    Raises:
        TypeError: Naming the module and both dtypes (torch would fail inside the module).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype == weight.dtype:
        return
    if torch.is_autocast_enabled(x.device.type):
        return
    raise TypeError(
        f"Module {name!r} has {weight.dtype} weights but was called on a {x.dtype} input. "
        f"Cast the data to the model's dtype (X.to({weight.dtype})) or the model to the "
        f"data's (model.to({x.dtype}))."
    )
