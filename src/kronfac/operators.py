r"""Curvature operators: K-FAC and EKFAC as block-diagonal linear operators.

The flat vectors of an operator list the covered parameters in ``model.named_parameters()``
order, each flattened row-major (docs/conventions.md). Each module adds one block acting on its
weight read as a ``[d_out, d_in]`` matrix ``V`` — joined by the bias as a last column with
``bias="joint"`` — or two blocks (weight, then bias as a ``[d_out, 1]`` matrix) with
``bias="separate"``. Blocks come from :mod:`kronfac.linalg`: K-FAC turns each stored factor
(dense, diagonal, low-rank, grouped or not) into one :class:`~kronfac.linalg.Factor` with
:func:`~kronfac.linalg.as_factor`, shared by a weight's block and its separate bias's, and
builds a :class:`~kronfac.linalg.KroneckerBlock` over them; EKFAC builds
:class:`~kronfac.linalg.EigenBlock` s. Products, inverses, traces and log-determinants follow
from the factors' structure (Roth's lemma, per-factor eigendecompositions, computed once per
factor) and the Kronecker product is never formed except in :meth:`to_dense`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from kronfac.factors import FactorPair, KroneckerFactors, ParamNames
from kronfac.factors.data_pass import PassResult, PassSetup, check_reiterable
from kronfac.factors.ekfac import compute_corrections
from kronfac.factors.engine import factor_pass
from kronfac.layers import LayerAdapter, Slot, get_adapter
from kronfac.linalg import Block, EigenBlock, KroneckerBlock, LowRankFactor, as_factor

__all__ = ["EKFAC", "KFAC", "CurvatureOperator", "curvature_pass", "eigen_block"]


class CurvatureOperator:
    """A symmetric block-diagonal operator in the parameter layout.

    ``op @ v`` takes a flat tensor ``[P]`` or ``[P, k]``, a list / tuple of tensors shaped like
    the covered parameters (or all with one more trailing dimension ``k``: ``k`` vectors at
    once), or a dict keyed by their names, and returns the same kind.

    Attributes:
        param_names: Names of the covered parameters, in ``model.named_parameters()`` order.
        shape: ``(P, P)``.
        dtype: The dtype of the blocks (vectors are cast to it and back).
        device: Their device.
    """

    def __init__(
        self,
        slots: Sequence[Slot],
        blocks: Sequence[Block],
        param_shapes: Mapping[str, torch.Size],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self._slots: list[Slot] = list(slots)
        self._blocks: Sequence[Block] = list(blocks)
        self._shapes = dict(param_shapes)
        self.param_names = list(param_shapes)
        P = sum(math.prod(s) for s in param_shapes.values())
        self.shape = (P, P)
        self.dtype, self.device = dtype, device

    def _with_blocks(self, blocks: Sequence[Block]) -> CurvatureOperator:
        return CurvatureOperator(self._slots, blocks, self._shapes, self.dtype, self.device)

    # -- products ---------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        """``M V`` for ``V: [P, k]``."""
        out = torch.empty_like(V)
        for slot, block in zip(self._slots, self._blocks, strict=True):
            slot.scatter(block.matmat(slot.gather(V)), out)
        return out

    def __matmul__(self, v: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> Any:
        """``M v`` for a flat ``[P]`` / ``[P, k]`` tensor, a list / tuple, or a dict."""
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
            kind, shapes = type(v), list(self._shapes.values())
            cols = _columns(v, shapes)
            if cols is None:
                expected_shapes = [tuple(s) for s in shapes]
                got = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in v]
                raise ValueError(
                    f"Expected tensors of shapes {expected_shapes} (each with the same trailing "
                    f"column dimension k, or none), got {got}."
                )
            k = cols or 1
            flat = torch.cat([t.reshape(-1, k) for t in v])
            Mv = (self @ flat).split([math.prod(s) for s in shapes])
            return kind(p.reshape(t.shape) for p, t in zip(Mv, v, strict=True))
        raise TypeError(f"Expected a Tensor, a list of Tensors or a dict, got {type(v).__name__}.")

    # -- closed forms -----------------------------------------------------------------------
    def trace(self) -> Tensor:
        """``tr M``: the sum of the blocks' traces."""
        return torch.stack([b.trace() for b in self._blocks]).sum()

    def frobenius_norm(self) -> Tensor:
        """``‖M‖_F``: the root of the sum of the blocks' squared norms."""
        return torch.stack([b.frobenius_norm_sq() for b in self._blocks]).sum().sqrt()

    def diagonal(self) -> Tensor:
        """The diagonal, a flat ``[P]`` tensor in the parameter layout."""
        out = torch.empty(self.shape[0], 1, dtype=self.dtype, device=self.device)
        for slot, block in zip(self._slots, self._blocks, strict=True):
            slot.scatter(block.diagonal().unsqueeze(-1), out)
        return out.squeeze(1)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(M + δI)``, exact, from the blocks' eigenvalues; ``−inf`` when singular.

        Raises:
            ValueError: If ``damping`` is negative.
        """
        _check_damping(damping)
        return torch.stack([b.logdet(damping) for b in self._blocks]).sum()

    def det(self, damping: float = 0.0) -> Tensor:
        """``det(M + δI) = exp(logdet(δ))`` (overflows to ``inf`` for large operators)."""
        return self.logdet(damping).exp()

    def to_dense(self) -> Tensor:
        """The dense ``[P, P]`` matrix in the parameter layout (for small models and tests).

        Raises:
            ValueError: If the matrix would exceed 2³¹ entries (it is built by products with
                the identity and would not fit in memory).
        """
        P = self.shape[0]
        if P * P > 1 << 31:
            gib = P * P * torch.empty((), dtype=self.dtype).element_size() / 2**30
            raise ValueError(
                f"to_dense of a {P} x {P} operator needs {gib:.0f} GiB; it is meant for small "
                "models. Use products (op @ v), diagonal() or to_scipy() instead."
            )
        return self._matmat(torch.eye(P, dtype=self.dtype, device=self.device))

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` of the same matrix (NumPy in and out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def matmat(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X), device=self.device).to(self.dtype)
            squeeze = V.ndim == 1
            out = self._matmat(V.reshape(V.shape[0], -1))
            return (out.squeeze(1) if squeeze else out).cpu().numpy()

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator(
            self.shape, matvec=matmat, matmat=matmat, rmatvec=matmat, dtype=np_dtype
        )


def _columns(v: Sequence[Any], shapes: Sequence[torch.Size]) -> int | None:
    """``0`` if the tensors of ``v`` have ``shapes``, ``k`` if all are ``[*shape, k]``, or None."""
    if len(v) != len(shapes) or not all(isinstance(t, Tensor) for t in v):
        return None
    if all(t.shape == s for t, s in zip(v, shapes, strict=True)):
        return 0
    k = v[0].shape[-1] if v[0].ndim else -1
    if all(t.shape == (*s, k) for t, s in zip(v, shapes, strict=True)):
        return k
    return None


def eigen_block(block: Block) -> EigenBlock:
    """A block of a K-FAC or EKFAC operator in its eigenbasis, as an :class:`EigenBlock`.

    A K-FAC block ``S ⊗ A`` becomes ``Q_S ⊗ Q_A`` with the Kronecker products ``s_i a_j`` of
    its factors' eigenvalues (``KroneckerBlock._eigen_block``, decomposed once and cached); an
    EKFAC block is one already.

    Raises:
        TypeError: For a block of another kind.
    """
    if isinstance(block, KroneckerBlock):
        return block._eigen_block()
    if not isinstance(block, EigenBlock):
        raise TypeError(f"Expected a KroneckerBlock or an EigenBlock, got {type(block).__name__}.")
    return block


def _check_damping(damping: float) -> None:
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or damping < 0:
        raise ValueError(f"damping must be a non-negative number, got {damping!r}.")


def _shape(F: Tensor | LowRankFactor) -> tuple[int, ...]:
    """A factor's shape; a low-rank one of side ``d`` reads as dense, ``([g,] d, d)``."""
    if isinstance(F, LowRankFactor):
        return (*F.U.shape[:-2], F.side, F.side)
    return tuple(F.shape)


def _layout(
    factors: KroneckerFactors, model: nn.Module, order: Sequence[str] | None = None
) -> tuple[dict[str, tuple[Slot, ...]], dict[str, torch.Size]]:
    """The slots of every module's block(s) and the covered parameters' shapes, in order.

    ``order`` lists the covered parameters in the order of the flat vector (default: that of
    ``model.named_parameters()``).
    """
    if not isinstance(factors, KroneckerFactors):
        raise TypeError(
            "Expected kronfac.KroneckerFactors (from compute_factors or KroneckerFactors.load), "
            f"got {type(factors).__name__}."
        )
    if not factors:
        raise ValueError("The factors cover no module: there is no operator to build.")
    shapes = _param_shapes(factors, dict(model.named_parameters()), order)
    offsets, start = {}, 0
    for n, shape in shapes.items():
        offsets[n] = slice(start, start + math.prod(shape))
        start += math.prod(shape)
    joint = factors.options.get("bias", "joint") == "joint"
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    slots = {}
    for mod, pair in factors.items():
        adapter = _adapter(mod, modules, params, factors.param_names[mod])
        names = factors.param_names[mod]
        _check_shapes(mod, adapter, pair, joint and names.bias is not None)
        bias = offsets[names.bias] if names.bias is not None else None
        slots[mod] = adapter.slots(offsets[names.weight], bias, joint)
    return slots, shapes


def _param_shapes(
    factors: KroneckerFactors, params: Mapping[str, Tensor], order: Sequence[str] | None
) -> dict[str, torch.Size]:
    """The covered parameters' shapes, in the order of the flat vector."""
    covered = {p for names in factors.param_names.values() for p in names if p is not None}
    missing = sorted(covered - set(params))
    if missing:
        raise ValueError(f"Parameters {missing} of the factors are not in the model.")
    if order is None:
        return {n: p.shape for n, p in params.items() if n in covered}
    if len(order) != len(set(order)) or set(order) != covered:
        raise ValueError(
            f"order must list the covered parameters {sorted(covered)} once each, got "
            f"{list(order)!r}."
        )
    return {n: params[n].shape for n in order}


def _adapter(
    mod: str, modules: Mapping[str, nn.Module], params: Mapping[str, Tensor], names: ParamNames
) -> LayerAdapter:
    """The adapter of the factors' module ``mod``, checked against the model."""
    if mod not in modules:
        raise ValueError(f"Module {mod!r} of the factors is not in the model.")
    adapter = get_adapter(modules[mod])
    if adapter is None:
        raise ValueError(f"Module {mod!r} ({type(modules[mod]).__name__}) is unsupported.")
    if params[names.weight] is not adapter.weight:
        raise ValueError(f"Parameter {names.weight!r} is not the weight of module {mod!r}.")
    return adapter


def _check_shapes(mod: str, adapter: LayerAdapter, pair: FactorPair, joint: bool) -> None:
    """The factors' shapes must be those of the module's block."""
    d_in, d_out = adapter.in_features + int(joint), adapter.out_features
    lead = (adapter.groups,) if adapter.groups > 1 else ()
    A_shape = (*lead, d_in) if adapter.diagonal_input else (*lead, d_in, d_in)
    S_shape = (*lead, d_out, d_out)
    A, S = pair
    if _shape(A) != A_shape or _shape(S) != S_shape:
        raise ValueError(
            f"Factors of module {mod!r} have shapes A{_shape(A)}, S{_shape(S)}; expected "
            f"A{A_shape}, S{S_shape}."
        )


_Op = TypeVar("_Op", bound="_FactorOperator")


class _FactorOperator(CurvatureOperator, ABC):
    """An operator built from :class:`~kronfac.KroneckerFactors` (:meth:`from_factors`)."""

    factors: KroneckerFactors

    @classmethod
    def from_factors(
        cls: type[_Op],
        factors: KroneckerFactors,
        model: nn.Module,
        *,
        order: Sequence[str] | None = None,
    ) -> _Op:
        """The operator of precomputed ``factors`` for the parameters of ``model``.

        Args:
            factors: The factors (:func:`kronfac.compute_factors`, ``KroneckerFactors.load``,
                ``E.factors`` of an :class:`EKFAC`, which carry its corrections).
            model: The model they were computed for.
            order: Names of the covered parameters in the order of the flat vectors; default
                ``model.named_parameters()`` order.

        Raises:
            TypeError: If ``factors`` is not a :class:`~kronfac.KroneckerFactors`.
            ValueError: If it is empty, a module or parameter of ``factors`` is missing from
                ``model``, a factor's shape does not fit its module, ``order`` is not a
                permutation of the covered parameters' names, or (EKFAC) the factors carry no
                corrections.
        """
        op = cls.__new__(cls)
        op._setup(factors, model, order)
        return op

    @abstractmethod
    def _setup(
        self, factors: KroneckerFactors, model: nn.Module, order: Sequence[str] | None = None
    ) -> None:
        """Build the blocks of ``factors`` in the layout of ``model`` (``order``)."""


class KFAC(_FactorOperator):
    r"""The K-FAC approximation ``K = diag_l(S_l ⊗ A_l)`` of the Fisher / GGN.

    Build it from data (``KFAC(model, loss_fn, data, **options)``, the options of
    :func:`kronfac.compute_factors`) or from computed factors (:meth:`from_factors`).

    Attributes:
        factors: The Kronecker factors.
    """

    _blocks: Sequence[KroneckerBlock]  # what _setup builds

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: Iterable[Any], **options: Any):
        self._setup(factor_pass(model, loss_fn, data, **options)[0], model)

    def _setup(
        self, factors: KroneckerFactors, model: nn.Module, order: Sequence[str] | None = None
    ) -> None:
        slots, shapes = _layout(factors, model, order)
        flat_slots: list[Slot] = []
        blocks: list[KroneckerBlock] = []
        for mod, (A, S) in factors.items():
            # one Factor per stored factor, shared by a weight's and its separate bias's blocks
            diagonal = slots[mod][0].adapter.diagonal_input
            fA, fS = as_factor(A, mod, diagonal=diagonal), as_factor(S, mod)
            for slot in slots[mod]:
                flat_slots.append(slot)
                if slot.weight is None:  # separate bias: π from the weight's A
                    blocks.append(KroneckerBlock(fS, None, mod, heuristic_A=fA))
                else:
                    blocks.append(KroneckerBlock(fS, fA, mod))
        super().__init__(*_by_start(flat_slots, blocks), shapes, fA.dtype, fA.device)
        self.factors = factors

    def inverse(
        self,
        damping: float = 0.0,
        *,
        heuristic: bool = False,
        min_damping: float = 1e-8,
        exact: bool = False,
    ) -> CurvatureOperator:
        r"""The inverse of the damped K-FAC approximation, as an operator.

        - default: ``(S + δI)⁻¹ ⊗ (A + δI)⁻¹`` per block (a separate bias: ``(S + δI)⁻¹``);
        - ``heuristic=True``: Martens & Grosse's π-damping, ``A + π√δ I`` and ``S + √δ/π I``
          with ``π = √((tr A / dim A) / (tr S / dim S))``, each at least ``min_damping`` (a
          separate bias block takes its weight's ``S + √δ/π I``);
        - ``exact=True``: ``(S ⊗ A + δI)⁻¹`` through the factors' eigendecompositions.

        The decompositions are computed here, once, and reused by every product.

        Raises:
            ValueError: Negative damping, or ``heuristic`` and ``exact`` together.
            NotPSDError: A damped factor that is not positive definite (after a float64 retry),
                naming the module.
        """
        _check_damping(damping)
        if heuristic and exact:
            raise ValueError("Use heuristic or exact damping, not both.")
        return self._with_blocks(
            [
                b.inverse(damping, heuristic=heuristic, min_damping=min_damping, exact=exact)
                for b in self._blocks
            ]
        )


class EKFAC(_FactorOperator):
    r"""Eigenvalue-corrected K-FAC (George et al., 2018).

    K-FAC's eigenbasis ``Q_S ⊗ Q_A`` with the eigenvalues replaced by the second moments of the
    per-example gradients in that basis (:func:`kronfac.factors.ekfac.compute_corrections`):
    ``E = diag_l((Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ)``. Built with the options of
    :func:`kronfac.compute_factors` (two passes over ``data``), or from factors that carry the
    corrections (:meth:`from_factors`, e.g. after ``E.factors.save`` /
    ``KroneckerFactors.load``).

    Attributes:
        factors: The Kronecker factors with their corrections.
    """

    _blocks: Sequence[EigenBlock]  # what _setup builds

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: Iterable[Any], **options: Any):
        check_reiterable(data, "EKFAC", options.get("process_group"))
        setup = PassSetup.create(model, loss_fn, **options)  # validated once for both passes
        factors, result = factor_pass(model, loss_fn, data, setup)
        corrected = compute_corrections(
            model, loss_fn, data, factors, reference=result, setup=setup
        )
        self._setup(corrected, model)

    def _setup(
        self, factors: KroneckerFactors, model: nn.Module, order: Sequence[str] | None = None
    ) -> None:
        slots, shapes = _layout(factors, model, order)
        if factors.corrections is None:
            raise ValueError(
                "These factors carry no EKFAC corrections: build kronfac.EKFAC(model, loss_fn, "
                "data, ...) or use kronfac.KFAC.from_factors."
            )
        flat_slots: list[Slot] = []
        blocks: list[EigenBlock] = []
        for mod in factors:
            Q_A, Q_S, lam, bias_lam, c, c_bias = factors.corrections[mod]
            for slot in slots[mod]:
                flat_slots.append(slot)
                if slot.weight is None:  # separate bias: its corrections carry bias_eigenvalues
                    assert bias_lam is not None
                    rest = 0.0 if c_bias is None else float(c_bias)
                    blocks.append(EigenBlock(Q_S, None, bias_lam[..., None], mod, rest))
                else:
                    rest = 0.0 if c is None else float(c)
                    blocks.append(EigenBlock(Q_S, Q_A, lam, mod, rest))
        super().__init__(*_by_start(flat_slots, blocks), shapes, Q_S.dtype, Q_S.device)
        self.factors = factors

    def inverse(self, damping: float = 0.0) -> CurvatureOperator:
        """``(E + δI)⁻¹``: the corrected eigenvalues damped and inverted in the same basis.

        Raises:
            ValueError: Negative damping.
            NotPSDError: An eigenvalue of ``E + δI`` that is not positive, naming the module.
        """
        _check_damping(damping)
        return self._with_blocks([b.inverse(damping) for b in self._blocks])


_B = TypeVar("_B", bound=Block)


def _by_start(slots: list[Slot], blocks: list[_B]) -> tuple[list[Slot], list[_B]]:
    """The slots and their blocks in the order of the slots in the flat vector."""
    perm = sorted(range(len(slots)), key=lambda i: _slot_start(slots[i]))
    return [slots[i] for i in perm], [blocks[i] for i in perm]


def _slot_start(slot: Slot) -> int:
    part = slot.weight if slot.weight is not None else slot.bias
    assert part is not None  # a slot holds a weight, a bias or both
    return part.start


def curvature_pass(
    model: nn.Module, loss_fn: nn.Module, data: Iterable[Any], setup: PassSetup, curvature: str
) -> tuple[KFAC | EKFAC, PassResult]:
    """The K-FAC (one pass over ``data``) or EKFAC (two) operator, and the first pass's counts.

    Args:
        model: The model.
        loss_fn: Its loss.
        data: The batches (re-iterable for EKFAC).
        setup: The validated options (:meth:`PassSetup.create`), shared by both passes.
        curvature: ``"kfac"`` or ``"ekfac"``.
    """
    factors, result = factor_pass(model, loss_fn, data, setup)
    if curvature == "ekfac":
        corrected = compute_corrections(
            model, loss_fn, data, factors, reference=result, setup=setup
        )
        return EKFAC.from_factors(corrected, model), result
    return KFAC.from_factors(factors, model), result
