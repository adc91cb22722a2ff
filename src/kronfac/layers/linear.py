"""``nn.Linear``: ``s = W a + b`` on the last dimension, every leading dimension a position.

An input ``[N, d1, ..., d_in]`` has ``T = d1·…`` positions per data point; the weight is stored
as ``[d_out, d_in]``, so its row-major flattening is already the canonical one.
"""

from __future__ import annotations

from torch import Tensor, nn

from kronfac.layers.base import LayerAdapter, register_layer

__all__ = ["LinearAdapter"]


@register_layer(nn.Linear)
class LinearAdapter(LayerAdapter):
    """Adapter of :class:`torch.nn.Linear` (see the module docstring)."""

    module: nn.Linear

    @property
    def in_features(self) -> int:  # noqa: D102
        return self.module.in_features

    @property
    def out_features(self) -> int:  # noqa: D102
        return self.module.out_features

    def input_rows(self, x: Tensor) -> Tensor:  # noqa: D102
        return x.reshape(-1, self.in_features)

    def output_grad_rows(self, g: Tensor) -> Tensor:  # noqa: D102
        return g.reshape(g.shape[0], -1, self.out_features)

    def weight_to_matrix(self, w: Tensor) -> Tensor:  # noqa: D102
        return w.reshape(self.out_features, self.in_features, -1)

    def matrix_to_weight(self, m: Tensor) -> Tensor:  # noqa: D102
        return m.reshape(-1, m.shape[-1])
