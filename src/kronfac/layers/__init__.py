"""Layer adapters: one file per layer kind, registered by module type."""

from kronfac.layers import conv, conv1d_hf, embedding, linear  # noqa: F401  (registration)
from kronfac.layers.base import (
    LayerAdapter,
    Slot,
    get_adapter,
    register_layer,
    supported_layers,
    unregister_layer,
)

__all__ = [
    "LayerAdapter",
    "Slot",
    "get_adapter",
    "register_layer",
    "supported_layers",
    "unregister_layer",
]
