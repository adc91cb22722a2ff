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
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm

from kronfac.layers import get_adapter
from kronfac.layers.linear import LinearAdapter

__all__ = [
    "KFAC_t",
    "calculate_kronecker_factors",
    "disable_input_hooks",
    "hooks_disabled",
    "incremental_svd",
    "register_hooks",
    "remove_hooks",
    "save_input_hook",
    "save_output_grad_hook",
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
