"""Dense, exact curvature references built with ``torch.func`` (no kronfac inside).

Every function here works in the dtype of the model (use float64 models) and returns dense
``[P, P]`` matrices in the parameter layout of kronfac's operators: the parameters named in
``param_names`` (``model.named_parameters()`` order), each flattened row-major.

Scale convention (docs/conventions.md, "The scale"): the curvature of the *dataset* loss as
``loss_fn`` defines it. With ``reduction="sum"`` the dataset loss is the sum of the per-batch
losses. With ``reduction="mean"`` it is the mean over every term of the whole dataset
(not the mean of per-batch means): the summed loss divided by the number of terms torch averages
over, i.e. ``N·R`` for cross-entropy (one categorical term per position) and the number of output
entries ``N·R·C`` for MSE and BCE. We compute everything for the summed loss and divide by that
divisor at the end, which is exactly the Hessian of the loss taken over the whole dataset at once.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

Forward = Callable[[nn.Module, Tensor], Tensor]


def _default_forward(model: nn.Module, X: Tensor) -> Tensor:
    return model(X)


def sum_loss(loss_fn: nn.Module) -> nn.Module:
    """A copy of ``loss_fn`` with ``reduction="sum"``."""
    lf = copy.deepcopy(loss_fn)
    lf.reduction = "sum"
    return lf


def is_cross_entropy(loss_fn: nn.Module) -> bool:
    return isinstance(loss_fn, nn.CrossEntropyLoss)


def batch_divisor(loss_fn: nn.Module, output: Tensor) -> int:
    """Number of terms torch's ``reduction="mean"`` averages over for one batch's output."""
    if is_cross_entropy(loss_fn):
        # class dimension is dim 1 (or dim 0 for an unbatched 1d input)
        return output.numel() // output.shape[1] if output.ndim >= 2 else 1
    if isinstance(loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss)):
        return output.numel()
    raise NotImplementedError(type(loss_fn))


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {n: b.detach() for n, b in model.named_buffers()}


def param_names_of(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


class _Functional:
    """``θ ↦ forward(model with θ, X)`` with the other parameters and buffers held fixed."""

    def __init__(self, model, params, buffers, param_names, forward, X=None):
        self.model, self.params, self.buffers = model, params, buffers
        self.param_names, self.forward, self.X = list(param_names), forward, X

    def __call__(self, *theta: Tensor) -> Tensor:
        p = dict(self.params)
        p.update(zip(self.param_names, theta, strict=True))
        state = {**p, **self.buffers}
        return self.forward(_Bound(self.model, state), self.X)


class _Bound(nn.Module):
    """Calls ``model`` through ``functional_call`` with a fixed state (for ``forward(m, X)``)."""

    def __init__(self, model: nn.Module, state: dict[str, Tensor]):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_state", state)

    def forward(self, X):
        return functional_call(self._model, self._state, (X,))


def dataset_divisor(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    forward: Forward | None = None,
) -> int:
    """``1`` for ``reduction="sum"``, else the number of terms of the whole dataset."""
    if loss_fn.reduction == "sum":
        return 1
    if loss_fn.reduction != "mean":
        raise NotImplementedError(loss_fn.reduction)
    forward = forward or _default_forward
    with torch.no_grad():
        return sum(batch_divisor(loss_fn, forward(model, X)) for X, _ in data)


def ggn(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    param_names: Sequence[str] | None = None,
    forward: Forward | None = None,
) -> Tensor:
    """Exact GGN ``(1/D) Σ_batches Jᵀ H_sum J`` of the dataset loss, ``[P, P]``.

    ``H_sum`` is the Hessian of the *summed* loss of the batch w.r.t. the batch's output
    (block-diagonal over data points), ``D`` the dataset divisor (see module docstring).
    """
    data = list(data)
    forward = forward or _default_forward
    param_names = list(param_names) if param_names is not None else param_names_of(model)
    lf = sum_loss(loss_fn)
    G = None
    for X, y in data:
        output, J = _output_jacobian(model, X, param_names, forward)
        H = hessian(lambda out, y=y: lf(out, y))(output).reshape(output.numel(), output.numel())
        term = J.T @ H @ J
        G = term if G is None else G + term
    return G / dataset_divisor(model, loss_fn, data, forward)


def _output_jacobian(model, X, param_names, forward):
    params = _params(model)
    f = _Functional(model, params, _buffers(model), param_names, forward, X)
    theta = tuple(params[n] for n in param_names)
    output = f(*theta).detach()
    jac = jacrev(f, argnums=tuple(range(len(theta))))(*theta)
    J = torch.cat([j.reshape(output.numel(), -1) for j in jac], dim=1)
    return output, J


def per_term_losses(loss_fn: nn.Module, output: Tensor, y: Tensor) -> Tensor:
    """Summed-convention loss of every term of a batch, flattened to ``[num_terms]``.

    Cross-entropy: one term per (datum, position), ``-log softmax`` over the class dim 1.
    MSE / BCE: one term per (datum, position), summed over the last (feature) dimension ``C``;
    e.g. ``Σ_c (f_c - y_c)²`` for MSE.
    """
    lf = copy.deepcopy(loss_fn)
    lf.reduction = "none"
    losses = lf(output, y)
    if not is_cross_entropy(loss_fn):
        losses = losses.sum(-1)
    return losses.reshape(-1)


def empirical_fisher(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    param_names: Sequence[str] | None = None,
    forward: Forward | None = None,
) -> Tensor:
    """Empirical Fisher ``(1/D) Σ_terms ∇ℓ_term ∇ℓ_termᵀ`` of the dataset, ``[P, P]``.

    ``ℓ_term`` is the per-term loss in the sum convention (see :func:`per_term_losses`), ``D`` the
    dataset divisor: for reduction ``"mean"`` kronfac computes S for the summed loss and divides by
    the number of averaged terms once (not squared).
    """
    data = list(data)
    forward = forward or _default_forward
    param_names = list(param_names) if param_names is not None else param_names_of(model)
    params = _params(model)
    theta = tuple(params[n] for n in param_names)
    F = None
    for X, y in data:
        f = _Functional(model, params, _buffers(model), param_names, forward, X)

        def losses(*th, f=f, y=y):
            return per_term_losses(loss_fn, f(*th), y)

        num_terms = losses(*theta).numel()
        jac = jacrev(losses, argnums=tuple(range(len(theta))))(*theta)
        G = torch.cat([j.reshape(num_terms, -1) for j in jac], dim=1)  # [terms, P]
        term = G.T @ G
        F = term if F is None else F + term
    return F / dataset_divisor(model, loss_fn, data, forward)


def block_diagonal(M: Tensor, sizes: Sequence[int]) -> Tensor:
    """``M`` with every entry outside the diagonal blocks of the given sizes set to zero."""
    assert sum(sizes) == M.shape[0] == M.shape[1], (sizes, M.shape)
    out = torch.zeros_like(M)
    start = 0
    for s in sizes:
        out[start : start + s, start : start + s] = M[start : start + s, start : start + s]
        start += s
    return out


def linear_block_sizes(model: nn.Module, bias: str = "joint") -> list[int]:
    """Diagonal block sizes for a model whose parameters all belong to ``nn.Linear`` layers.

    Assumes ``named_parameters()`` lists each layer's weight then bias, layer by layer (true for
    models built from ``nn.Linear`` submodules in definition order). ``bias="joint"``: one block
    per layer (weight and bias together); ``"separate"``: one block per parameter.
    """
    sizes = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            ps = [p.numel() for p in (m.weight, m.bias) if p is not None]
            sizes += [sum(ps)] if bias == "joint" else ps
    return sizes


def layer_inputs(
    model: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    module_names: Sequence[str],
    forward: Forward | None = None,
) -> dict[str, list[Tensor]]:
    """Inputs of the named modules for every batch, recorded with plain forward hooks."""
    forward = forward or _default_forward
    modules = dict(model.named_modules())
    recorded: dict[str, list[Tensor]] = {n: [] for n in module_names}
    handles = [
        modules[n].register_forward_hook(
            lambda _m, inp, _out, n=n: recorded[n].append(inp[0].detach().clone())
        )
        for n in module_names
    ]
    try:
        with torch.no_grad():
            for X, _ in data:
                forward(model, X)
    finally:
        for h in handles:
            h.remove()
    return recorded


def input_factor(inputs: Sequence[Tensor], bias: bool, approx: str = "expand") -> Tensor:
    """Reference ``A`` from a layer's recorded inputs ``[N, (T...,) d_in]`` of every batch.

    expand: ``A = 1/(N·T) Σ_{n,t} a aᵀ``; reduce: ``A = 1/N Σ_n ā āᵀ`` with ``ā`` the mean of
    ``a`` over positions. ``bias=True`` appends a 1 to ``a`` (joint bias).
    """
    rows = []
    for a in inputs:
        if approx == "reduce":
            a = a.reshape(a.shape[0], -1, a.shape[-1]).mean(1)
        a = a.reshape(-1, a.shape[-1])
        if bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        rows.append(a)
    a = torch.cat(rows)
    return a.T @ a / a.shape[0]


def bias_jacobians(
    model: nn.Module, X: Tensor, bias_name: str, forward: Forward | None = None
) -> tuple[Tensor, Tensor]:
    """Output and ``B_n = ∂f_n/∂b`` per datum: ``[N, out_per_datum, d_out]``.

    For a Linear layer with T = 1, ``∂f/∂b = ∂f/∂s`` is the backpropagated Jacobian of the
    layer's output, so ``B_nᵀ H B_n`` is the exact GGN bias block of datum ``n``.
    """
    forward = forward or _default_forward
    output, J = _output_jacobian(model, X, [bias_name], forward)
    N = output.shape[0]
    return output, J.reshape(N, output.numel() // N, -1)


def mc_variance(
    loss_fn: nn.Module, output: Tensor, B: Tensor, divisor: int
) -> tuple[Tensor, Tensor]:
    """Exact mean and variance of the one-sample MC estimator of a layer's ``S``.

    ``output``: ``[N, C]`` model outputs (one term per datum), ``B``: ``[N, C, d_out]`` as from
    :func:`bias_jacobians`. The one-sample estimator is ``Ŝ = (1/D) Σ_n u_n u_nᵀ`` with
    ``u_n = B_nᵀ ∇_f ℓ(f_n, ŷ_n)`` and ``ŷ_n`` drawn from the model's predictive distribution.
    Returns ``(E[Ŝ], E‖Ŝ - E[Ŝ]‖_F²)``; the ``M``-sample average has variance ``/ M``.

    CE and BCE enumerate every label (``C`` classes, ``2^C`` binary vectors); MSE uses the
    Gaussian closed form: ``u ~ N(0, Σ)`` gives ``E‖uuᵀ - Σ‖_F² = (tr Σ)² + tr(Σ²)``.
    """
    lf = sum_loss(loss_fn)
    mean = torch.zeros(B.shape[-1], B.shape[-1], dtype=B.dtype)
    var = torch.zeros((), dtype=B.dtype)
    for f, Bn in zip(output, B, strict=True):
        if isinstance(loss_fn, nn.MSELoss):
            Sigma = 2 * Bn.T @ Bn  # gradient 2(f - y), y ~ N(f, 1/2): covariance 2·I
            mean += Sigma
            var += torch.trace(Sigma) ** 2 + torch.trace(Sigma @ Sigma)
            continue
        if is_cross_entropy(loss_fn):
            labels = [torch.tensor(c) for c in range(f.numel())]
            probs = torch.softmax(f, -1)
            weights = [probs[c] for c in range(f.numel())]
        else:
            labels, weights = [], []
            p = torch.sigmoid(f)
            for bits in itertools.product([0.0, 1.0], repeat=f.numel()):
                yb = torch.tensor(bits, dtype=f.dtype)
                labels.append(yb)
                weights.append(torch.prod(torch.where(yb == 1, p, 1 - p)))
        us = []
        for y in labels:
            g = torch.func.grad(lambda out, y=y: lf(out, y))(f)
            us.append(Bn.T @ g)
        Sn = sum(w * torch.outer(u, u) for w, u in zip(weights, us, strict=True))
        mean += Sn
        var += sum(
            w * ((torch.outer(u, u) - Sn) ** 2).sum() for w, u in zip(weights, us, strict=True)
        )
    return mean / divisor, var / divisor**2
