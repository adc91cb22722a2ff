r"""bayesian-lora's K-FAC functions (version 0.0.6), computed by kronfac.

Replace ``from bayesian_lora import calculate_kronecker_factors`` (or ``bayesian_lora.kfac``'s
hooks) by ``from kronfac.compat.bayesian_lora import ...``: the signatures, the dictionaries and
the numbers are the same for the same ``torch.manual_seed``.

Semantics (those of bayesian-lora 0.0.6). For every batch, ``forward_call(model, batch)``
returns logits ``f: [B, C]``; labels ``y ~ softmax(f)`` are drawn with ``torch.multinomial``
from the **global** RNG, and ``ℓ = CrossEntropy(f, y, reduction="mean")`` is backpropagated.
A covered layer (``nn.Linear``, transformers' ``Conv1D``) sees inputs ``[B, T, d_in]`` of which
only the **last position** counts: ``a_b = x[b, T−1]`` (with a trailing 1 when the layer has a
bias) and ``g_b = ∂ℓ/∂s[b, T−1]``. Over ``M`` batches

.. math::

    A = \frac{1}{M} \sum_{\text{batches}} \sum_b a_b a_b^\top, \qquad
    S = \frac{1}{M} \sum_{\text{batches}} \sum_b g_b g_b^\top .

Since ``ℓ`` is a mean over the ``B`` rows, ``g_b`` carries a ``1/B``: ``S`` is ``1/B`` times
kronfac's native (per-datum) ``S``, and ``A`` is ``B`` times its native ``A`` — the product
``A ⊗ S`` is the same. A side of at least ``lr_threshold`` (with ``n_kfac``) is kept low-rank
as ``L: [side, n_kfac]`` with ``L Lᵀ ≈`` the **undivided** sum, updated per batch by an
incremental SVD in float64 (``L ← U_k Σ_k`` of ``[L, rowsᵀ]``). Those are the library's scales,
kept for compatibility; :func:`kronfac.compute_factors` gives the Fisher's own scale.

Beyond bayesian-lora: 2-D inputs ``[B, d_in]`` (no position dimension) are used as they are,
GPT-2's ``Conv1D`` layers are covered, and bad input raises a clear error.

The Laplace posterior (:func:`model_evidence`, :func:`variance`) takes the factors as
bayesian-lora's ``model_evidence`` and ``variance`` do: every factor is a **root** ``F: [side, r]``
standing for ``F Fᵀ`` — the small ``[n_lora, n_lora]`` one a Cholesky factor (bayesian-lora's
``cholesky_decompose_small_factors``), the large one the low-rank ``[side, n_kfac]`` matrix above.
A module's weight ``W: [d_out, d_in]`` (flattened row-major) then has the curvature block
``H_l = (F_S F_Sᵀ) ⊗ (F_A F_Aᵀ)`` and, with the prior ``N(0, s2·I)`` (``δ = 1/s2``), the
posterior precision ``H + δI`` with ``H = diag_l(H_l)``. Both functions work in the factors'
eigenbases, from the thin SVDs ``F = U diag(σ) Vᵀ`` (eigenvalues ``σ²``), never forming a
``P x P`` matrix.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm

from kronfac.layers import get_adapter
from kronfac.layers.linear import LinearAdapter
from kronfac.linalg import KroneckerBlock, LowRankFactor

__all__ = [
    "KFAC_t",
    "calculate_kronecker_factors",
    "disable_input_hooks",
    "hooks_disabled",
    "incremental_svd",
    "model_evidence",
    "register_hooks",
    "remove_hooks",
    "save_input_hook",
    "save_output_grad_hook",
    "variance",
]

KFAC_t = dict[str, tuple[Tensor, Tensor]]
"""Module name → ``(A, S)``, each ``[side, side]`` or low-rank ``[side, n_kfac]``."""

# Factor dictionaries filled by the hooks: module name → (factor, is_low_rank).
_Store = dict[str, tuple[Tensor, bool]]

_enabled = {"all": True, "inputs": True}


@contextmanager
def hooks_disabled() -> Iterator[None]:
    """Within the context, the hooks of this module record nothing."""
    before = _enabled["all"]
    _enabled["all"] = False
    try:
        yield
    finally:
        _enabled["all"] = before


@contextmanager
def disable_input_hooks() -> Iterator[None]:
    """Within the context, input hooks record nothing (output-gradient hooks still do).

    :func:`calculate_kronecker_factors` runs its backward passes in this context, so forward
    passes recomputed by gradient checkpointing are not counted twice.
    """
    before = _enabled["inputs"]
    _enabled["inputs"] = False
    try:
        yield
    finally:
        _enabled["inputs"] = before


def incremental_svd(
    A: Tensor, a: Tensor, dtype: torch.dtype = torch.float64, n_kfac: int | None = None
) -> Tensor:
    r"""Fold the rows ``a`` into a low-rank factor: ``A' A'ᵀ ≈ A Aᵀ + aᵀ a``.

    With the thin SVD ``[A, aᵀ] = U Σ Vᵀ`` (in ``dtype``), ``A' = U_k Σ_k`` is the best
    rank-``k`` approximation (Eckart–Young), since ``[A, aᵀ][A, aᵀ]ᵀ = A Aᵀ + aᵀ a``.

    Args:
        A: ``[side, r]``, the factor so far.
        a: ``[m, side]``, the new rows.
        dtype: The dtype of the SVD (and of ``A'``).
        n_kfac: ``k``; ``r`` when ``None``.

    Returns:
        ``A': [side, min(k, side, r + m)]``.
    """
    k = A.shape[-1] if n_kfac is None else n_kfac
    U, sigma, _ = torch.linalg.svd(torch.cat([A.to(dtype), a.to(dtype).T], dim=1), False)
    return U[:, :k] * sigma[:k]


def _last_position(x: Tensor, module_name: str, what: str) -> Tensor:
    """``[B, d]`` rows: ``x`` itself when 2-D, its last position ``x[:, -1]`` when 3-D."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, -1]
    raise ValueError(
        f"The {what} of module {module_name!r} has shape {tuple(x.shape)}; expected "
        "[batch, features] or [batch, sequence, features]."
    )


def _accumulate(
    store: _Store,
    name: str,
    rows: Tensor,
    n_kfac: int | None,
    lr_threshold: int,
    svd_dtype: torch.dtype,
) -> None:
    """Add ``Σ_b r_b r_bᵀ`` of ``rows: [B, side]`` to ``store[name]``, dense or low-rank."""
    side = rows.shape[-1]
    if n_kfac is None or side < lr_threshold:
        gram = rows.T @ rows
        store[name] = (gram if name not in store else store[name][0] + gram, False)
        return
    L = store[name][0] if name in store else rows.new_zeros(side, n_kfac, dtype=svd_dtype)
    store[name] = (incremental_svd(L, rows, svd_dtype, n_kfac), True)


def save_input_hook(
    module_name: str,
    activations: _Store,
    n_kfac: int | None,
    lr_threshold: int,
    has_bias: bool = False,
    svd_dtype: torch.dtype = torch.float64,
) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    """A forward pre-hook adding the layer's (last-position) input to ``activations``.

    Args:
        module_name: The key in ``activations``.
        activations: Module name → ``(A, is_low_rank)``; ``A`` is ``Σ a aᵀ`` (``[side, side]``)
            or ``L: [side, n_kfac]`` with ``L Lᵀ ≈ Σ a aᵀ`` once ``side >= lr_threshold``.
        n_kfac: Rank of low-rank factors; ``None`` keeps every factor dense.
        lr_threshold: Side (``d_in + 1`` with a bias) from which the factor is low-rank.
        has_bias: Append a constant 1 to every input (the bias column).
        svd_dtype: dtype of the incremental SVD.

    Returns:
        ``hook(module, args)`` for :meth:`torch.nn.Module.register_forward_pre_hook`.
    """

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        if not (_enabled["all"] and _enabled["inputs"]):
            return
        if not args or not isinstance(args[0], Tensor):
            raise ValueError(
                f"Module {module_name!r} was called without a positional input tensor; "
                "the input hook reads the first positional argument."
            )
        a = _last_position(args[0].detach(), module_name, "input")
        if has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        _accumulate(activations, module_name, a, n_kfac, lr_threshold, svd_dtype)

    return hook


def save_output_grad_hook(
    module_name: str,
    output_grads: _Store,
    n_kfac: int | None,
    lr_threshold: int,
    svd_dtype: torch.dtype = torch.float64,
) -> Callable[[nn.Module, Any, tuple[Tensor | None, ...]], None]:
    """A full backward hook adding the gradient of the layer's (last-position) output.

    Args:
        module_name: The key in ``output_grads``.
        output_grads: Module name → ``(S, is_low_rank)``, as for :func:`save_input_hook`.
        n_kfac: Rank of low-rank factors; ``None`` keeps every factor dense.
        lr_threshold: Side ``d_out`` from which the factor is low-rank.
        svd_dtype: dtype of the incremental SVD.

    Returns:
        ``hook(module, grad_input, grad_output)`` for
        :meth:`torch.nn.Module.register_full_backward_hook`.
    """

    def hook(_module: nn.Module, _grad_input: Any, grad_output: tuple[Tensor | None, ...]) -> None:
        if not _enabled["all"] or grad_output[0] is None:
            return
        g = _last_position(grad_output[0].detach(), module_name, "output gradient")
        _accumulate(output_grads, module_name, g, n_kfac, lr_threshold, svd_dtype)

    return hook


def _covered(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (features on the last dimension)."""
    return isinstance(get_adapter(module), LinearAdapter)


def register_hooks(
    model: nn.Module,
    activations: _Store,
    output_grads: _Store,
    target_module_keywords: list[str],
    n_kfac: int | None = 10,
    lr_threshold: int = 100,
    exclude_bias: bool = False,
) -> list[RemovableHandle]:
    """Hook every ``nn.Linear`` / ``Conv1D`` whose name contains one of the keywords.

    Args:
        model: The model (usually the whole network, with or without LoRA adapters).
        activations: Filled with ``(A, is_low_rank)`` per module (:func:`save_input_hook`).
        output_grads: Filled with ``(S, is_low_rank)`` per module (:func:`save_output_grad_hook`).
        target_module_keywords: Name substrings selecting modules (``[""]``: every module).
        n_kfac: Rank of low-rank factors; ``None`` keeps every factor dense.
        lr_threshold: Side from which a factor is low-rank.
        exclude_bias: Leave the bias column out of ``A``.

    Returns:
        The hook handles, for :func:`remove_hooks`.

    Raises:
        ValueError: If a selected module already has factors in ``activations`` /
            ``output_grads``.
    """
    handles: list[RemovableHandle] = []
    for name, module in model.named_modules():
        if not (any(kw in name for kw in target_module_keywords) and _covered(module)):
            continue
        if name in activations or name in output_grads:
            remove_hooks(handles)
            raise ValueError(f"Module {name!r} is already registered (its factors exist).")
        has_bias = getattr(module, "bias", None) is not None and not exclude_bias
        handles.append(
            module.register_forward_pre_hook(
                save_input_hook(name, activations, n_kfac, lr_threshold, has_bias)
            )
        )
        handles.append(
            module.register_full_backward_hook(
                save_output_grad_hook(name, output_grads, n_kfac, lr_threshold)
            )
        )
    return handles


def remove_hooks(hooks: list[RemovableHandle]) -> None:
    """Remove (and pop) every handle of ``hooks``."""
    while hooks:
        hooks.pop().remove()


def calculate_kronecker_factors(
    model: nn.Module,
    forward_call: Callable[[nn.Module, Any], Tensor],
    loader: Iterable[Any],
    n_kfac: int | None = None,
    lr_threshold: int = 512,
    target_module_keywords: list[str] | None = None,
    exclude_bias: bool = False,
    use_tqdm: bool = False,
) -> KFAC_t:
    r"""The Kronecker factors ``(A, S)`` of every selected layer (module docstring).

    Like bayesian-lora, this puts ``model`` in train mode and zeroes its gradients before each
    batch; unlike it, the gradients of the sampled loss are cleared at the end.

    Args:
        model: The model (it needn't have LoRA adapters).
        forward_call: ``forward_call(model, batch) -> logits [B, C]`` (e.g. the last token's
            next-token logits).
        loader: The batches (a ``DataLoader``; drop a partial last batch, since every batch
            weighs the same).
        n_kfac: Rank of the low-rank factors; ``None`` keeps every factor dense.
        lr_threshold: Side from which a factor is low-rank.
        target_module_keywords: Name substrings selecting modules; ``None`` / ``[""]`` selects
            every ``nn.Linear`` / ``Conv1D``.
        exclude_bias: Leave the bias column out of ``A``.
        use_tqdm: Show a progress bar.

    Returns:
        Module name → ``(A, S)``: dense factors divided by the number of batches, low-rank ones
        ``[side, n_kfac]`` (float64) holding the undivided sums.

    Raises:
        ValueError: If no module is selected, ``loader`` is empty, or ``forward_call`` does not
            return 2-D logits.
    """
    keywords = [""] if target_module_keywords is None else list(target_module_keywords)
    model = model.train()
    activations: _Store = {}
    output_grads: _Store = {}
    hooks = register_hooks(
        model, activations, output_grads, keywords, n_kfac, lr_threshold, exclude_bias
    )
    if not hooks:
        raise ValueError(
            f"target_module_keywords={keywords!r} selects no nn.Linear or Conv1D module."
        )
    num_batches = 0
    try:
        for batch in tqdm(loader, disable=not use_tqdm, file=sys.stdout):
            model.zero_grad()
            logits = forward_call(model, batch)
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits)
                raise ValueError(
                    f"forward_call must return logits [batch, n_classes], got {shape}. "
                    "For a language model, return the logits of the last token: "
                    "model(**batch).logits[:, -1]."
                )
            with torch.no_grad():
                labels = torch.multinomial(logits.softmax(-1), 1).view(-1)
            loss = F.cross_entropy(logits, labels, reduction="mean")
            with disable_input_hooks():
                loss.backward()
            num_batches += 1
    finally:
        remove_hooks(hooks)
        model.zero_grad()
    if num_batches == 0:
        raise ValueError("The loader yielded no batch: there is no data to compute factors on.")
    factors: KFAC_t = {}
    for name, (A, A_low) in activations.items():
        if name not in output_grads:
            raise ValueError(
                f"Module {name!r} ran in forward_call but received no output gradient: its "
                "output does not reach the logits. Leave it out with target_module_keywords."
            )
        S, S_low = output_grads[name]
        factors[name] = (
            A if A_low else A / num_batches,
            S if S_low else S / num_batches,
        )
    return factors


def _prior_variance(s2: Tensor | float) -> Tensor:
    """``s2`` as a one-element float64 tensor (its graph kept), checked positive and finite."""
    s2 = s2.to(torch.float64) if isinstance(s2, Tensor) else torch.tensor(s2, dtype=torch.float64)
    value = s2.detach()
    if value.numel() != 1 or not bool(torch.isfinite(value).all()) or float(value) <= 0:
        raise ValueError(
            f"s2 (the prior variance) must be one positive finite number, got {value.tolist()!r}."
        )
    return s2


def _eigenpairs(
    name: str, A: Tensor, S: Tensor, n_lora: int, n_kfac: int
) -> tuple[LowRankFactor, LowRankFactor]:
    """``(F_S F_Sᵀ, F_A F_Aᵀ)`` of a module's roots as float64 eigen-pairs, layout checked.

    Raises:
        ValueError: Unless one root is ``[n_lora, n_lora]`` and the other ``[side, n_kfac]``.
    """
    small = (n_lora, n_lora)
    if not (
        A.ndim == S.ndim == 2
        and (
            (A.shape == small and S.shape[1] == n_kfac)
            or (S.shape == small and A.shape[1] == n_kfac)
        )
    ):
        raise ValueError(
            f"Factors of module {name!r} have shapes A{tuple(A.shape)}, S{tuple(S.shape)}; "
            f"expected one Cholesky factor [n_lora, n_lora] = {list(small)} and one low-rank "
            f"factor [side, n_kfac = {n_kfac}] (calculate_kronecker_factors with n_kfac, then the "
            "small factor replaced by its Cholesky factor)."
        )
    return _eigenpair(S), _eigenpair(A)


def _eigenpair(root: Tensor) -> LowRankFactor:
    """``F Fᵀ = U diag(σ²) Uᵀ`` from the thin SVD ``F = U diag(σ) Vᵀ``, in float64."""
    U, sigma, _ = torch.linalg.svd(root.detach().to(torch.float64), full_matrices=False)
    return LowRankFactor(U, sigma.square())


def _module_weight(modules: Mapping[str, nn.Module], name: str, size: int) -> Tensor:
    """The weight of the factors' module ``name``, checked to have ``size`` entries."""
    weight = getattr(modules.get(name), "weight", None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module {name!r} of the factors is not in the model or has no weight.")
    if weight.numel() != size:
        raise ValueError(
            f"The factors of module {name!r} cover {size} parameters (A side x S side) but its "
            f"weight {tuple(weight.shape)} has {weight.numel()}; a bias column is not supported "
            "(compute the factors with exclude_bias=True)."
        )
    return weight


def model_evidence(
    model: nn.Module,
    LL: Tensor | float,
    factors: KFAC_t,
    n_lora: int,
    n_kfac: int,
    s2: Tensor | float,
) -> Tensor:
    r"""The Laplace log marginal likelihood (evidence) of the factors' posterior.

    With the curvature ``H = diag_l(H_l)`` of the roots (module docstring), ``P`` parameters
    ``θ*`` (the weights of the factors' modules), the prior ``N(0, s2·I)`` and ``δ = 1/s2``:

    .. math::

        \log p(D) ≈ E = LL - ½ δ ‖θ^*‖² + ½ P \log δ - ½ \log\det(H + δI)
                      = LL - ½ δ ‖θ^*‖² - ½ Σ_l Σ_{ij} \log(1 + s2 · s_i a_j),

    ``s_i`` and ``a_j`` the non-zero eigenvalues of ``F_S F_Sᵀ`` and ``F_A F_Aᵀ`` (by Sylvester's
    determinant identity the zero ones add ``\log 1 = 0``): ``n_kfac · n_lora`` terms per module,
    no ``P x P`` matrix. ``LL`` is the log-likelihood the curvature belongs to (``log p(D|θ*)``
    of the data whose summed negative log-likelihood has the GGN ``H``); the temperature is 1.
    The result is differentiable in ``s2`` and ``LL`` (``θ*`` and the factors are constants), so
    ``-model_evidence(...)`` can be minimised over ``s2``.

    bayesian-lora 0.0.6 returns instead, with ``θ_p`` its trainable parameters named ``*lora*``
    and ``d_L`` the largest dimension of the last module's factors,

    .. math::

        E_{0.0.6} = LL + δ Σ_p ‖θ_p‖₂ + ½ \log\det(I + s2 · H) - ½ n_{lora} d_L \log s2,

    so that, for the same parameters,
    ``E_{0.0.6} − E = δ Σ_p (‖θ_p‖₂ + ½ ‖θ_p‖₂²) + log det(I + s2·H) − ½ n_lora d_L log s2``:
    the prior term has the wrong sign and norms that are not squared, the log-determinant the
    wrong sign, and the ``log s2`` term counts one module's parameters.

    Args:
        model: The model the factors were computed on, at ``θ*``.
        LL: ``log p(D|θ*)``, a scalar tensor (or a float).
        factors: Module name → ``(A, S)`` roots: one ``[n_lora, n_lora]`` Cholesky factor and
            one ``[side, n_kfac]`` low-rank factor (module docstring).
        n_lora: The LoRA rank.
        n_kfac: The rank of the low-rank factors.
        s2: The prior variance, a positive one-element tensor (or a float).

    Returns:
        The evidence, shaped and typed as ``LL + s2`` (a 0-d tensor for 0-d inputs).

    Raises:
        ValueError: ``s2`` not one positive finite number, no factors, factors not in the
            layout above, a module missing from ``model``, or a weight whose size differs from
            the factors' ``A side x S side``.
    """
    LL = torch.as_tensor(LL)
    dtype = torch.result_type(LL, s2)
    s2 = _prior_variance(s2)
    if not factors:
        raise ValueError("The factors cover no module: there is no posterior.")
    modules = dict(model.named_modules())
    sq_norm, logdet = [], []
    for name, (A, S) in factors.items():
        fS, fA = _eigenpairs(name, A, S, n_lora, n_kfac)
        weight = _module_weight(modules, name, fS.side * fA.side)
        sq_norm.append(weight.detach().to(LL.device, torch.float64).square().sum())
        lam = fS.eigenvalues[:, None] * fA.eigenvalues[None, :]
        logdet.append(torch.log1p(s2.to(lam.device) * lam).sum().to(LL.device))
    total = torch.stack(sq_norm).sum() / s2.to(LL.device) + torch.stack(logdet).sum()
    return LL - 0.5 * total.to(dtype)


def _batch_size(inputs: Any) -> int:
    """The number of rows of ``inputs``' ``input_ids`` (a dict or a tokenizer's batch)."""
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    ids = getattr(inputs, "input_ids", None) if ids is None else ids
    if not isinstance(ids, Tensor) or ids.ndim == 0:
        raise ValueError(
            "inputs must hold the batch's input_ids [batch, ...] (a tokenizer's output or a "
            f"dict), got {type(inputs).__name__}."
        )
    return ids.shape[0]


def _layer_jacobian(
    jacobian: Mapping[str, Tensor], name: str, shape: tuple[int, int, int, int]
) -> Tensor:
    """The Jacobian of module ``name``'s weight as ``[batch, n_logits, d_out, d_in]``.

    The key is ``f"{name}.weight"``, or the one key ending in ``f".{name}.weight"``; a
    ``[batch, n_logits, d_in, d_out]`` Jacobian (a ``Conv1D`` weight) is transposed.
    """
    suffix = f".{name}.weight"
    keys = [k for k in (f"{name}.weight",) if k in jacobian] or [
        k for k in jacobian if k.endswith(suffix)
    ]
    if len(keys) != 1:
        found = "none" if not keys else f"several: {keys}"
        raise ValueError(
            f"Expected one Jacobian for the weight of module {name!r} (key {name}.weight or "
            f"ending in {suffix}), found {found}."
        )
    J = jacobian[keys[0]]
    batch, n_logits, d_out, d_in = shape
    if J.shape == shape:
        return J
    if J.shape == (batch, n_logits, d_in, d_out):
        return J.mT
    raise ValueError(
        f"The Jacobian {keys[0]!r} has shape {tuple(J.shape)}; expected [batch, n_logits, d_out, "
        f"d_in] = {list(shape)} (batch from inputs, d_out and d_in the sides of S and A)."
    )


def variance(
    inputs: Any,
    jacobian: Mapping[str, Tensor],
    factors: KFAC_t,
    s2: Tensor | float,
    n_logits: int,
    n_lora: int,
    n_kfac: int,
    device: str | torch.device,
) -> Tensor:
    r"""The linearised predictive covariance of the logits, ``J Σ Jᵀ``, per input.

    With the posterior covariance ``Σ = (H + δI)⁻¹`` (``δ = 1/s2``, ``H = diag_l(H_l)`` of the
    roots, module docstring) and ``J_l: [n_logits, P_l]`` the Jacobian of an input's logits with
    respect to module ``l``'s weight,

    .. math::

        Σ_f = Σ_l J_l (H_l + δI)^{-1} J_l^\top, \qquad
        (H_l + δI)^{-1} = (Q_S ⊗ Q_A) \operatorname{diag}\Big(\frac{1}{s_i a_j + δ}\Big)
        (Q_S ⊗ Q_A)^\top + s2 \big(I - (Q_S Q_S^\top) ⊗ (Q_A Q_A^\top)\big),

    ``Q`` the factors' eigenvectors of non-zero eigenvalue: the exact inverse, applied by two
    rotations per module (no ``P x P`` matrix). It is bayesian-lora 0.0.6's ``variance`` (its
    Woodbury form ``s2 J Jᵀ − s2² (J U) (I + s2 UᵀU)⁻¹ (J U)ᵀ`` with ``U = F_S ⊗ F_A`` is the same
    matrix), computed in float64 without the cancellation between its two terms.

    Args:
        inputs: The batch as given to the model: a tokenizer's output or a dict; only the
            number of rows of its ``input_ids`` is used.
        jacobian: Parameter name → Jacobian ``[batch, n_logits, *weight.shape]`` of the logits
            (``torch.func.jacrev`` over the parameters); each module's weight is found by its
            name (the key ``f"{name}.weight"``, or the one ending in ``f".{name}.weight"``).
        factors: Module name → ``(A, S)`` roots, as for :func:`model_evidence`.
        s2: The prior variance, a positive one-element tensor (or a float).
        n_logits: ``C``, the number of logits.
        n_lora: The LoRA rank.
        n_kfac: The rank of the low-rank factors.
        device: Where to return the result.

    Returns:
        ``Σ_f: [batch, n_logits, n_logits]`` in the Jacobians' dtype, on ``device``.

    Raises:
        ValueError: ``s2`` not one positive finite number, no factors, factors not in
            :func:`model_evidence`'s layout, ``inputs`` without ``input_ids``, a module without
            exactly one weight Jacobian, or a Jacobian not ``[batch, n_logits, d_out, d_in]``.
    """
    delta = 1.0 / float(_prior_variance(s2).detach())
    if not factors:
        raise ValueError("The factors cover no module: there is no posterior.")
    batch = _batch_size(inputs)
    terms, dtypes = [], []
    for name, (A, S) in factors.items():
        fS, fA = _eigenpairs(name, A, S, n_lora, n_kfac)
        J = _layer_jacobian(jacobian, name, (batch, n_logits, fS.side, fA.side))
        dtypes.append(J.dtype)
        J = J.to(torch.float64).flatten(0, 1)  # [batch·C, d_out, d_in]
        cov = KroneckerBlock(fS, fA, name).inverse(delta, exact=True)
        cov_J = cov.matmat(J.permute(1, 2, 0)).permute(2, 0, 1)  # Σ_l J_lᵀ, [batch·C, d_out, d_in]
        flat = (batch, n_logits, -1)
        terms.append(J.reshape(flat) @ cov_J.reshape(flat).mT)
    dtype = functools.reduce(torch.promote_types, dtypes)
    return torch.stack(terms).sum(0).to(device=device, dtype=dtype)
