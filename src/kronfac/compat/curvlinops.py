r"""curvlinops' ``KFACLinearOperator`` / ``EKFACLinearOperator``, computed by kronfac.

Replace ``from curvlinops import KFACLinearOperator`` by
``from kronfac.compat.curvlinops import KFACLinearOperator``: the constructor, the methods and
the matrices are those of curvlinops 3.0.1 for the same inputs (the MC labels included: the
same ``seed`` draws the same labels), with ``inverse`` as a method.

Conventions (shared with curvlinops). The flat vectors list ``params`` in the order given, each
flattened row-major. A layer with weight ``W: [d_out, d_in]`` and bias ``b`` has the block
``S ⊗ A`` on ``vec(W)`` (``A`` the uncentred second moment of the inputs, with a trailing 1 for
the bias unless ``separate_weight_and_bias``, ``S`` that of the output gradients) and, for a
separate bias, ``S`` alone. With ``reduction="mean"`` the loss is divided by the number of
entries torch averages over, ``S`` by the same count. Sequences follow ``kfac_approx``:
``"expand"`` (every position a term) or ``"reduce"`` (positions merged first; Eschenhagen et
al., 2023). See :func:`kronfac.compute_factors` for the formulas.

Both backends (``"hooks"``, ``"make_fx"``) map to kronfac's engine, which handles a module
called several times (weight tying) as one block over more positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.factors import KroneckerFactors, compute_factors
from kronfac.factors.data_pass import check_reiterable
from kronfac.factors.ekfac import compute_corrections
from kronfac.layers import get_adapter, supported_layers
from kronfac.operators import EKFAC, KFAC, CurvatureOperator

__all__ = ["EKFACLinearOperator", "FisherType", "KFACLinearOperator", "KFACType"]


class FisherType(str, Enum):
    """Which curvature the factors' output-gradient side approximates."""

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"
    FORWARD_ONLY = "forward-only"


class KFACType(str, Enum):
    """How positions of a weight-shared layer (sequences, convolutions) are treated."""

    EXPAND = "expand"
    REDUCE = "reduce"


_BACKENDS = ("hooks", "make_fx")


def _option(enum: type[Enum], value: Any, name: str) -> str:
    """The string value of an enum member or string (any enum with the same values)."""
    raw = value.value if isinstance(value, Enum) else value
    valid = [m.value for m in enum]
    if raw not in valid:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {valid}.")
    return raw


def _resolve_params(model: nn.Module, params: Mapping[str, Tensor] | Sequence[Tensor]) -> list[str]:
    """The model's (first) names of ``params``, in their order; checks they are the model's."""
    if isinstance(params, Mapping):
        items = list(params.items())
    elif isinstance(params, (list, tuple)):
        items = [(f"params[{i}]", p) for i, p in enumerate(params)]
    else:
        raise TypeError(
            f"params must be a dict[str, Tensor] (or a list of parameters), got "
            f"{type(params).__name__}."
        )
    if not items:
        raise ValueError("params is empty: there is no curvature to approximate.")
    first = {id(p): n for n, p in model.named_parameters()}
    aliases: dict[int, set[str]] = {}
    for n, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), set()).add(n)
    names = []
    for key, p in items:
        if not isinstance(p, Tensor) or id(p) not in first:
            raise ValueError(f"{key!r} is not a parameter of model_func (by identity).")
        if isinstance(params, Mapping) and key not in aliases[id(p)]:
            raise ValueError(
                f"params key {key!r} holds the model's parameter {first[id(p)]!r}; the keys "
                "must be the names of model_func.named_parameters()."
            )
        names.append(first[id(p)])
    if len(set(names)) != len(names):
        raise ValueError(f"params holds a parameter twice: {names}.")
    return names


def _check_coverage(model: nn.Module, names: Sequence[str]) -> None:
    """Every parameter must be a weight or bias of a supported layer, a bias with its weight."""
    params = dict(model.named_parameters())
    owner: dict[int, tuple[str, str, nn.Parameter]] = {}
    for mod_name, module in model.named_modules():
        adapter = get_adapter(module)
        if adapter is None:
            continue
        owner.setdefault(id(adapter.weight), (mod_name, "weight", adapter.weight))
        if adapter.bias is not None:
            owner.setdefault(id(adapter.bias), (mod_name, "bias", adapter.weight))
    outside = [n for n in names if id(params[n]) not in owner]
    if outside:
        raise NotImplementedError(
            f"Parameters {outside} are not the weight or bias of a layer kronfac supports "
            f"({', '.join(supported_layers())})."
        )
    chosen = {id(params[n]) for n in names}
    for n in names:
        mod_name, role, weight = owner[id(params[n])]
        if role == "bias" and id(weight) not in chosen:
            raise NotImplementedError(
                f"params holds the bias {n!r} of module {mod_name!r} without its weight; "
                "kronfac's blocks cover a layer's weight, with or without its bias."
            )


def _call_model(model: nn.Module, X: Any) -> Tensor:
    """``model(X)``: curvlinops passes a dict-like ``X`` as one argument, not as keywords."""
    return model(X)


@contextmanager
def _trainable_only(model: nn.Module, names: Sequence[str]) -> Any:
    """Within the context, exactly the parameters ``names`` require gradients."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for n, p in model.named_parameters() if n in set(names)}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, requires_grad in saved:
            p.requires_grad_(requires_grad)


def _check_deterministic(
    model: nn.Module, data: Iterable[Any], rtol: float = 5e-5, atol: float = 1e-6
) -> None:
    """Two passes over ``data`` must give the same batches and the same model outputs."""

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            return a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol)
        if isinstance(a, MutableMapping) and isinstance(b, MutableMapping):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    check_reiterable(data, "check_deterministic")
    with torch.no_grad():
        for b, ((X1, y1), (X2, y2)) in enumerate(zip(data, data, strict=True)):
            if not (same(X1, X2) and same(y1, y2)):
                raise RuntimeError(f"The data is not deterministic: batch {b} differs.")
            if not same(_call_model(model, X1), _call_model(model, X2)):
                raise RuntimeError(
                    f"The model is not deterministic: two forward passes on batch {b} differ "
                    "(dropout in train mode?). Call model.eval() or pass "
                    "check_deterministic=False."
                )


class _Operator:
    """A kronfac operator with curvlinops' product and method conventions."""

    def __init__(self, operator: CurvatureOperator) -> None:
        self._op = operator
        self.shape = operator.shape
        self.dtype, self.device = operator.dtype, operator.device

    @property
    def operator(self) -> CurvatureOperator:
        """The underlying :class:`kronfac.CurvatureOperator` (kronfac's full API)."""
        return self._op

    def __matmul__(self, X: Tensor | list[Tensor] | tuple[Tensor, ...]) -> Any:
        """``M X`` for ``X: [P]`` / ``[P, K]``, or tensors ``[*p.shape]`` / ``[*p.shape, K]``."""
        if not isinstance(X, (Tensor, list, tuple)):
            raise TypeError(
                f"Expected a Tensor or a list of Tensors, got {type(X).__name__} "
                "(use to_scipy() for NumPy arrays)."
            )
        return self._op @ X

    def trace(self) -> Tensor:
        """``tr M``."""
        return self._op.trace()

    def det(self) -> Tensor:
        """``det M`` (overflows for large operators; prefer :meth:`logdet`)."""
        return self._op.det()

    def logdet(self) -> Tensor:
        """``log det M`` (``−inf`` when ``M`` is singular)."""
        return self._op.logdet()

    def frobenius_norm(self) -> Tensor:
        """``‖M‖_F``."""
        return self._op.frobenius_norm()

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` of ``M`` (NumPy in and out)."""
        return self._op.to_scipy()


class KFACLinearOperator(_Operator):
    """K-FAC of the Fisher / GGN, with curvlinops' constructor (module docstring).

    Args:
        model_func: The model (an ``nn.Module``).
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
        params: Parameter name → parameter (``dict(model.named_parameters())`` or a subset);
            a list of parameters is accepted too. Each must be the weight or bias of a
            supported layer; the flat vectors follow this order.
        data: Batches ``(X, y)``; ``X`` a Tensor or a Mapping of the model's keyword inputs.
        progressbar: Show a progress bar.
        check_deterministic: First check that two passes over ``data`` give the same batches
            and model outputs (one extra forward pass over the data, without gradients).
        seed: Seed of the generator drawing the MC labels.
        fisher_type: A :class:`FisherType` or its string value.
        mc_samples: Labels per loss term for ``fisher_type="mc"`` (1 otherwise).
        kfac_approx: A :class:`KFACType` or its string value.
        num_per_example_loss_terms: Loss terms per datum (e.g. tokens); inferred when None.
        separate_weight_and_bias: Blocks for the weight and the bias apart (default) or one
            joint block.
        num_data: Number of data points; counted from ``data`` when None.
        batch_size_fn: ``batch_size_fn(X) -> N``, the number of data points of a batch;
            default: the first dimension of ``X``, or of a dict's ``input_ids`` /
            ``attention_mask`` / first tensor. Outputs may be flattened data point by data
            point (token logits ``[N·T, V]`` with targets ``[N·T]``).
        backend: ``"hooks"`` or ``"make_fx"``; both use kronfac's engine.

    Raises:
        ValueError: Unknown option, ``params`` not the model's, empty data, shapes that do not
            fit the loss.
        NotImplementedError: Parameters outside supported layers, a bias without its weight,
            a functional ``model_func``.
        RuntimeError: ``check_deterministic`` found differing passes.
    """

    _EKFAC = False
    _op: KFAC | EKFAC  # the operator __init__ builds

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: nn.Module,
        params: Mapping[str, Tensor] | Sequence[Tensor],
        data: Iterable[tuple[Tensor | MutableMapping[str, Any], Tensor]],
        progressbar: bool = False,
        check_deterministic: bool = True,
        seed: int = 2_147_483_647,
        fisher_type: str = FisherType.MC,
        mc_samples: int = 1,
        kfac_approx: str = KFACType.EXPAND,
        num_per_example_loss_terms: int | None = None,
        separate_weight_and_bias: bool = True,
        num_data: int | None = None,
        batch_size_fn: Callable[[MutableMapping[str, Any] | Tensor], int] | None = None,
        backend: str = "hooks",
    ) -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}. Supported: {_BACKENDS}.")
        if not isinstance(model_func, nn.Module):
            raise NotImplementedError(
                "model_func must be an nn.Module: kronfac finds the layers through the module "
                f"tree; got {type(model_func).__name__}."
            )
        options: dict[str, Any] = {
            "fisher": _option(FisherType, fisher_type, "fisher_type"),
            "approx": _option(KFACType, kfac_approx, "kfac_approx"),
            "mc_samples": mc_samples,
            "bias": "separate" if separate_weight_and_bias else "joint",
            "num_data": num_data,
            "num_per_example_loss_terms": num_per_example_loss_terms,
            "seed": seed,
            "progress": progressbar,
            "forward": _call_model,
            "batch_size_fn": batch_size_fn,
        }
        names = _resolve_params(model_func, params)
        _check_coverage(model_func, names)
        if check_deterministic:
            _check_deterministic(model_func, data)
        if self._EKFAC:
            check_reiterable(data, "EKFACLinearOperator")
        with _trainable_only(model_func, names):
            factors = compute_factors(model_func, loss_func, data, **options)
            if self._EKFAC:
                factors = compute_corrections(model_func, loss_func, data, factors, **options)
                operator: KFAC | EKFAC = EKFAC.from_factors(factors, model_func, order=names)
            else:
                operator = KFAC.from_factors(factors, model_func, order=names)
        super().__init__(operator)

    def inverse(
        self,
        damping: float = 0.0,
        use_heuristic_damping: bool = False,
        min_damping: float = 1e-8,
        use_exact_damping: bool = False,
        retry_double_precision: bool = True,
    ) -> _Operator:
        r"""The inverse of the damped K-FAC approximation (:meth:`kronfac.KFAC.inverse`).

        Default ``(S + δI)⁻¹ ⊗ (A + δI)⁻¹`` per block; ``use_heuristic_damping``: Martens &
        Grosse's π-damping (each damping at least ``min_damping``); ``use_exact_damping``:
        ``(S ⊗ A + δI)⁻¹``. Decompositions that fail in single precision are always retried in
        float64 (``retry_double_precision`` is accepted for compatibility).
        """
        del retry_double_precision
        if isinstance(damping, tuple):
            raise NotImplementedError(
                "Separate (input, gradient) dampings are not supported; pass one float."
            )
        heuristic, exact = use_heuristic_damping, use_exact_damping
        assert isinstance(self._op, KFAC)  # EKFACLinearOperator overrides inverse
        op = self._op.inverse(damping, heuristic=heuristic, min_damping=min_damping, exact=exact)
        return _Operator(op)

    @property
    def factors(self) -> KroneckerFactors:
        """The :class:`kronfac.KroneckerFactors` (save them, load them, build other operators)."""
        return self._op.factors


class EKFACLinearOperator(KFACLinearOperator):
    """EKFAC (George et al., 2018) with curvlinops' constructor: see :class:`KFACLinearOperator`.

    Two passes over ``data``: the K-FAC factors, then the second moments of the per-example
    gradients in their eigenbasis (:class:`kronfac.EKFAC`).
    """

    _EKFAC = True

    def inverse(
        self,
        damping: float = 0.0,
        use_heuristic_damping: bool = False,
        min_damping: float = 1e-8,
        use_exact_damping: bool = True,
        retry_double_precision: bool = True,
    ) -> _Operator:
        """``(E + δI)⁻¹``, exactly damped in EKFAC's eigenbasis.

        Raises:
            ValueError: ``use_heuristic_damping=True`` or ``use_exact_damping=False`` (EKFAC's
                damping is exact by construction).
        """
        del min_damping, retry_double_precision
        if use_heuristic_damping or not use_exact_damping:
            raise ValueError("Only exact damping is supported for EKFAC.")
        assert isinstance(self._op, EKFAC)  # what __init__ builds with _EKFAC
        return _Operator(self._op.inverse(damping))
