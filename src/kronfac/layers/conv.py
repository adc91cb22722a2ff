r"""``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: a Linear layer over image patches (im2col).

A convolution with weight ``[C_out, C_in, k_1, ..., k_d]`` computes, at every output location
``t``, ``s_t = W a_t + b`` with ``W`` the weight read as ``[C_out, C_in·k_1·…·k_d]`` (its
row-major flattening, so the operator's layout is the parameter's own) and ``a_t`` the input
patch under the kernel at ``t``, channel-major like the weight (Grosse & Martens, 2016). The
output locations are the positions: ``T = L_1·…·L_d``.

The patches are extracted after padding (zeros, ``"same"``, ``"valid"`` or an explicit
padding, and the module's ``padding_mode``) by one strided slice per kernel offset, honouring
stride and dilation. This is im2col: the channels-first patch tensor ``[N, C_in·k_1·…·k_d, T]`` is
materialised once per batch and layer (``k_1·…·k_d`` times the input's size for stride 1) and
handed to the engine as a transposed view, so the input factor's GEMMs (one per data point,
``P_n P_nᵀ``) read it without a second, transposing copy; nothing larger is held. The output
gradients ``[K, N, C_out, T]`` are used the same way, in place.

A grouped convolution (``groups = g``) is ``g`` independent convolutions: output channels of
group ``j`` see only the input channels of group ``j``. Its block is block-diagonal with one
Kronecker product ``S_j ⊗ A_j`` per group, from the patches of group ``j``'s input channels (a
contiguous slice of the im2col columns) and the gradients of its output channels; the factors
have a leading group dimension (``A: [g, q, q]``, ``S: [g, p, p]``).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kronfac.layers.base import LayerAdapter, register_layer

__all__ = ["ConvAdapter", "im2col", "patches"]


def patches(x: Tensor, conv: nn.modules.conv._ConvNd, buffer: Tensor | None = None) -> Tensor:
    """Input patches ``[N, C_in·∏k, L]`` of ``conv`` for an input ``[N, C_in, *spatial]``.

    Channels-first like :func:`torch.nn.functional.unfold`: rows ordered by input channel, then
    kernel offset (row-major), matching ``weight.flatten(1)``; columns by output location
    (row-major over ``L_1, ..., L_d``). Built by one strided-slice copy per kernel offset, into
    the 1-d ``buffer`` when it is large enough (reused across batches: a fresh allocation of
    this size costs more in page faults than the copy itself).
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
    ks, strides, dils = conv.kernel_size, conv.stride, conv.dilation
    L = [
        (size - dil * (k - 1) - 1) // s + 1
        for size, k, s, dil in zip(x.shape[2:], ks, strides, dils, strict=True)
    ]
    N, C = x.shape[:2]
    shape = (N, C, math.prod(ks), *L)
    size = math.prod(shape)
    if (
        buffer is not None
        and buffer.numel() >= size
        and (buffer.dtype, buffer.device) == (x.dtype, x.device)
    ):
        out = buffer[:size].view(shape)
    else:
        out = x.new_empty(shape)
    for j, offset in enumerate(itertools.product(*(range(k) for k in ks))):
        window = (
            slice(o * dil, o * dil + s * (n - 1) + 1, s)
            for o, dil, s, n in zip(offset, dils, strides, L, strict=True)
        )
        index = (slice(None), slice(None), *window)
        out[:, :, j] = x[index]
    return out.reshape(N, C * math.prod(ks), math.prod(L))


def im2col(x: Tensor, conv: nn.modules.conv._ConvNd) -> Tensor:
    """Input patches as rows ``[N·L, C_in·∏k]`` (data point, then location; see :func:`patches`)."""
    P = patches(x, conv)
    return P.transpose(1, 2).reshape(-1, P.shape[1])


@register_layer(nn.Conv1d)
@register_layer(nn.Conv2d)
@register_layer(nn.Conv3d)
class ConvAdapter(LayerAdapter):
    """Adapter of 1-, 2- and 3-d convolutions (see the module docstring)."""

    module: nn.modules.conv._ConvNd

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self._buffer: Tensor | None = None

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

    def input_rows(self, x: Tensor) -> Tensor:
        """Patches as a view ``[N, L, C_in·∏k]`` of a channels-first buffer.

        The buffer is reused by the next call of this adapter: the engine consumes (or copies)
        the rows of one call before asking for the next.
        """
        P = patches(x, self.module, self._buffer)
        if self._buffer is None or P.numel() > self._buffer.numel():
            self._buffer = P.view(-1)
        return P.transpose(1, 2)

    def output_grad_rows(self, g: Tensor) -> Tensor:  # noqa: D102
        # [K, N, C_out, *L] -> [K, N, L, C_out], a view of the channels-first gradients
        return g.flatten(3).transpose(2, 3)

    def weight_to_matrix(self, w: Tensor) -> Tensor:  # noqa: D102
        return w.reshape(self.module.out_channels, self.in_features, -1)

    def matrix_to_weight(self, m: Tensor) -> Tensor:  # noqa: D102
        return m.reshape(-1, m.shape[-1])
