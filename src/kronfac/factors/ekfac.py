r"""EKFAC's eigenvalue correction: a second pass over the data in K-FAC's eigenbasis.

With the eigenvectors ``Q_S`` of ``S`` and ``Q_A`` of ``A``, EKFAC (George et al., 2018) keeps
the basis ``Q_S ⊗ Q_A`` and replaces the Kronecker eigenvalues by the second moments of the
per-example gradients in that basis, the Frobenius-optimal diagonal there:

.. math::

    \Lambda_{ab} = \frac{1}{D} \sum_{n,k} \big(Q_S^\top G_{n,k} Q_A\big)_{ab}^2, \qquad
    G_{n,k} = \sum_t g_{n,t,k}\, a_{n,t}^\top,

with the backpropagated vectors ``k`` and the divisor ``D`` of :func:`compute_factors`. The
per-example gradient sums over the positions for ``approx="expand"`` and ``"reduce"`` alike.
For type-2 with ``R > 1`` loss terms per data point the vectors are the ``R·C`` columns of the
square root of the per-example loss Hessian, one term each (``R·C`` backward vectors per batch,
against ``C`` for K-FAC's ``S``), so that ``Λ`` is the exact diagonal of the GGN in the basis
when K-FAC's eigenbasis diagonalises it; MC and empirical need no change.

Two contraction orders, chosen per module and batch by their memory (the rotated rows
``g̃ = g Q_S``, ``ã = a Q_A`` are formed either way):

- per-example gradients: ``G̃_{n,k} = g̃_{n,k}ᵀ ã_n`` (``[K, n, p, q]``, in chunks), squared
  and summed: memory ``n·p·q``;
- Gram form: ``Λ = Σ_{n,t,t'} (Σ_k g̃_{n,t,k} ∘ g̃_{n,t',k}) (ã_{n,t} ∘ ã_{n,t'})ᵀ``, one GEMM
  over ``n·T²`` rows: memory ``n·T²·(p + q)``. Without positions (``T = 1``) it is
  ``(Σ_k g̃²)ᵀ ã²`` and never forms a per-example gradient.

The Gram form is used when ``T²(p + q) < p·q``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.distributed import all_reduce_sums
from kronfac.errors import warn
from kronfac.factors.container import EigenCorrection, KroneckerFactors
from kronfac.factors.data_pass import BatchRows, PassResult, PassSetup, random_modules, run_pass
from kronfac.factors.engine import check_finite, sum_tensors
from kronfac.layers import LayerAdapter
from kronfac.linalg import LowRankFactor, eigh

__all__ = ["CorrectionSums", "compute_corrections", "rotated_second_moment"]

# Elements of the per-example gradients [K, chunk, p, q] formed at once.
_MAX_PER_EXAMPLE_ELEMENTS = 1 << 25


def rotated_second_moment(gt: Tensor, at: Tensor) -> Tensor:
    """``Σ_{k,n} (g̃_{n,k}ᵀ ã_n)²`` for ``gt: [K, n, T, p]``, ``at: [n, T, q]`` → ``[p, q]``."""
    K, n, T, p = gt.shape
    q = at.shape[-1]
    if T * T * (p + q) < p * q:
        if T == 1:
            return gt.square().sum(0).reshape(n, p).T @ at.reshape(n, q).square()
        gg = torch.einsum("knsi,knti->nsti", gt, gt).reshape(n * T * T, p)
        aa = (at.unsqueeze(2) * at.unsqueeze(1)).reshape(n * T * T, q)
        return gg.T @ aa
    out = gt.new_zeros(p, q)
    chunk = max(1, _MAX_PER_EXAMPLE_ELEMENTS // max(K * p * q, 1))
    for i in range(0, n, chunk):
        G = gt[:, i : i + chunk].transpose(-1, -2) @ at[i : i + chunk]  # [K, c, p, q]
        out += G.square().sum((0, 1))
    return out


def _token_second_moment(gt: Tensor, idx: Tensor, adapter: LayerAdapter) -> Tensor:
    """EKFAC eigenvalues of an embedding (``Q_A = I``): ``Λ[:, v] = Σ_{k,n} (Σ_{t: i_nt = v} g̃)²``.

    ``gt: [K, n, T, p]`` rotated output gradients, ``idx: [n, T, 1]`` tokens. The per-example
    gradient is sparse (one column per distinct token of the sequence): the rows are summed per
    (data point, token) with ``index_add`` and squared, never forming ``[n, p, V]``. The
    adapter's inert inputs (``padding_idx``) get 0.
    """
    K, n, T, p = gt.shape
    vocab = adapter.in_features
    key = (torch.arange(n, device=idx.device)[:, None] * vocab + idx.reshape(n, T)).reshape(-1)
    uniq, inverse = torch.unique(key, return_inverse=True)
    summed = gt.new_zeros(K, uniq.numel(), p).index_add_(1, inverse, gt.reshape(K, n * T, p))
    out = gt.new_zeros(vocab, p).index_add_(0, uniq % vocab, summed.square().sum(0))
    out[list(adapter.inert_inputs)] = 0
    return out.T


def _basis(F: Tensor | LowRankFactor, name: str) -> Tensor | None:
    """Eigenvectors of a factor (partial for a low-rank one; ``None``: identity, diagonal)."""
    if isinstance(F, Tensor) and F.ndim == 1:
        return None
    return _eigenvectors(F, name)


def _eigenvectors(F: Tensor | LowRankFactor, name: str) -> Tensor:
    """Eigenvectors of a dense or low-rank factor (partial for a low-rank one)."""
    return F.U if isinstance(F, LowRankFactor) else eigh(F, name)[1]


def compute_corrections(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable[tuple[Any, Tensor]],
    factors: KroneckerFactors,
    *,
    reference: PassResult | None = None,
    setup: PassSetup | None = None,
    **options: Any,
) -> KroneckerFactors:
    """EKFAC's eigenbases and corrected eigenvalues of ``factors`` (module docstring).

    Args:
        model: The model the factors were computed for.
        loss_fn: Its loss.
        data: The data (the same as for the factors, for the usual EKFAC).
        factors: K-FAC factors from :func:`kronfac.compute_factors` with the same options.
        reference: The factors' pass; when given, a model output on the same first batch that
            differs between the two passes is warned about.
        setup: The factors' validated setup, instead of ``options`` (validated once).
        **options: The options of :func:`kronfac.compute_factors` (MC sampling starts again
            from ``seed``, so it draws the labels the factors were computed with).

    Returns:
        A copy of ``factors`` carrying the corrections.

    Raises:
        ValueError: For ``fisher="forward-only"`` (no output gradients to correct with), or
            options / modules that disagree with ``factors``.

    Warns:
        UserWarning: When ``reference`` saw another output on the same first batch, i.e. the
            model is random without a dropout module (which the factors' pass names).
    """
    if setup is None:
        setup = PassSetup.create(model, loss_fn, **options)
    elif options:
        raise TypeError("Pass the options or their setup, not both.")
    if setup.options.fisher == "forward-only":
        raise ValueError("EKFAC needs output gradients: fisher='forward-only' has none.")
    for key in ("fisher", "mc_samples", "approx", "bias", "seed"):
        if factors.options.get(key) != setup.recorded[key]:
            raise ValueError(
                f"The factors were computed with {key}={factors.options.get(key)!r}, the "
                f"correction was asked with {key}={setup.recorded[key]!r}."
            )
    if not set(factors) <= set(setup.adapters):
        raise ValueError(
            f"The factors cover {sorted(factors)}, the options select {sorted(setup.adapters)}."
        )
    # modules the factors left out (never called) are left out here too
    setup = dataclasses.replace(
        setup, adapters={n: a for n, a in setup.adapters.items() if n in factors}
    )
    sums = CorrectionSums.from_factors(setup, factors)
    result = run_pass(
        setup,
        model,
        data,
        sums.add,
        desc="kronfac EKFAC correction",
        per_term=True,
        reduce=sums.all_reduce,
    )
    differs = reference is not None and reference.same_first_batch(result) is False
    if differs and not random_modules(model):  # (dropout modules: named by the factors' pass)
        warn(
            "The model's output on the first batch differs between EKFAC's two passes: the "
            "forward pass is random (functional dropout in train mode?), so the corrections do "
            "not match the factors' eigenbases. Call model.eval() first.",
            UserWarning,
        )
    return factors.with_corrections(sums.corrections(result.mean_divisor(setup.likelihood)))


class CorrectionSums:
    """Running sums of EKFAC's corrected eigenvalues, fed batch by batch with :class:`BatchRows`.

    Per module: ``Σ_{n,k} (Q_Sᵀ G_{n,k} Q_A)²`` in the eigenbases of ``factors`` (module
    docstring), a separate bias's ``Σ (Q_Sᵀ ĝ)²``, and, with low-rank factors (partial bases),
    the whole second moment ``Σ ‖G‖²`` for the complement's eigenvalue.

    Args:
        setup: The pass's options and modules.
        bases: Per module ``(Q_A, Q_S)``: the eigenvectors (columns, ``[g, side, k]`` with
            groups) of ``A`` and ``S``, partial for low-rank factors; ``Q_A = None`` is the
            identity (a diagonal input factor).
        partial: The modules whose corrections carry a complement eigenvalue; default: those
            with a partial basis.
    """

    def __init__(
        self,
        setup: PassSetup,
        bases: dict[str, tuple[Tensor | None, Tensor]],
        partial: set[str] | None = None,
    ) -> None:
        self.setup, self.bases = setup, bases
        if partial is None:  # modules with a partial eigenbasis: the complement's eigenvalue
            partial = {n for n, Qs in bases.items() if any(_partial(Q) for Q in Qs)}
        self.partial = partial
        self.separate = {
            n
            for n in bases
            if setup.options.bias == "separate" and setup.param_names[n].bias is not None
        }
        self.sums: dict[str, Tensor] = {}
        self.bias_sums: dict[str, Tensor] = {}
        self.totals: dict[str, Tensor] = {}  # Σ ‖G‖² of modules with partial bases

    @classmethod
    def from_factors(cls, setup: PassSetup, factors: KroneckerFactors) -> CorrectionSums:
        """The sums in the eigenbases of K-FAC ``factors``."""
        bases = {n: (_basis(A, n), _eigenvectors(S, n)) for n, (A, S) in factors.items()}
        low = {n for n, pair in factors.items() if any(isinstance(F, LowRankFactor) for F in pair)}
        return cls(setup, bases, low)

    def add(self, rows: BatchRows) -> None:
        """Add one batch's per-example second moments (NaN / Inf raise, naming the module)."""
        for name, g in rows.grads.items():
            Q_S = self.bases[name][1]
            x, mask = rows.inputs[name], rows.masks[name]
            if Q_S.ndim == 3:  # groups: [K, n, T, g, p] rotated per group
                gt = torch.einsum(
                    "kntgi,gij->kntgj", g.reshape(*g.shape[:-1], Q_S.shape[0], -1), Q_S
                )
            else:
                gt = g @ Q_S  # [K, n, T, p]
            _accumulate(self.sums, name, self._rotated(name, gt, x, mask))
            if name in self.partial:  # the whole second moment, for the complement's eigenvalue
                total = self._second_moment(name, g, x, mask)
                if name in self.separate:
                    total = torch.stack([total, g.sum(2).square().sum()])
                _accumulate(self.totals, name, total)
            if name in self.separate:
                _accumulate(self.bias_sums, name, gt.sum(2).square().sum((0, 1)))  # [p], [g, p]
        check_finite(
            {
                "per-example gradients": {
                    n: [s.sum(), *([self.bias_sums[n]] if n in self.bias_sums else [])]
                    for n, s in self.sums.items()
                }
            },
            rows.index,
        )

    def _rotated(self, name: str, gt: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
        """``Σ_{n,k} (Q_Sᵀ G Q_A)²`` of one batch, from the rotated gradients ``gt``."""
        Q_A = self.bases[name][0]
        adapter, joint = self.setup.adapters[name], self.setup.joint_bias(name)
        if Q_A is None:  # a diagonal input factor: its basis is the identity
            return _token_second_moment(gt, x, adapter)
        if adapter.groups == 1:
            return rotated_second_moment(gt, _joined(adapter, x, joint, mask) @ Q_A)
        # one block per group: slices of the inputs and of the output gradients
        xs = x.reshape(*x.shape[:-1], adapter.groups, -1)
        return torch.stack(
            [
                rotated_second_moment(
                    gt[..., j, :], _joined(adapter, xs[..., j, :], joint, mask) @ Q_A[j]
                )
                for j in range(adapter.groups)
            ]
        )

    def _second_moment(self, name: str, g: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
        """``Σ_{n,k} ‖G_{n,k}‖²``, the whole per-example second moment (basis-free)."""
        adapter, joint = self.setup.adapters[name], self.setup.joint_bias(name)
        if adapter.diagonal_input:
            return _token_second_moment(g, x, adapter).sum()
        G = adapter.groups  # one block per group: no products across groups
        gs = g.reshape(*g.shape[:-1], G, -1)
        xs = x.reshape(*x.shape[:-1], G, -1)
        return sum_tensors(
            rotated_second_moment(gs[..., j, :], _joined(adapter, xs[..., j, :], joint, mask)).sum()
            for j in range(G)
        )

    def all_reduce(self, group: Any) -> int:
        """Sum every module's sums over the ranks of ``group`` (in place); the bytes sent.

        A module this rank never reached gets zero sums first, and every sum is taken in its
        basis's dtype, so that every rank sends the same layout.
        """
        tensors: list[Tensor] = []
        for name, (Q_A, Q_S) in self.bases.items():
            lead, kS = Q_S.shape[:-2], Q_S.shape[-1]
            kA = self.setup.adapters[name].in_features if Q_A is None else Q_A.shape[-1]
            like: list[tuple[dict[str, Tensor], tuple[int, ...]]] = [(self.sums, (*lead, kS, kA))]
            if name in self.separate:
                like.append((self.bias_sums, (*lead, kS)))
            if name in self.partial:
                like.append((self.totals, (2,) if name in self.separate else ()))
            for store, shape in like:
                found = store.get(name)
                store[name] = Q_S.new_zeros(shape) if found is None else found.to(Q_S.dtype)
                tensors.append(store[name])
        return all_reduce_sums(tensors, [False] * len(tensors), group)

    def corrections(self, divisor: float) -> dict[str, EigenCorrection]:
        """The corrected eigenvalues: the sums over ``D``, zero for modules never reached."""
        out = {}
        for name, (Q_A, Q_S) in self.bases.items():
            q = self.setup.adapters[name].in_features if Q_A is None else Q_A.shape[-2]
            G, p, kS = Q_S.shape[0] if Q_S.ndim == 3 else 1, Q_S.shape[-2], Q_S.shape[-1]
            lead = Q_S.shape[:-2]
            lam = self.sums.get(name)
            if lam is None:  # the module's output never reached the loss
                lam = Q_S.new_zeros(*lead, kS, q if Q_A is None else Q_A.shape[-1])
            lam = lam.to(Q_S.dtype) / divisor
            bias = complement = bias_complement = None
            if name in self.separate:
                bias = self.bias_sums.get(name, Q_S.new_zeros(*lead, kS)).to(Q_S.dtype)
                bias = bias / divisor
            if name in self.partial:  # the mean second moment outside the bases' span
                total = self.totals.get(name, Q_S.new_zeros(2)).to(Q_S.dtype) / divisor
                rest = G * p * q - lam.numel()
                complement = ((total.reshape(-1)[0] - lam.sum()) / max(rest, 1)).clamp(min=0)
                if bias is not None and kS < p:
                    bias_rest = G * p - bias.numel()
                    bias_complement = ((total[1] - bias.sum()) / bias_rest).clamp(min=0)
            out[name] = EigenCorrection(Q_A, Q_S, lam, bias, complement, bias_complement)
        return out


def _joined(adapter: LayerAdapter, x: Tensor, joint: bool, mask: Tensor | None) -> Tensor:
    """Inputs with the bias's trailing 1 when the bias joins the block."""
    return adapter.append_bias(x, mask) if joint else x


def _partial(Q: Tensor | None) -> bool:
    """Whether an eigenbasis ``[..., side, k]`` spans less than the whole space."""
    return Q is not None and Q.shape[-1] < Q.shape[-2]


def _accumulate(sums: dict[str, Tensor], name: str, value: Tensor) -> None:
    sums[name] = value if name not in sums else sums[name] + value
