"""transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``): a Linear stored transposed.

``Conv1D(nf, nx)`` computes ``s = a W + b`` with ``W: [nx, nf]`` = ``[d_in, d_out]``, i.e. the
canonical ``[d_out, d_in]`` matrix is ``Wᵀ``. Inputs ``[N, ..., d_in]`` have every leading
dimension after the first as a position, as for ``nn.Linear``. The operator's flat layout still
follows the parameter as stored (row-major ``[d_in, d_out]``); the adapter transposes on the way
in and out of a block. Registered by name, so transformers is never imported for it.
"""

from __future__ import annotations

from torch import Tensor, nn

from kronfac.layers.base import register_layer
from kronfac.layers.linear import LinearAdapter

__all__ = ["Conv1DAdapter"]


@register_layer("transformers.pytorch_utils.Conv1D")
class Conv1DAdapter(LinearAdapter):
    """Adapter of ``transformers.pytorch_utils.Conv1D`` (see the module docstring)."""

    # Conv1D is no nn.Linear: it subclasses LinearAdapter (which bayesian_lora's coverage checks
    # with isinstance) and overrides every member that reads the module as an nn.Linear
    module: nn.Module  # type: ignore[assignment]

    @property
    def in_features(self) -> int:  # noqa: D102
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:  # noqa: D102
        return self.weight.shape[1]

    def weight_to_matrix(self, w: Tensor) -> Tensor:  # noqa: D102
        return w.reshape(self.in_features, self.out_features, -1).transpose(0, 1)

    def matrix_to_weight(self, m: Tensor) -> Tensor:  # noqa: D102
        return m.transpose(0, 1).reshape(-1, m.shape[-1])
