"""The test zoo: every model, data set and dense reference more than one test file uses.

Plain functions and classes, imported with ``from helpers import ...`` (``conftest.py`` holds
the fixtures and tells where what lives). Sections:

1. numbers: float64, private generators, seeded parameters, comparisons
   (:func:`assert_rel_close`, :func:`assert_factors_close`), parameter layout, and
   :func:`factors_like` (new factors with the metadata of others);
2. dense references: the damped inverse and the π-damping split (Martens & Grosse, 2015);
3. models: :func:`mlp`, :class:`PerPosition`, :class:`CalledTwice`, :func:`tiny_llama` (with
   :func:`lm_logits` and :func:`next_token_batches`);
4. data: losses, targets, batches (:func:`make_data`, :func:`split_batches`) and padded
   sequences (:func:`sequences`, :func:`padded`, :func:`padding_mask`);
5. peer libraries.

Data never touch the global RNG: every draw comes from a private ``torch.Generator``. Nor do
the models, but for :func:`tiny_llama`, which seeds it (its users draw from it afterwards).
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
from collections.abc import Sequence
from functools import partial
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

import kronfac

DT = torch.float64
TOL = 1e-10  # exact identities in float64: round-off only


# ----------------------------------------------------------------------------------------------
# 1. numbers


def gen(seed: int) -> torch.Generator:
    """A private generator (the global RNG is never touched by the tests' data)."""
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator, dtype: torch.dtype = DT) -> Tensor:
    """Standard normal tensor (float64 unless said otherwise) drawn from ``g``."""
    return torch.randn(*shape, generator=g, dtype=dtype)


def init(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic float64 parameters scaled by the fan-in (without the global RNG)."""
    g = gen(seed)
    model.to(DT)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(randn(*p.shape, g=g) / math.sqrt(fan_in))
    return model


def assert_rel_close(actual, expected, tol: float = TOL, what: str = "") -> None:
    """``max|actual - expected| <= tol · max|expected|`` (and the same shape)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual = actual.to(expected.dtype)
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(scale, 1e-300), (
        f"{what}: max abs error {err:.3e}, reference max {scale:.3e} "
        f"(rel {err / max(scale, 1e-300):.3e}, tol {tol:.0e})"
    )


def assert_factors_close(actual, expected, tol: float = TOL, what: str = "") -> None:
    """Factors of the same modules, in the same order, each ``A`` and ``S`` within ``tol``.

    Low-rank factors are compared as the dense matrices they stand for.
    """
    assert list(actual) == list(expected), f"{what}: modules {list(actual)} != {list(expected)}"
    for name in expected:
        for side, a, e in zip("AS", actual[name], expected[name], strict=True):
            if isinstance(e, kronfac.LowRankFactor):
                a, e = a.to_dense(), e.to_dense()
            assert_rel_close(a, e, tol, f"{what} {side} of {name}".strip())


def factors_like(factors, pairs) -> kronfac.KroneckerFactors:
    """``KroneckerFactors`` of ``pairs`` (module → ``(A, S)``) with the metadata of ``factors``
    (parameter names, options, counts) and no corrections."""
    return kronfac.KroneckerFactors(
        pairs,
        param_names=factors.param_names,
        options=factors.options,
        num_data=factors.num_data,
        num_per_example_loss_terms=factors.num_per_example_loss_terms,
    )


def param_slices(model: nn.Module) -> dict[str, slice]:
    out, start = {}, 0
    for n, p in model.named_parameters():
        out[n] = slice(start, start + p.numel())
        start += p.numel()
    return out


def kfac_block(S: Tensor, A: Tensor, joint: bool) -> Tensor:
    """Dense ``S ⊗ A`` of one Linear layer in the *parameter* layout ``[vec W, b]``.

    ``joint``: ``A`` is ``[d_in+1, d_in+1]`` and ``torch.kron(S, A)`` acts on the row-major
    flattening of ``[W | b]``; we permute it to ``(W.flatten(), b)``. Separate: block-diagonal
    ``diag(S ⊗ A, S)``.
    """
    d_out = S.shape[0]
    if not joint:
        d_in = A.shape[0]
        M = torch.zeros(d_out * (d_in + 1), d_out * (d_in + 1), dtype=S.dtype)
        M[: d_out * d_in, : d_out * d_in] = torch.kron(S, A)
        M[d_out * d_in :, d_out * d_in :] = S
        return M
    d_in = A.shape[0] - 1
    K = torch.kron(S, A)  # index i*(d_in+1) + j
    perm = [i * (d_in + 1) + j for i in range(d_out) for j in range(d_in)]
    perm += [i * (d_in + 1) + d_in for i in range(d_out)]
    perm_t = torch.tensor(perm)
    return K[perm_t][:, perm_t]


# ----------------------------------------------------------------------------------------------
# 2. dense references


def damped_inv(M: Tensor, delta) -> Tensor:
    """``(M + δI)⁻¹`` of a ``[d, d]`` matrix or of each ``[d, d]`` of a ``[g, d, d]`` stack.

    ``delta``: a number, or a ``[g]`` tensor (one ``δ`` per matrix of the stack).
    """
    d = torch.as_tensor(delta, dtype=M.dtype)
    if d.ndim:
        d = d[:, None, None]
    return torch.linalg.inv(M + d * torch.eye(M.shape[-1], dtype=M.dtype))


def pi_damping(
    S: Tensor, A: Tensor, damping: float, min_damping: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Factored π-damping ``(δ_S, δ_A)`` of ``(S + δ_S I) ⊗ (A + δ_A I)``.

    Martens & Grosse (2015), §6.3: ``π = √((tr A / dim A) / (tr S / dim S))``,
    ``δ_A = max(π√δ, min_damping)``, ``δ_S = max(√δ/π, min_damping)``.

    ``S``, ``A``: ``[p, p]`` and ``[q, q]`` (0-dim results), or ``[g, p, p]`` and ``[g, q, q]``
    (one split per group, ``[g]`` results). ``π`` needs positive mean eigenvalues: the
    library's fallback for the others has a test of its own, not this reference.
    """
    mean_s = S.diagonal(dim1=-2, dim2=-1).mean(-1)
    mean_a = A.diagonal(dim1=-2, dim2=-1).mean(-1)
    assert bool((mean_s > 0).all()) and bool((mean_a > 0).all()), "π needs tr S, tr A > 0"
    pi, root = (mean_a / mean_s).sqrt(), math.sqrt(damping)
    return (root / pi).clamp(min=min_damping), (root * pi).clamp(min=min_damping)


# ----------------------------------------------------------------------------------------------
# 3. models

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "relu_": partial(nn.ReLU, inplace=True),  # in place, as torch's trailing underscore says
}


def mlp(
    widths: Sequence[int],
    act: str | Sequence[str | None] | None = "tanh",
    *,
    bias: bool | Sequence[bool] = True,
    layernorm: bool = False,
    seed: int = 0,
    torch_init: bool = False,
    dtype: torch.dtype = DT,
) -> nn.Sequential:
    """``Linear(widths[0], widths[1]) → act → … → Linear(widths[-2], widths[-1])``.

    Args:
        widths: the layer widths, input first.
        act: the activation between two Linear layers (a name of :data:`ACTIVATIONS`), one per
            gap, or ``None``: no module between them (a deep linear network, Linears
            ``"0", "1", …``).
        bias: whether the Linear layers have a bias: one for all, or one per layer.
        layernorm: a ``LayerNorm`` after every hidden Linear layer, before the activation.
        seed: of the parameters.
        torch_init: PyTorch's default initialisation (float32 draws) under
            ``torch.manual_seed(seed)``, in a forked RNG (the global RNG is left as it was);
            by default the float64 fan-in initialisation :func:`init`.
        dtype: of the returned model (initialised first, then cast).
    """
    n = len(widths) - 1
    acts = [act] * (n - 1) if act is None or isinstance(act, str) else list(act)
    biases = [bias] * n if isinstance(bias, bool) else list(bias)
    assert len(acts) == n - 1 and len(biases) == n, (widths, act, bias)

    def build() -> nn.Sequential:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            if i and layernorm:
                layers.append(nn.LayerNorm(a))
            if i and acts[i - 1] is not None:
                layers.append(ACTIVATIONS[acts[i - 1]]())
            layers.append(nn.Linear(a, b, bias=biases[i]))
        return nn.Sequential(*layers)

    if not torch_init:
        return init(build(), seed).to(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().to(dtype)


class PerPosition(nn.Module):
    """``net`` at every position of ``x: [N, T, d]``: its layers are shared over ``T``.

    ``class_dim_1``: outputs ``[N, C, T]`` (cross-entropy's class dimension) instead of
    ``[N, T, C]``. An ``attention_mask`` is taken and not used: padding cannot reach a real
    position.
    """

    def __init__(self, net: nn.Module, class_dim_1: bool = False) -> None:
        super().__init__()
        self.net = net
        self.class_dim_1 = class_dim_1

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = self.net(x)
        return out.transpose(1, 2) if self.class_dim_1 else out


class CalledTwice(nn.Module):
    """One module, ``lin``, called twice in every forward pass.

    Chained (``head`` given): ``head(tanh(lin(tanh(lin(x)))))``, the second call on the first's
    output. Side by side (no ``head``): ``[lin(x₁), other(x₂)]`` on the two halves of ``x``,
    both outputs going straight to the loss; ``other`` is ``lin`` unless given (a module that
    may share ``lin``'s parameters).
    """

    def __init__(
        self, lin: nn.Linear, head: nn.Module | None = None, other: nn.Linear | None = None
    ) -> None:
        super().__init__()
        self.lin = lin
        self.head = head
        self.other = other

    def forward(self, x: Tensor) -> Tensor:
        if self.head is not None:
            return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))
        d = self.lin.in_features
        second = self.lin if self.other is None else self.other
        return torch.cat([self.lin(x[:, :d]), second(x[:, d:])], dim=1)


def called_twice(width: int, classes: int, seed: int = 0) -> CalledTwice:
    """The chained :class:`CalledTwice` of a ``Linear(width, width)``, float64, seeded."""
    return init(CalledTwice(nn.Linear(width, width), nn.Linear(width, classes)), seed)


def tiny_llama(vocab: int) -> nn.Module:
    """A 2-layer, 16-wide LlamaForCausalLM in float64, eval mode, random weights (no download)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    return transformers.LlamaForCausalLM(config).to(DT).eval()


def lm_logits(model: nn.Module, X) -> Tensor:
    """A causal LM's logits as ``[N, V, T]``, for token-level cross-entropy on ``[N, T]``."""
    return model(**X).logits.transpose(1, 2)


def next_token_batches(ids: Tensor, size: int) -> list[tuple[dict[str, Tensor], Tensor]]:
    """Batches of ``size`` sequences: ``({"input_ids": ids[:, :-1]}, ids[:, 1:])``."""
    return [
        ({"input_ids": ids[i : i + size, :-1]}, ids[i : i + size, 1:])
        for i in range(0, len(ids), size)
    ]


# ----------------------------------------------------------------------------------------------
# 4. data

LOSSES: dict[str, type[nn.Module]] = {
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce": nn.BCEWithLogitsLoss,
}


def make_loss(loss: str, reduction: str = "mean") -> nn.Module:
    return LOSSES[loss](reduction=reduction)


def make_targets(
    loss: str, out_shape: Sequence[int], g: torch.Generator, dtype: torch.dtype = DT
) -> Tensor:
    """Targets for a model output of shape ``out_shape``.

    MSE: normal ``[*out_shape]``; BCE: 0 / 1 ``[*out_shape]``; CE: class indices, the classes
    in dimension 1 of the output (``[N, C, *rest]`` → ``[N, *rest]``).
    """
    if loss == "mse":
        return randn(*out_shape, g=g, dtype=dtype)
    if loss == "bce":
        return torch.randint(0, 2, tuple(out_shape), generator=g).to(dtype)
    if loss == "ce":
        return torch.randint(0, out_shape[1], (out_shape[0], *out_shape[2:]), generator=g)
    raise ValueError(loss)


def make_data(
    model: nn.Module | int,
    loss: str,
    batch_sizes: Sequence[int],
    in_shape: Sequence[int] | None,
    seed: int = 0,
    *,
    X_of=None,
    dtype: torch.dtype = DT,
) -> list[tuple[Tensor, Tensor]]:
    """Batches ``(X [B, *in_shape], y)`` of the given (uneven) sizes, from ``gen(seed)``.

    Each batch draws its inputs, then its targets (:func:`make_targets`), shaped for the output
    of ``model``, or for ``[B, *in_shape[:-1], C]`` when ``model`` is the width ``C``.
    ``X_of(B, g)`` draws the inputs instead of a standard normal (``in_shape`` unused).
    """
    g = gen(seed)
    data = []
    for B in batch_sizes:
        X = randn(B, *in_shape, g=g, dtype=dtype) if X_of is None else X_of(B, g)
        if isinstance(model, int):
            out_shape = (B, *X.shape[1:-1], model)
        else:
            with torch.no_grad():
                out_shape = tuple(model(X).shape)
        data.append((X, make_targets(loss, out_shape, g, dtype)))
    return data


def split_batches(X, y: Tensor, sizes: Sequence[int]) -> list[tuple]:
    """``(X, y)`` split along the first dimension into batches of ``sizes`` (uneven on purpose).

    ``X`` may be anything that slices along its first dimension.
    """
    out, start = [], 0
    for s in sizes:
        out.append((X[start : start + s], y[start : start + s]))
        start += s
    return out


def sequences(
    lengths: Sequence[int], *, d_in: int = 4, d_out: int = 3, classes: int = 3, seed: int = 0
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Unpadded sequences ``(xs, ys, cls)``: inputs ``[L, d_in]``, regression targets
    ``[L, d_out]`` and class targets ``[L]`` of each length ``L``, from ``gen(seed)``."""
    g = gen(seed)
    xs = [randn(L, d_in, g=g) for L in lengths]
    ys = [randn(L, d_out, g=g) for L in lengths]
    cls = [torch.randint(0, classes, (L,), generator=g) for L in lengths]
    return xs, ys, cls


def padded(seqs: Sequence[Tensor], T: int, fill: float) -> Tensor:
    """The sequences ``[L, ...]`` right-padded with ``fill`` to one ``[n, T, ...]`` tensor."""
    out = torch.full((len(seqs), T, *seqs[0].shape[1:]), fill, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def padding_mask(lengths: Sequence[int], T: int) -> Tensor:
    """The ``attention_mask`` ``[n, T]`` of right-padded sequences: 1 at real positions."""
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()


# ----------------------------------------------------------------------------------------------
# 5. peer libraries


def require_peer(name: str) -> ModuleType:
    """Import a peer library the compatibility tests compare against.

    Skips locally when it is not installed; on CI (``CI`` set, where ``.ci/run`` installs the
    peers) a missing peer is an error, so the comparisons cannot silently stop running.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must install {name!r} for the compatibility tests.") from err
        pytest.skip(f"{name} is not installed", allow_module_level=True)
