"""Curvature operators built on Kronecker factors.

The flat vectors of an operator list the covered parameters in ``model.named_parameters()``
order, each flattened row-major (DESIGN.md). A module's block acts on its weight read as a
``[d_out, d_in]`` matrix ``V`` (joined by the bias as a last column with ``bias="joint"``) as
``(S ⊗ A) vec(V) = vec(S V Aᵀ)``; with ``bias="separate"`` the bias's block is ``S``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kronfac.factors import KroneckerFactors, compute_factors
from kronfac.layers import LayerAdapter, get_adapter
from kronfac.linalg import kron_matmul

__all__ = ["KFAC"]


class _Block(NamedTuple):
    """One module's block: factors, layout adapter and the slices of its parameters."""

    S: Tensor
    A: Tensor
    adapter: LayerAdapter
    weight: slice
    bias: slice | None
    joint: bool


class KFAC:
    r"""The K-FAC approximation ``K = diag_l(S_l ⊗ A_l)`` of the Fisher / GGN as an operator.

    Build it from data (``KFAC(model, loss_fn, data, **options)``, the options of
    :func:`kronfac.compute_factors`) or from computed factors (:meth:`from_factors`).

    ``K @ v`` takes a flat tensor ``[P]`` or ``[P, k]``, a list of tensors shaped like the
    covered parameters, or a dict keyed by their names, and returns the same kind.

    Attributes:
        factors: The Kronecker factors.
        param_names: Names of the covered parameters, in ``model.named_parameters()`` order.
        shape: ``(P, P)``.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: Iterable[Any], **options: Any):
        self._setup(compute_factors(model, loss_fn, data, **options), model)

    @classmethod
    def from_factors(cls, factors: KroneckerFactors, model: nn.Module) -> KFAC:
        """The operator of precomputed ``factors`` for the parameters of ``model``.

        Raises:
            ValueError: If a module or parameter of ``factors`` is missing from ``model`` or a
                factor's shape does not fit its module.
        """
        if not isinstance(factors, KroneckerFactors):
            raise TypeError(
                f"Expected kronfac.KroneckerFactors (from compute_factors or "
                f"KroneckerFactors.load), got {type(factors).__name__}."
            )
        if not factors:
            raise ValueError("The factors cover no module: there is no operator to build.")
        op = cls.__new__(cls)
        op._setup(factors, model)
        return op

    def _setup(self, factors: KroneckerFactors, model: nn.Module) -> None:
        self.factors = factors
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        covered: dict[str, str] = {}  # parameter name -> module name
        for mod, names in factors.param_names.items():
            for pname in names:
                if pname is not None:
                    if pname not in params:
                        raise ValueError(f"Parameter {pname!r} of the factors is not in the model.")
                    covered[pname] = mod
        self.param_names = [n for n in params if n in covered]
        self._shapes = {n: params[n].shape for n in self.param_names}
        offsets, start = {}, 0
        for n in self.param_names:
            offsets[n] = slice(start, start + params[n].numel())
            start += params[n].numel()
        self.shape = (start, start)
        joint = factors.options.get("bias", "joint") == "joint"
        self._blocks = []
        for mod, (A, S) in factors.items():
            if mod not in modules:
                raise ValueError(f"Module {mod!r} of the factors is not in the model.")
            adapter = get_adapter(modules[mod])
            if adapter is None:
                raise ValueError(f"Module {mod!r} ({type(modules[mod]).__name__}) is unsupported.")
            names = factors.param_names[mod]
            block_joint = joint and names.bias is not None
            d_in = adapter.in_features + int(block_joint)
            if A.shape != (d_in, d_in) or S.shape != (adapter.out_features, adapter.out_features):
                raise ValueError(
                    f"Factors of module {mod!r} have shapes A{tuple(A.shape)}, S{tuple(S.shape)};"
                    f" expected A({d_in}, {d_in}), "
                    f"S({adapter.out_features}, {adapter.out_features})."
                )
            self._blocks.append(
                _Block(
                    S,
                    A,
                    adapter,
                    offsets[names.weight],
                    None if names.bias is None else offsets[names.bias],
                    block_joint,
                )
            )
        self._blocks.sort(key=lambda blk: blk.weight.start)
        self.dtype = next(iter(factors.values())).A.dtype
        self.device = next(iter(factors.values())).A.device

    # -- products ---------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        """``K V`` for ``V: [P, k]``."""
        out = torch.empty_like(V)
        for blk in self._blocks:
            W = blk.adapter.weight_to_matrix(V[blk.weight])
            if blk.joint:
                Wb = torch.cat([W, V[blk.bias].unsqueeze(1)], dim=1)
                KWb = kron_matmul(blk.S, blk.A, Wb)
                out[blk.weight] = blk.adapter.matrix_to_weight(KWb[:, :-1])
                out[blk.bias] = KWb[:, -1]
            else:
                out[blk.weight] = blk.adapter.matrix_to_weight(kron_matmul(blk.S, blk.A, W))
                if blk.bias is not None:
                    out[blk.bias] = blk.S @ V[blk.bias]
        return out

    def __matmul__(self, v: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> Any:
        """``K v`` for a flat ``[P]`` / ``[P, k]`` tensor, a list, or a dict (same kind back)."""
        if isinstance(v, Tensor):
            if v.ndim not in (1, 2) or v.shape[0] != self.shape[1]:
                raise ValueError(
                    f"Expected a vector [{self.shape[1]}] or matrix [{self.shape[1]}, k], "
                    f"got shape {tuple(v.shape)}."
                )
            V = v.reshape(v.shape[0], -1).to(self.dtype)
            return self._matmat(V).reshape(v.shape).to(v.dtype)
        if isinstance(v, Mapping):
            keys, expected = set(v), set(self.param_names)
            if keys != expected:
                raise ValueError(
                    f"Expected a dict keyed by {self.param_names}; missing "
                    f"{sorted(expected - keys)}, unexpected {sorted(keys - expected)}."
                )
            out = self @ [v[n] for n in self.param_names]
            return dict(zip(self.param_names, out, strict=True))
        if isinstance(v, (list, tuple)):
            kind = type(v)
            if len(v) != len(self.param_names) or any(
                not isinstance(t, Tensor) or t.shape != self._shapes[n]
                for t, n in zip(v, self.param_names, strict=False)
            ):
                expected = [tuple(s) for s in self._shapes.values()]
                got = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in v]
                raise ValueError(f"Expected tensors of shapes {expected}, got {got}.")
            flat = torch.cat([t.reshape(-1) for t in v])
            Kv = self @ flat
            sizes = [t.numel() for t in v]
            return kind(p.reshape(t.shape) for p, t in zip(Kv.split(sizes), v, strict=True))
        raise TypeError(f"Expected a Tensor, a list of Tensors or a dict, got {type(v).__name__}.")

    def to_dense(self) -> Tensor:
        """The dense ``[P, P]`` matrix in the parameter layout (for small models and tests)."""
        return self._matmat(torch.eye(self.shape[0], dtype=self.dtype, device=self.device))
