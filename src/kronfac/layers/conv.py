r"""``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: a Linear layer over image patches (im2col).

A convolution with weight ``[C_out, C_in, k_1, ..., k_d]`` computes, at every output location
``t``, ``s_t = W a_t + b`` with ``W`` the weight read as ``[C_out, C_in·k_1·…·k_d]`` (its
row-major flattening, so the operator's layout is the parameter's own) and ``a_t`` the input
patch under the kernel at ``t``, channel-major like the weight (Grosse & Martens, 2016). The
output locations are the positions: ``T = L_1·…·L_d``.

The patches are extracted with ``Tensor.unfold`` per spatial dimension after padding (zeros,
``"same"``, ``"valid"`` or an explicit padding, and the module's ``padding_mode``), honouring
stride and dilation. This is im2col: the patch matrix ``[N·T, C_in·k_1·…·k_d]`` is
materialised once per batch and layer (``k_1·…·k_d`` times the input's size for stride 1),
which is what the input factor's GEMM consumes; nothing larger is held.

A grouped convolution (``groups = g``) is ``g`` independent convolutions: output channels of
group ``j`` see only the input channels of group ``j``. Its block is block-diagonal with one
Kronecker product ``S_j ⊗ A_j`` per group, from the patches of group ``j``'s input channels (a
contiguous slice of the im2col columns) and the gradients of its output channels; the factors
have a leading group dimension (``A: [g, q, q]``, ``S: [g, p, p]``).
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kronfac.layers.base import LayerAdapter, register_layer

__all__ = ["ConvAdapter", "im2col"]


def im2col(x: Tensor, conv: nn.modules.conv._ConvNd) -> Tensor:
    """Input patches ``[N·L, C_in·∏k]`` of ``conv`` for an input ``[N, C_in, *spatial]``.

    Rows are ordered by data point, then output location (row-major over ``L_1, ..., L_d``);
    columns by input channel, then kernel offset (row-major), matching ``weight.flatten(1)``.
    """
    d = len(conv.kernel_size)
    if x.ndim != d + 2:
        raise ValueError(
            f"{type(conv).__name__}: expected a batched input [N, C, {d} spatial dims], "
            f"got shape {tuple(x.shape)}."
        )
    pad = conv._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    for i, (k, s, dil) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)):
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)  # appends a window dimension
        if dil > 1:
            x = x[..., ::dil]
    N, C = x.shape[:2]
    locations, kernel = x.shape[2 : 2 + d], x.shape[2 + d :]
    perm = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    return x.permute(perm).reshape(N * math.prod(locations), C * math.prod(kernel))


@register_layer(nn.Conv1d)
@register_layer(nn.Conv2d)
@register_layer(nn.Conv3d)
class ConvAdapter(LayerAdapter):
    """Adapter of 1-, 2- and 3-d convolutions (see the module docstring)."""

    module: nn.modules.conv._ConvNd

    @property
    def weight(self) -> nn.Parameter:  # noqa: D102
        return self.module.weight

    @property
    def bias(self) -> nn.Parameter | None:  # noqa: D102
        return self.module.bias

    @property
    def in_features(self) -> int:  # noqa: D102
        return self.module.weight[0].numel()

    @property
    def out_features(self) -> int:  # noqa: D102
        return self.module.out_channels // self.module.groups

    @property
    def groups(self) -> int:  # noqa: D102
        return self.module.groups

    def rows_key(self) -> tuple[Any, ...]:  # noqa: D102
        m = self.module
        return (
            *super().rows_key(),
            m.kernel_size,
            m.stride,
            m.dilation,
            tuple(m._reversed_padding_repeated_twice),
            m.padding_mode,
        )

    def input_rows(self, x: Tensor) -> Tensor:  # noqa: D102
        return im2col(x, self.module)

    def output_grad_rows(self, g: Tensor) -> Tensor:  # noqa: D102
        # [K, N, C_out, *L] -> [K, N·L, C_out]
        return g.movedim(2, -1).reshape(g.shape[0], -1, self.module.out_channels)

    def weight_to_matrix(self, w: Tensor) -> Tensor:  # noqa: D102
        return w.reshape(self.module.out_channels, self.in_features, -1)

    def matrix_to_weight(self, m: Tensor) -> Tensor:  # noqa: D102
        return m.reshape(-1, m.shape[-1])
