"""The layer interface: how a module's input and output gradient become Kronecker factors.

Every supported layer computes ``s = W a (+ b)`` at one or more *positions* per data point. An
adapter brings the layer's input into the canonical ``[rows, d_in]`` format (``rows`` = data
points × positions, the engine regroups them per data point) and the gradient with respect to
the layer's output into ``[K, rows, d_out]``. It also says how the weight, stored however the
module stores it, reads as a ``[d_out, d_in]`` matrix, so that the layer's curvature block is
``S ⊗ A`` in the row-major flattening of that matrix.

A new layer type is one new file with a :class:`LayerAdapter` subclass decorated with
:func:`register_layer`; :func:`unregister_layer` takes it out again (tests, replacing an adapter).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from kronfac.registry import Registry

__all__ = [
    "LayerAdapter",
    "Slot",
    "get_adapter",
    "register_layer",
    "supported_layers",
    "unregister_layer",
]


class LayerAdapter(ABC):
    """Canonical view of one module (see the module docstring).

    Args:
        module: The module to adapt.
    """

    #: Whether the input factor is diagonal: :meth:`input_rows` then returns the indices
    #: ``[rows, 1]`` of one-hot inputs (an embedding's tokens), never the one-hot rows.
    diagonal_input: bool = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def weight(self) -> nn.Parameter:
        """The weight parameter (default: ``module.weight``)."""
        # nn.Module.__getattr__ is typed Tensor | Module; a supported layer's weight is a Parameter
        return cast(nn.Parameter, self.module.weight)

    @property
    def bias(self) -> nn.Parameter | None:
        """The bias parameter, or ``None`` (default: ``module.bias`` if present)."""
        return getattr(self.module, "bias", None)

    @property
    @abstractmethod
    def in_features(self) -> int:
        """``d_in``, the input side of the weight matrix (without the bias column), per group."""

    @property
    @abstractmethod
    def out_features(self) -> int:
        """``d_out``, the output side of the weight matrix, per group."""

    def rows_key(self) -> tuple[Any, ...]:
        """What :meth:`input_rows` depends on besides the tensor.

        Modules fed the same tensor with equal keys share their input rows (and one GEMM).
        """
        return (type(self), self.in_features)

    def layer_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """The tensor the weight multiplies, from the arguments of one call of the module."""
        return args[0] if args else next(iter(kwargs.values()))

    @property
    def groups(self) -> int:
        """``g``: independent weight blocks (a grouped convolution's groups), 1 for most layers.

        With ``g > 1`` the ``[g·d_out, d_in]`` weight matrix holds one ``[d_out, d_in]`` block per
        group (rows), the input rows ``[rows, g·d_in]`` one ``d_in`` slice per group, and the
        factors get a leading group dimension: ``A: [g, d_in, d_in]``, ``S: [g, d_out, d_out]``.
        """
        return 1

    @property
    def inert_inputs(self) -> tuple[int, ...]:
        """Input coordinates whose weight columns never get a gradient (zero curvature).

        An embedding's ``padding_idx``; none for most layers.
        """
        return ()

    def append_bias(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Input rows ``[..., d]`` of one group joined by the bias: ``[..., d + 1]``.

        The bias is a last column of the weight matrix, so its input is a trailing 1 — or
        ``mask``'s 0 at padded positions (``mask`` of the shape ``x.shape[:-1]``).
        """
        ones = x.new_ones(*x.shape[:-1], 1) if mask is None else mask[..., None].to(x.dtype)
        return torch.cat([x, ones], dim=-1)

    def input_diagonal(self, idx: Tensor, weights: Tensor | None = None) -> Tensor:
        """A diagonal input factor's sum ``Σ_rows w e_i`` over one-hot rows: ``[d_in]``.

        ``idx`` holds the indices of :meth:`input_rows` (``diagonal_input`` layers only),
        ``weights`` one weight per row (``None``: 1); inert inputs count 0.

        Raises:
            NotImplementedError: For a layer with a dense input factor.
        """
        raise NotImplementedError(f"{type(self).__name__} has a dense input factor.")

    def slots(self, weight: slice, bias: slice | None, joint: bool) -> tuple[Slot, ...]:
        """The block(s) of this layer in a flat parameter vector.

        One :class:`Slot` for the weight, joined by the bias as a last column when ``joint``
        (or without a bias); the weight's and the bias's own slots otherwise.

        Args:
            weight: The weight's slice of the flat vector.
            bias: The bias's slice, or ``None`` without a (covered) bias.
            joint: Whether the bias joins the weight's block.
        """
        if joint or bias is None:
            return (Slot(self, weight, bias),)
        return (Slot(self, weight, None), Slot(self, None, bias))

    @abstractmethod
    def input_rows(self, x: Tensor) -> Tensor:
        """Layer input of one call → ``[rows, d_in]``, rows ordered data point by data point.

        May instead return ``[N, T, d_in]`` directly, e.g. a transposed view of channels-first
        data that a reshape to rows would copy.
        """

    @abstractmethod
    def output_grad_rows(self, g: Tensor) -> Tensor:
        """Output gradients ``[K, *output.shape]`` of one call → ``[K, rows, d_out]``.

        May instead return ``[K, N, T, d_out]`` directly (a view, as for :meth:`input_rows`).
        """

    @abstractmethod
    def weight_to_matrix(self, w: Tensor) -> Tensor:
        """Flat weight vectors ``[numel(W), k]`` → ``[d_out, d_in, k]``."""

    @abstractmethod
    def matrix_to_weight(self, m: Tensor) -> Tensor:
        """Inverse of :meth:`weight_to_matrix`: ``[d_out, d_in, k]`` → ``[numel(W), k]``."""


@dataclass(frozen=True)
class Slot:
    """Where a block's ``[p, q]`` matrix lives in a flat parameter vector.

    ``weight`` / ``bias`` are slices of the flat vector; a block holds the weight (read through
    the adapter), the bias as a ``[p, 1]`` column, or both joined (``[p, q + 1]``).
    """

    adapter: LayerAdapter
    weight: slice | None
    bias: slice | None

    def gather(self, V: Tensor) -> Tensor:
        """``[P, k]`` → the block's ``[p, q, k]``."""
        return self.join(
            None if self.weight is None else V[self.weight],
            None if self.bias is None else V[self.bias],
        )

    def scatter(self, M: Tensor, out: Tensor) -> None:
        """Write the block's ``[p, q, k]`` back into ``out: [P, k]``."""
        weight, bias = self.split(M)
        if weight is not None:
            out[self.weight] = weight
        if bias is not None:
            out[self.bias] = bias

    def join(self, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """The block's ``[p, q, k]`` from its parts (``None`` for a part the slot does not hold).

        The parts are the weight's ``[numel(W), k]`` and the bias's ``[p, k]``. A view of a
        lone part where the adapter's layout allows one; one copy for both.
        """
        parts = []
        if self.weight is not None:
            assert weight is not None  # the slot holds the weight
            parts.append(self.adapter.weight_to_matrix(weight))
        if self.bias is not None:
            assert bias is not None  # the slot holds the bias
            parts.append(bias.unsqueeze(1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def split(self, M: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Inverse of :meth:`join`: the block's ``[p, q, k]`` → ``([numel(W), k], [p, k])``."""
        weight = bias = None
        if self.weight is not None:
            weight = self.adapter.matrix_to_weight(M[:, :-1] if self.bias is not None else M)
        if self.bias is not None:
            bias = M[:, -1]
        return weight, bias


def register_layer(
    module_type: type[nn.Module] | str,
) -> Callable[[type[LayerAdapter]], type[LayerAdapter]]:
    """Class decorator registering a :class:`LayerAdapter` for a module type (and subclasses).

    ``module_type`` may also be a qualified name ``"package.module.Class"``, for layers of
    optional dependencies (transformers' ``Conv1D``) that must not be imported to register.
    Registering a type's adapter again changes nothing; another adapter for a registered type
    is refused: :func:`unregister_layer` the type first to replace its adapter.

    Args:
        module_type: The module type, or its qualified name.

    Returns:
        The decorator, which returns the adapter class unchanged.

    Raises:
        TypeError: (from the decorator) If the decorated class is not a :class:`LayerAdapter`.
        ValueError: (from the decorator) If ``module_type`` already has another adapter.
    """
    return _REGISTRY.register(module_type)


def unregister_layer(module_type: type[nn.Module] | str) -> type[LayerAdapter]:
    """Remove the adapter of ``module_type``, the key it was registered with (for tests).

    The type is unsupported afterwards, unless a base class along its MRO has an adapter.

    Args:
        module_type: The module type, or the qualified name, given to :func:`register_layer`.

    Returns:
        The adapter class that was registered (to register it again).

    Raises:
        KeyError: If no adapter is registered under ``module_type``.
    """
    return _REGISTRY.unregister(module_type)


def get_adapter(module: nn.Module) -> LayerAdapter | None:
    """The adapter of ``module``'s type (looked up along its MRO), or ``None`` if unsupported."""
    for cls in type(module).__mro__:
        adapter = _REGISTRY.get(cls) or _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}")
        if adapter is not None:
            return adapter(module)
    return None


def supported_layers() -> tuple[str, ...]:
    """Names of the module types with a registered adapter, in registration order."""
    return _REGISTRY.names()


def _layer_name(module_type: type | str) -> str:
    """``nn.Linear`` for torch's layers, the qualified name for others (or the name given)."""
    if isinstance(module_type, str):
        return module_type
    if module_type.__module__.startswith("torch.nn."):
        return f"nn.{module_type.__name__}"
    return f"{module_type.__module__}.{module_type.__qualname__}"


# keyed by module type or qualified name (get_adapter looks up each class of an MRO)
_REGISTRY: Registry[type | str, type[LayerAdapter]] = Registry(
    LayerAdapter,
    "adapter",
    "layer adapter",
    "layer",
    _layer_name,
)
