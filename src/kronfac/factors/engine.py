r"""The factor engine: one pass over the data accumulates every module's ``A`` and ``S``.

For each batch the model runs once with forward hooks recording every covered module's input
``a`` and output ``s``. The likelihood turns the model output into ``K`` backpropagated vectors
per loss term (``type-2``: the columns of the loss Hessian's square root; ``mc``: gradients at
sampled labels, scaled by ``1/√mc_samples``; ``empirical``: gradients at the true labels). One
call of :func:`torch.autograd.grad` — batched over the ``K`` vectors with
``is_grads_batched`` — gives ``g = ∂ℓ/∂s`` at every covered module's output (never the weight
gradients). Both factors are then one GEMM each over the flattened rows, accumulated in float32
(float64 for float64 models):

.. math::

    A = \frac{1}{N T} \sum_{n,t} a_{n,t} a_{n,t}^\top, \qquad
    S = \frac{1}{D} \sum_{n,t,k} g_{n,t,k} g_{n,t,k}^\top,

with ``D`` the number of entries torch's ``reduction="mean"`` averages over (``N·R`` for
cross-entropy, ``N·R·C`` for MSE and BCE; ``D = 1`` for ``"sum"``). With ``approx="reduce"`` the
positions are merged first: ``ā_n = 1/T Σ_t a_{n,t}``, ``ĝ_n = Σ_t g_{n,t}`` (Eschenhagen et
al., 2023). A module called several times in one forward contributes every call as more
positions.

For sequence outputs the vectors of all terms of a batch are backpropagated together, so the
output gradient at one position sums the contributions of every loss term that depends on it
(for type-2 this includes products between different terms of one sequence; for MC they vanish
in expectation), the usual K-FAC treatment of shared layers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kronfac.errors import NonFiniteError, UncoveredParameterWarning
from kronfac.factors.container import FactorPair, KroneckerFactors, ParamNames
from kronfac.factors.hooks import Call, record_calls
from kronfac.layers import LayerAdapter, get_adapter
from kronfac.likelihoods import Likelihood, get_likelihood

__all__ = ["BIAS_MODES", "FISHER_TYPES", "KFAC_APPROXES", "compute_factors", "select_modules"]

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
KFAC_APPROXES = ("expand", "reduce")
BIAS_MODES = ("joint", "separate")

# Upper bound on the elements of the output gradients held at once; type-2 with many classes
# backpropagates its K vectors in chunks that stay below it.
_MAX_BATCHED_ELEMENTS = 1 << 27

ForwardFn = Callable[[nn.Module, Any], Tensor]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name} {value!r}. Supported: {', '.join(choices)}.")


def select_modules(
    model: nn.Module, modules: Iterable[str] | str | None
) -> tuple[dict[str, LayerAdapter], dict[str, ParamNames]]:
    """The supported modules of ``model`` whose name contains one of ``modules``.

    Args:
        model: The model.
        modules: Name substrings (a single string counts as one); ``None`` selects every module.

    Returns:
        ``(adapters, param_names)`` keyed by module name, in ``named_modules()`` order, for the
        selected supported modules with a trainable weight.

    Raises:
        ValueError: If ``modules`` matches no module, or no selected module is supported.
        NotImplementedError: If two selected modules share a parameter.

    Warns:
        UncoveredParameterWarning: For trainable parameters of selected modules that no block
            covers, naming every one.
    """
    if isinstance(modules, str):
        modules = [modules]
    patterns = None if modules is None else list(modules)
    if patterns is not None and not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"modules must be a list of name substrings, got {patterns!r}.")

    def selected(name: str) -> bool:
        return patterns is None or any(p in name for p in patterns)

    named = dict(model.named_modules())
    matched = [n for n in named if n and selected(n)] if patterns is not None else list(named)
    if not matched:
        raise ValueError(
            f"modules={patterns!r} matches no module of the model. "
            f"Module names: {', '.join(n for n in named if n) or '(none)'}."
        )
    param_name = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    adapters: dict[str, LayerAdapter] = {}
    names: dict[str, ParamNames] = {}
    owner: dict[int, str] = {}
    for name in matched:
        adapter = get_adapter(named[name])
        if adapter is None or not adapter.weight.requires_grad:
            continue
        params = [adapter.weight]
        bias = adapter.bias if adapter.bias is not None and adapter.bias.requires_grad else None
        if bias is not None:
            params.append(bias)
        for p in params:
            if id(p) in owner:
                raise NotImplementedError(
                    f"Modules {owner[id(p)]!r} and {name!r} share the parameter "
                    f"{param_name[id(p)]!r}; parameters shared between modules are not "
                    "supported yet. Select one of them with `modules=`."
                )
            owner[id(p)] = name
        adapters[name] = adapter
        names[name] = ParamNames(
            param_name[id(adapter.weight)], None if bias is None else param_name[id(bias)]
        )
    if not adapters:
        raise ValueError(
            "No supported layer with trainable weights among the selected modules "
            f"({', '.join(matched[:10])}{', ...' if len(matched) > 10 else ''}). "
            "Supported layers: nn.Linear."
        )
    # Parameters directly owned by selected modules (not their children) that no block covers.
    uncovered = []
    for name in matched:
        for pname, p in named[name].named_parameters(recurse=False):
            if p.requires_grad and id(p) not in owner:
                uncovered.append(f"{name}.{pname}" if name else pname)
    if uncovered:
        warnings.warn(
            f"{len(uncovered)} trainable parameter(s) are not covered by any Kronecker block "
            f"and are left out of the curvature: {', '.join(uncovered)}.",
            UncoveredParameterWarning,
            stacklevel=3,
        )
    return adapters, names


class _Accumulator:
    """Running sums of one module: ``Σ a aᵀ``, ``Σ a`` (bias column) and ``Σ g gᵀ``."""

    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device) -> None:
        self.gram = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.colsum = torch.zeros(d_in, dtype=dtype, device=device)
        self.count = 0.0
        self.ggT = torch.zeros(d_out, d_out, dtype=dtype, device=device)
        self.calls = 0

    def input_factor(self, with_bias: bool, num_data: int) -> Tensor:
        """``A`` from the running sums, with the bias row/column when ``with_bias``."""
        if not with_bias:
            return self.gram / num_data
        d = self.gram.shape[0]
        A = self.gram.new_empty(d + 1, d + 1)
        A[:d, :d] = self.gram
        A[:d, d] = A[d, :d] = self.colsum
        A[d, d] = self.count
        return A / num_data


def _batch_size(y: Any, batch_index: int) -> int:
    if not isinstance(y, Tensor):
        raise TypeError(
            f"Batch {batch_index}: expected targets y to be a torch.Tensor, got {type(y).__name__}."
        )
    if y.ndim == 0:
        raise ValueError(f"Batch {batch_index}: expected batched targets [N, ...], got a scalar.")
    return y.shape[0]


def _run_forward(model: nn.Module, X: Any, forward: ForwardFn | None, batch_index: int) -> Tensor:
    if forward is not None:
        output = forward(model, X)
    elif isinstance(X, Mapping):
        output = model(**X)
    else:
        output = model(X)
    if not isinstance(output, Tensor):
        raise TypeError(
            f"Batch {batch_index}: the model returned {type(output).__name__}, expected the "
            "logits as a Tensor. Pass forward=lambda model, X: ... returning them "
            "(e.g. model(**X).logits for a transformers model)."
        )
    return output


def _backprop_vectors(
    likelihood: Likelihood,
    fisher: str,
    output: Tensor,
    y: Tensor,
    mc_samples: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> Tensor:
    """The ``K`` vectors ``[K, *output.shape]`` whose backpropagation gives the ``g``'s."""
    terms = likelihood.to_terms(output.detach().to(dtype))
    if fisher == "type-2":
        vectors = likelihood.hessian_sqrt(terms).permute(2, 0, 1)
    elif fisher == "mc":
        assert generator is not None
        samples = likelihood.sample(terms, mc_samples, generator)
        vectors = likelihood.gradient(terms, samples) / math.sqrt(mc_samples)
    else:  # empirical
        vectors = likelihood.gradient(terms, likelihood.targets_to_terms(y, output)).unsqueeze(0)
    return likelihood.from_terms(vectors, output).to(output.dtype)


def _output_gradients(output: Tensor, calls: list[Call], vectors: Tensor) -> list[Tensor | None]:
    """``[K, *call.output.shape]`` gradients of ``⟨vectors_k, output⟩`` at each call's output."""
    outs = [c.output for c in calls]
    K = vectors.shape[0]
    if K == 1:
        grads = torch.autograd.grad(output, outs, vectors[0], allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    per_vector = output.numel() + sum(o.numel() for o in outs)
    chunk = max(1, min(K, _MAX_BATCHED_ELEMENTS // max(per_vector, 1)))
    pieces: list[list[Tensor | None]] = []
    for start in range(0, K, chunk):
        part = vectors[start : start + chunk]
        last = start + chunk >= K
        pieces.append(
            list(
                torch.autograd.grad(
                    output,
                    outs,
                    part,
                    retain_graph=not last,
                    is_grads_batched=True,
                    allow_unused=True,
                )
            )
        )
    return [
        None if ps[0] is None else torch.cat(ps) if len(ps) > 1 else ps[0]
        for ps in zip(*pieces, strict=True)
    ]


def compute_factors(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable[tuple[Any, Tensor]],
    *,
    fisher: str = "mc",
    mc_samples: int = 1,
    approx: str = "expand",
    modules: Iterable[str] | str | None = None,
    bias: str = "joint",
    forward: ForwardFn | None = None,
    num_data: int | None = None,
    num_per_example_loss_terms: int | None = None,
    seed: int = 2147483647,
    progress: bool = False,
) -> KroneckerFactors:
    r"""Kronecker factors of the Fisher / GGN of ``model`` over ``data``.

    Each covered module's block of the curvature of the dataset loss (as ``loss_fn`` defines
    it) is approximated as ``S ⊗ A`` in the row-major flattening of its weight ``[d_out, d_in]``
    (DESIGN.md), with

    .. math::

        A = \frac{1}{N T} \sum_{n,t} a_{n,t} a_{n,t}^\top, \qquad
        S = \frac{1}{D} \sum_{n,t,k} g_{n,t,k} g_{n,t,k}^\top,

    ``a`` the layer input (a trailing 1 with ``bias="joint"``), ``g`` the backpropagated
    gradients of the summed loss at the layer output, and ``D`` the number of entries torch
    averages over with ``reduction="mean"`` (``N·R`` for cross-entropy, ``N·R·C`` for MSE / BCE;
    ``1`` for ``"sum"``).

    Args:
        model: The model. Its mode (train / eval) is left as it is.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` (class-index targets) or
            ``nn.BCEWithLogitsLoss``, reduction ``"mean"`` or ``"sum"``.
        data: Iterable of batches ``(X, y)``; ``X`` a Tensor or a Mapping (``model(**X)``).
        fisher: ``"type-2"`` (columns of the loss Hessian's square root: the exact GGN for one
            datum), ``"mc"`` (gradients at ``mc_samples`` labels per term sampled from the
            model), ``"empirical"`` (gradients at the true labels) or ``"forward-only"``
            (``S = I``, no backward pass).
        mc_samples: Samples per loss term for ``fisher="mc"`` (must be 1 otherwise).
        approx: ``"expand"`` (every position a term) or ``"reduce"`` (positions merged first).
        modules: Name substrings selecting modules; ``None`` covers every supported module with
            a trainable weight.
        bias: ``"joint"`` (bias as a last column of ``W``: one block) or ``"separate"``
            (blocks ``S ⊗ A`` for the weight and ``S`` for the bias).
        forward: ``forward(model, X) -> logits``, for models whose output is not the logits.
        num_data: ``N``; counted from the data when ``None`` (a given value must match).
        num_per_example_loss_terms: ``R``; inferred from the outputs when ``None`` (a given
            value must match).
        seed: Seed of the private generator used for MC sampling (the global RNG is untouched).
        progress: Show a tqdm progress bar over the batches.

    Returns:
        The factors of every covered module.

    Raises:
        ValueError: Unknown option, empty data, no selected or supported module, shapes that do
            not fit the loss, or counts that disagree with ``num_data`` /
            ``num_per_example_loss_terms``.
        TypeError: Targets of the wrong dtype, or a model output that is not a Tensor.
        NotImplementedError: Unsupported loss or loss option.
        NonFiniteError: NaN / Inf in a module's factors (the module and batch are named).
    """
    _check_choice("fisher", fisher, FISHER_TYPES)
    _check_choice("approx", approx, KFAC_APPROXES)
    _check_choice("bias", bias, BIAS_MODES)
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}.")
    if fisher != "mc" and mc_samples != 1:
        raise ValueError(f"mc_samples={mc_samples} requires fisher='mc', got fisher={fisher!r}.")
    counts = {"num_data": num_data, "num_per_example_loss_terms": num_per_example_loss_terms}
    for name, value in counts.items():
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
    if not isinstance(loss_fn, nn.Module):
        raise TypeError(f"loss_fn must be a torch.nn loss module, got {type(loss_fn).__name__}.")
    likelihood = get_likelihood(loss_fn)
    adapters, param_names = select_modules(model, modules)
    with_bias = {n: bias == "joint" and param_names[n].bias is not None for n in adapters}

    accs: dict[str, _Accumulator] = {}
    generator: torch.Generator | None = None
    total = 0
    terms_per_example: int | None = None
    num_classes: int | None = None
    backward = fisher != "forward-only"
    batches = tqdm(
        data,
        total=len(data) if hasattr(data, "__len__") else None,  # type: ignore[arg-type]
        disable=not progress,
        desc="kronfac factors",
        unit="batch",
    )
    with record_calls(adapters) as calls:
        for b, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"Batch {b}: expected a pair (X, y), got {type(batch).__name__}.")
            X, y = batch
            n_b = _batch_size(y, b)
            if n_b == 0:
                raise ValueError(
                    f"Batch {b} holds no data points (targets of shape {tuple(y.shape)})."
                )
            for c in calls.values():
                c.clear()
            with torch.set_grad_enabled(backward):
                output = _run_forward(model, X, forward, b)
            likelihood.check(output, y)
            if output.shape[0] != n_b:
                raise ValueError(
                    f"Batch {b}: model output has batch size {output.shape[0]}, targets {n_b}."
                )
            r_b, c_b = likelihood.terms_per_example(output), likelihood.num_classes(output)
            if terms_per_example is None:
                terms_per_example, num_classes = r_b, c_b
            elif (r_b, c_b) != (terms_per_example, num_classes) and likelihood.reduction == "mean":
                raise ValueError(
                    f"Batch {b}: {r_b} loss terms of size {c_b} per data point, earlier batches "
                    f"had {terms_per_example} of size {num_classes}; reduction='mean' needs "
                    "the same number of terms for every data point."
                )
            dtype = torch.float64 if output.dtype == torch.float64 else torch.float32
            if not accs:
                accs = {
                    n: _Accumulator(a.in_features, a.out_features, dtype, output.device)
                    for n, a in adapters.items()
                }
            _accumulate_inputs(adapters, calls, accs, n_b, approx, b)
            _check_finite(accs, b, backward=False)
            if backward:
                _check_finite_output(output, adapters, calls, b)
                if fisher == "mc" and generator is None:
                    generator = torch.Generator(device=output.device).manual_seed(seed)
                if not output.requires_grad:
                    raise ValueError(
                        f"Batch {b}: the model output does not require grad; the covered "
                        "modules' outputs must be part of the autograd graph."
                    )
                vectors = _backprop_vectors(
                    likelihood, fisher, output, y, mc_samples, generator, dtype
                )
                _accumulate_output_grads(adapters, calls, accs, output, vectors, n_b, approx, b)
            if backward:
                _check_finite(accs, b, backward=True)
            total += n_b
            del output
    if total == 0:
        raise ValueError("data is empty: expected at least one batch (X, y) with data points.")
    assert terms_per_example is not None and num_classes is not None
    for name, acc in accs.items():
        if acc.calls == 0:
            raise ValueError(
                f"Module {name!r} was never called in the forward pass; exclude it with `modules=`."
            )
    if num_data is not None and num_data != total:
        raise ValueError(f"num_data={num_data} but the data holds {total} data points.")
    if num_per_example_loss_terms is not None and num_per_example_loss_terms != terms_per_example:
        raise ValueError(
            f"num_per_example_loss_terms={num_per_example_loss_terms} but the model output has "
            f"{terms_per_example} loss terms per data point."
        )
    divisor = likelihood.mean_divisor(total, terms_per_example, num_classes)
    factors = {}
    for name, acc in accs.items():
        A = acc.input_factor(with_bias[name], total)
        if backward:
            S = acc.ggT / divisor
        else:
            S = torch.eye(acc.ggT.shape[0], dtype=acc.ggT.dtype, device=acc.ggT.device)
        factors[name] = FactorPair(A, S)
    options = {
        "fisher": fisher,
        "mc_samples": mc_samples,
        "approx": approx,
        "bias": bias,
        "seed": seed,
        "loss": type(loss_fn).__name__,
        "reduction": likelihood.reduction,
    }
    return KroneckerFactors(
        factors,
        param_names=param_names,
        options=options,
        num_data=total,
        num_per_example_loss_terms=terms_per_example,
    )


def _per_example(rows: Tensor, n: int, name: str, what: str, b: int) -> Tensor:
    """``[..., rows, d]`` → ``[..., n, T, d]``, checking the rows split into ``n`` data points."""
    if rows.shape[-2] % n:
        raise ValueError(
            f"Batch {b}: module {name!r} {what} has {rows.shape[-2]} rows, not a multiple of the "
            f"batch size {n}."
        )
    return rows.reshape(*rows.shape[:-2], n, rows.shape[-2] // n, rows.shape[-1])


def _cat_calls(parts: list[Tensor], dim: int) -> Tensor:
    """Concatenate the per-call pieces along the position dimension (no copy for one call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _accumulate_inputs(
    adapters: Mapping[str, LayerAdapter],
    calls: Mapping[str, list[Call]],
    accs: Mapping[str, _Accumulator],
    n: int,
    approx: str,
    b: int,
) -> None:
    """Add one batch's ``Σ a aᵀ / T`` (expand) or ``Σ ā āᵀ`` (reduce) to every accumulator.

    Modules fed the very same input tensors (queries, keys and values of an attention block)
    share one GEMM.
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name in adapters:
        if calls[name]:
            accs[name].calls += len(calls[name])
            key = tuple(
                (c.inputs.data_ptr(), c.inputs.shape, c.inputs.stride()) for c in calls[name]
            )
            groups.setdefault(key, []).append(name)
    for names in groups.values():
        first, acc = names[0], accs[names[0]]
        x = _cat_calls(
            [
                _per_example(adapters[first].input_rows(c.inputs), n, first, "input", b)
                for c in calls[first]
            ],
            dim=1,
        ).to(acc.gram.dtype)
        T = x.shape[1]
        if approx == "reduce":
            x, T = x.mean(dim=1), 1
        x = x.reshape(-1, x.shape[-1])
        colsum = x.sum(0).div_(T)
        if len(names) == 1:
            acc.gram.addmm_(x.T, x, alpha=1.0 / T)
            gram = None
        else:
            gram = torch.mm(x.T, x).div_(T)
        for name in names:
            if gram is not None:
                accs[name].gram += gram
            accs[name].colsum += colsum
            accs[name].count += n


def _accumulate_output_grads(
    adapters: Mapping[str, LayerAdapter],
    calls: Mapping[str, list[Call]],
    accs: Mapping[str, _Accumulator],
    output: Tensor,
    vectors: Tensor,
    n: int,
    approx: str,
    b: int,
) -> None:
    """Backpropagate ``vectors`` to every call's output and add ``Σ g gᵀ`` to the accumulators."""
    flat = [(name, c) for name in adapters for c in calls[name]]
    for name, c in flat:
        if c.output._version != c.output_version:
            raise ValueError(
                f"Batch {b}: the output of module {name!r} was modified in place after it was "
                "computed (e.g. by ReLU(inplace=True)); its gradient cannot be recovered. "
                "Use an out-of-place operation after this module."
            )
    grads = _output_gradients(output, [c for _, c in flat], vectors)
    per_module: dict[str, list[Tensor]] = {}
    for (name, _), g in zip(flat, grads, strict=True):
        if g is not None:
            rows = adapters[name].output_grad_rows(g)
            per_module.setdefault(name, []).append(_per_example(rows, n, name, "output", b))
    for name, gs in per_module.items():
        acc = accs[name]
        g = _cat_calls(gs, dim=2).to(acc.ggT.dtype)  # [K, n, T, d_out]
        if approx == "reduce":
            g = g.sum(dim=2)
        g = g.reshape(-1, g.shape[-1])
        acc.ggT.addmm_(g.T, g)


def _check_finite(accs: Mapping[str, _Accumulator], b: int, backward: bool) -> None:
    """Raise :class:`NonFiniteError` naming the module and batch if a running sum is not finite.

    The diagonals suffice: a NaN or Inf in any row ``a`` (or ``g``) reaches the diagonal of
    ``Σ a aᵀ`` (``Σ g gᵀ``) through ``a_j²``, so this costs ``O(d)``, not ``O(d²)``.
    """
    sums = [acc.gram.diagonal().sum() + acc.colsum.sum() for acc in accs.values()]
    if backward:
        sums = [s + acc.ggT.diagonal().sum() for s, acc in zip(sums, accs.values(), strict=True)]
    flags = torch.isfinite(torch.stack(sums))
    if bool(flags.all()):
        return
    name = next(n for n, ok in zip(accs, flags.tolist(), strict=True) if not ok)
    what = "activations or output gradients" if backward else "activations"
    raise NonFiniteError(
        f"Non-finite values (NaN or Inf) in the {what} of module {name!r} at batch {b}."
    )


def _check_finite_output(
    output: Tensor,
    adapters: Mapping[str, LayerAdapter],
    calls: Mapping[str, list[Call]],
    b: int,
) -> None:
    """Raise :class:`NonFiniteError` before sampling or backpropagating a non-finite output.

    Names the covered module (in call order) whose output first turned non-finite, if any.
    """
    if bool(torch.isfinite(output).all()):
        return
    bad = [
        (c.order, name)
        for name in adapters
        for c in calls[name]
        if not bool(torch.isfinite(c.output).all())
    ]
    first = min(bad, default=None)
    where = "the model output" if first is None else f"the output of module {first[1]!r}"
    raise NonFiniteError(f"Non-finite values (NaN or Inf) in {where} at batch {b}.")
