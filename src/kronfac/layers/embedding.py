"""``nn.Embedding``: a Linear layer on one-hot inputs, with a diagonal input factor.

An embedding ``E: [V, D]`` maps token ``i`` to ``E[i] = Eᵀ e_i``, i.e. ``s = W a`` with
``W = Eᵀ: [D, V]`` and ``a = e_i`` one-hot: every position of an input ``[N, ...]`` of indices
is a position. The input factor ``A = 1/(N·T) Σ e_i e_iᵀ`` is diagonal — the tokens' relative
frequencies — and is stored and applied as a ``[V]`` vector, never a ``V × V`` matrix. The
flat layout follows the parameter as stored (row-major ``[V, D]``).

The row at ``padding_idx`` receives no gradient in torch, so its count is set to zero (its
curvature is zero). ``approx="reduce"`` would average one-hot vectors into a dense ``V × V``
factor and is not supported for embeddings; nor are ``max_norm`` (it rewrites the weight in the
forward pass) and ``scale_grad_by_freq`` (it rescales the gradient by batch counts).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kronfac.layers.base import LayerAdapter, register_layer

__all__ = ["EmbeddingAdapter"]


@register_layer(nn.Embedding)
class EmbeddingAdapter(LayerAdapter):
    """Adapter of :class:`torch.nn.Embedding` (see the module docstring)."""

    module: nn.Embedding
    diagonal_input = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if self.module.max_norm is not None or self.module.scale_grad_by_freq:
            raise NotImplementedError(
                "nn.Embedding with max_norm or scale_grad_by_freq is not supported: expected "
                "max_norm=None and scale_grad_by_freq=False."
            )

    @property
    def bias(self) -> nn.Parameter | None:  # noqa: D102
        return None

    @property
    def in_features(self) -> int:  # noqa: D102
        return self.module.num_embeddings

    @property
    def out_features(self) -> int:  # noqa: D102
        return self.module.embedding_dim

    @property
    def inert_inputs(self) -> tuple[int, ...]:
        """``padding_idx``, whose row gets no gradient in torch (its count is zeroed)."""
        pad = self.module.padding_idx
        return () if pad is None else (pad,)

    def input_diagonal(self, idx: Tensor, weights: Tensor | None = None) -> Tensor:
        """Token counts ``[V]`` (weighted by ``weights`` per row), zero at ``padding_idx``."""
        dtype = torch.float32 if weights is None else weights.dtype
        counts = torch.bincount(idx.reshape(-1), weights, minlength=self.in_features).to(dtype)
        counts[list(self.inert_inputs)] = 0
        return counts

    def input_rows(self, x: Tensor) -> Tensor:  # noqa: D102
        return x.reshape(-1, 1)

    def output_grad_rows(self, g: Tensor) -> Tensor:  # noqa: D102
        return g.reshape(g.shape[0], -1, self.out_features)

    def weight_to_matrix(self, w: Tensor) -> Tensor:  # noqa: D102
        return w.reshape(self.in_features, self.out_features, -1).transpose(0, 1)

    def matrix_to_weight(self, m: Tensor) -> Tensor:  # noqa: D102
        return m.transpose(0, 1).reshape(-1, m.shape[-1])
