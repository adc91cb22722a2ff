r"""The Laplace approximation with a K-FAC or EKFAC posterior precision.

Around the MAP parameters ``θ*`` of the selected modules (the rest of the model fixed), the
posterior is ``N(θ*, Σ)`` with precision

.. math::

    P = H / T + \operatorname{diag}(δ_m I_{P_m}),

``H`` the K-FAC (or EKFAC) GGN of the **summed** negative log-likelihood over the data (for a
loss with ``reduction="mean"`` that is ``D`` times the curvature :func:`kronfac.compute_factors`
returns, ``D`` the entries the mean averages over), ``T`` the temperature, and ``δ_m`` the prior
precision of module ``m`` (one value for all, or one per module). Every block of ``H`` is
diagonal in the eigenbasis of its factors, ``Q_S ⊗ Q_A`` (Kronecker products of the factors'
eigenvalues, or EKFAC's corrected ones; a low-rank factor's complement has eigenvalue 0), so

- ``log det P = Σ_blocks Σ_i log(λ_i / T + δ_m)`` (never a dense ``P x P`` matrix),
- ``Σ^{±1/2}`` and ``Σ`` are the same bases with eigenvalues ``(λ_i / T + δ_m)^{-1/2}``,
  ``(λ_i / T + δ_m)^{-1}``, applied by two rotations per block.

The log marginal likelihood (evidence) of the Laplace approximation (MacKay 1992; Immer et al.
2021) with ``P_m`` parameters in module ``m``:

.. math::

    \log p(D) ≈ \log p(D | θ^*) / T - ½ Σ_m δ_m ‖θ^*_m‖² + ½ Σ_m P_m \log δ_m - ½ \log\det P,

with the tempered likelihood ``p(D|θ)^{1/T}`` (the same ``T`` that scales ``H``; ``T = 1`` is the
plain posterior). ``log p(D|θ*)`` is the negative summed loss with the likelihood's normaliser:
cross-entropy and BCE are normalised log-probabilities; ``MSELoss`` is the Gaussian of
variance ½ (``ℓ = (f − y)²``), ``log p = −(f − y)² − ½ log π`` per entry.

The linearised predictive (MacKay 1992; Immer et al. 2021) of an input ``x`` is
``f ~ N(f(x; θ*), J Σ Jᵀ)`` with ``J = ∂f/∂θ`` of the selected parameters
(:meth:`Laplace.functional_variance`). Classification: the probit approximation
``softmax(μ / √(1 + π/8 · diag Σ_f))`` (sigmoid for BCE) or a Monte-Carlo average over ``f``;
regression (MSE): the mean and ``Σ_f + ½ I``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from tqdm import tqdm

from kronfac.distributed import all_reduce_sums, group_of
from kronfac.errors import warn
from kronfac.factors.data_pass import PassSetup, _run_forward, check_reiterable
from kronfac.layers import Slot
from kronfac.linalg import EigenBlock
from kronfac.operators import CurvatureOperator, curvature_pass, eigen_block

__all__ = ["Laplace"]

PriorPrecision = float | Tensor | Mapping[str, float]

_CURVATURES = ("kfac", "ekfac")
_LINKS = ("probit", "mc")
_METHODS = ("marglik", "gridsearch")
# Bytes of Jacobian a chunk of functional_variance may hold ([b, C, P] in the model's dtype).
_JACOBIAN_BUDGET = 1 << 28


class _Spectrum:
    """One block of ``H`` in its eigenbasis: ``Q (diag λ) Qᵀ`` with a complement eigenvalue.

    ``values`` are ``[g, k_S, k_A]``; ``rest`` eigenvalues (the complement of partial bases)
    equal ``complement``.
    """

    def __init__(self, block: EigenBlock, scale: float, module: str) -> None:
        self.module, self.block = module, block
        self.Q_S, self.Q_A = block.Q_S, block.Q_A
        values = block.spectrum()
        self.values = values.reshape(block.eigenvalues.shape) * scale
        self.complement = max(block.complement, 0.0) * scale
        self.rest = block.complement_size
        self.name = block.name

    def weights(self, delta: float, temperature: float) -> tuple[Tensor, float]:
        """``Σ_b``'s eigenvalues ``1/(λ/T + δ)``, flat, and its complement's (0: none)."""
        w = (self.values.reshape(-1) / temperature + delta).reciprocal()
        return w, 1.0 / (self.complement / temperature + delta) if self.rest else 0.0

    def logdet(self, delta: Tensor, temperature: float) -> Tensor:
        """``log det(H_b / T + δ I)`` (``δ``: a 0-d tensor, differentiable)."""
        out = (self.values / temperature + delta).log().sum()
        if self.rest:
            out = out + self.rest * (self.complement / temperature + delta).log()
        return out

    def power(self, delta: float, temperature: float, exponent: float) -> EigenBlock:
        """``(H_b / T + δ I)^exponent`` as an :class:`EigenBlock`."""
        values = (self.values / temperature + delta).pow(exponent)
        rest = (self.complement / temperature + delta) ** exponent if self.rest else 0.0
        return EigenBlock(self.Q_S, self.Q_A, values, self.name, complement=rest)


class Laplace:
    r"""A Laplace approximation of the posterior of the selected modules' parameters.

    ``P = H / T + δ I`` with ``H`` the K-FAC / EKFAC GGN of the summed negative log-likelihood
    (module docstring). The model is taken at its current parameters as the MAP ``θ*``; data is
    passed over once for the factors (twice for EKFAC) and once more, at the first
    :meth:`log_marginal_likelihood`, for ``log p(D|θ*)``. On torch.distributed (the default
    process group) each rank's ``data`` and ``val_data`` are its shards: ``H``, ``log p(D|θ*)``
    and the grid search's validation loss are summed over the ranks (docs/distributed.md).

    Usage::

        la = kronfac.Laplace(model, nn.CrossEntropyLoss(), train_loader)
        la.optimize_prior_precision()                   # marginal likelihood
        probs = la.predictive(X)                        # [B, C], probit

    Args:
        model: The trained model (at its MAP), in eval mode.
        loss_fn: Its training loss: ``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss`` or
            ``nn.MSELoss`` (any reduction: the curvature is rescaled to the summed loss).
        data: Re-iterable training batches ``(X, y)`` (a list or a DataLoader).
        modules: Name substrings of the modules whose parameters are Bayesian (``["lora"]``
            for LoRA adapters; ``None``: every supported module).
        prior_precision: ``δ > 0``: a float, a 0-d tensor, a dict ``{module: δ_m}`` naming
            every selected module once, or a 1-d tensor of one value per module (the order of
            :attr:`modules`).
        temperature: ``T > 0``.
        curvature: ``"kfac"`` or ``"ekfac"``.
        fisher: The Fisher type of the factors (``"type-2"``: the GGN; ``"mc"``, ...).
        rank: Low-rank factors of this rank for sides of at least ``rank_threshold``.
        rank_threshold: See ``rank``.
        forward: ``forward(model, X) -> logits`` when the loss does not take ``model(X)``
            (the last token's logits of a language model, restricted to the answer tokens).
        bias: ``"joint"`` (a bias as a last column of its weight's block) or ``"separate"``.
        progress: Show a progress bar over the data.

    Attributes:
        model: The model.
        modules: The selected modules, in the order of the flat vectors.
        param_names: Their parameters' names, in the order of the flat vectors.
        mean: ``θ*``, the flat ``[P]`` MAP parameters (detached).
        num_params: ``P``.
        num_data: ``N``, the number of data points.
        prior_precision: The current prior precision (float, 0-d tensor or dict).
        temperature: ``T``.
        curvature: The K-FAC / EKFAC operator of the loss as ``loss_fn`` defines it (``H`` is
            ``hessian_scale`` times it).
        hessian_scale: ``D`` (1 for ``reduction="sum"``).

    Raises:
        ValueError: A non-positive or non-finite prior precision or temperature, a dict that
            does not name every selected module once, or an unknown ``curvature``.
        TypeError: ``data`` that is a one-shot iterator.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Iterable[Any],
        *,
        modules: Sequence[str] | None = None,
        prior_precision: PriorPrecision = 1.0,
        temperature: float = 1.0,
        curvature: str = "kfac",
        fisher: str = "type-2",
        rank: int | None = None,
        rank_threshold: int = 512,
        forward: Any = None,
        bias: str = "joint",
        progress: bool = False,
    ) -> None:
        if curvature not in _CURVATURES:
            raise ValueError(
                f"Unknown curvature {curvature!r}; expected one of {list(_CURVATURES)}."
            )
        self.temperature = _positive("temperature", temperature)
        check_reiterable(data, "Laplace")
        options = {
            "fisher": fisher,
            "modules": modules,
            "rank": rank,
            "rank_threshold": rank_threshold,
            "forward": forward,
            "bias": bias,
            "progress": progress,
        }
        setup = PassSetup.create(model, loss_fn, **options)
        op, result = curvature_pass(model, loss_fn, data, setup, curvature)
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self._forward, self._progress = forward, progress
        self.curvature = op
        self.hessian_scale = float(result.mean_divisor(setup.likelihood))
        self.num_data = result.num_data
        self.modules = list(op.factors)
        self.param_names = list(op.param_names)
        params = dict(model.named_parameters())
        self._params = {n: params[n] for n in self.param_names}
        self.mean = torch.cat([p.detach().reshape(-1) for p in self._params.values()]).to(op.dtype)
        self.num_params = self.mean.numel()
        self._spectra = [_Spectrum(eigen_block(b), self.hessian_scale, b.name) for b in op._blocks]
        # per module: its parameters' count and ‖θ*_m‖²
        self._sizes = torch.zeros(len(self.modules), dtype=op.dtype, device=op.device)
        self._norms = torch.zeros_like(self._sizes)
        index = {m: i for i, m in enumerate(self.modules)}
        for m, names in op.factors.param_names.items():
            for n in names:
                if n is not None:
                    p = params[n].detach().to(op.dtype)
                    self._sizes[index[m]] += p.numel()
                    self._norms[index[m]] += p.square().sum()
        self._block_module = [index[s.module] for s in self._spectra]
        self._log_likelihood: Tensor | None = None
        self.prior_precision = prior_precision
        self._deltas(prior_precision)  # validated now

    # -- the prior ---------------------------------------------------------------------------
    def _deltas(self, prior: PriorPrecision | None) -> Tensor:
        """The prior precision per module, ``[M]`` (differentiable in a tensor prior)."""
        prior = self.prior_precision if prior is None else prior
        M = len(self.modules)
        if isinstance(prior, Mapping):
            unknown = sorted(set(prior) - set(self.modules))
            missing = sorted(set(self.modules) - set(prior))
            if unknown or missing:
                raise ValueError(
                    f"prior_precision names modules {sorted(prior)}; expected each of "
                    f"{self.modules} once (unknown {unknown}, missing {missing})."
                )
            values = [_as_tensor(prior[m], self._sizes) for m in self.modules]
            for m, v in zip(self.modules, values, strict=True):
                _check_prior(v, f"prior_precision[{m!r}]")
            return torch.stack(values)
        if isinstance(prior, Tensor):
            if prior.ndim == 1 and prior.numel() == M:
                _check_prior(prior, "prior_precision")
                return prior.to(self._sizes)
            if prior.ndim != 0:
                raise ValueError(
                    f"prior_precision must be a number, a 0-d tensor, a dict of the modules "
                    f"{self.modules} or a 1-d tensor of {M} values (one per module), got a "
                    f"tensor of shape {tuple(prior.shape)}."
                )
        elif isinstance(prior, bool) or not isinstance(prior, (int, float)):
            raise ValueError(
                f"prior_precision must be a positive number, a 0-d tensor or a dict of the "
                f"modules {self.modules}, got {type(prior).__name__}."
            )
        value = _as_tensor(prior, self._sizes)
        _check_prior(value, "prior_precision")
        return value.expand(M)

    # -- the evidence ------------------------------------------------------------------------
    def log_det_posterior_precision(self, prior_precision: PriorPrecision | None = None) -> Tensor:
        """``log det P``, exact for the K-FAC / EKFAC ``H``, from the blocks' eigenvalues."""
        deltas = self._deltas(prior_precision)
        T = self.temperature
        return torch.stack(
            [s.logdet(deltas[i], T) for s, i in zip(self._spectra, self._block_module, strict=True)]
        ).sum()

    def log_likelihood(self) -> Tensor:
        """``log p(D|θ*)``: the summed log-likelihood of the data at the MAP (computed once)."""
        if self._log_likelihood is None:
            self._log_likelihood = self._data_log_likelihood()
        return self._log_likelihood

    def log_marginal_likelihood(self, prior_precision: PriorPrecision | None = None) -> Tensor:
        r"""The Laplace evidence ``log p(D)`` (module docstring), a 0-d tensor.

        Differentiable with respect to a tensor ``prior_precision``:
        ``∂/∂δ = −‖θ*‖²/2 + P/(2δ) − tr(P⁻¹)/2`` for one ``δ``.

        Args:
            prior_precision: The prior precision to evaluate at (default: the current one).
        """
        deltas = self._deltas(prior_precision)
        fit = self.log_likelihood().to(deltas) / self.temperature
        prior = -0.5 * (deltas * self._norms).sum() + 0.5 * (self._sizes * deltas.log()).sum()
        return fit + prior - 0.5 * self.log_det_posterior_precision(deltas)

    def _data_log_likelihood(self) -> Tensor:
        summed = copy.copy(self.loss_fn)  # its forward only: hooks on the loss stay silent
        summed.reduction = "sum"  # type: ignore[assignment]
        total, entries = 0.0, 0
        batches = tqdm(self.data, desc="log-likelihood", disable=not self._progress)
        with torch.no_grad():
            for b, (X, y) in enumerate(batches):
                output = _run_forward(self.model, X, self._forward, b)
                total += float(summed.forward(output, y))
                entries += output.numel()
        group = group_of()
        if group is not None:  # the union of the ranks' shards, as the curvature's
            both = torch.tensor([total, entries], dtype=torch.float64)
            all_reduce_sums([both], [False], group)
            total, entries = float(both[0]), int(both[1])
        if isinstance(self.loss_fn, nn.MSELoss):  # the Gaussian of variance ½: −½ log π per entry
            total += 0.5 * math.log(math.pi) * entries
        return torch.tensor(-total, dtype=self.mean.dtype, device=self.mean.device)

    # -- prior tuning ------------------------------------------------------------------------
    def optimize_prior_precision(
        self,
        method: str = "marglik",
        n_steps: int = 100,
        lr: float = 0.1,
        *,
        val_data: Iterable[Any] | None = None,
        grid: Sequence[float] | Tensor | None = None,
        link: str = "probit",
    ) -> PriorPrecision:
        """Tune the prior precision; store and return it.

        - ``"marglik"``: Adam with learning rate ``lr`` on ``log δ`` for ``n_steps`` steps,
          maximising :meth:`log_marginal_likelihood`; one ``δ`` per module when the current
          prior is a dict (the result is then a dict), one for all otherwise.
        - ``"gridsearch"``: the ``δ`` of ``grid`` (default ``10^k``, ``k = −4, −3.5, …, 4``),
          one for every module, whose :meth:`predictive` (``link``) has the least negative
          log-likelihood on ``val_data`` (classification losses only); each batch's
          Jacobians are computed and rotated once for the whole grid. A choice at the edge
          of the grid warns.

        Raises:
            ValueError: An unknown method, gridsearch without ``val_data`` or for MSE, or a
                grid with a non-positive value.
        """
        if method not in _METHODS:
            raise ValueError(f"Unknown method {method!r}; expected one of {list(_METHODS)}.")
        if method == "gridsearch":
            return self._gridsearch(val_data, grid, link)
        per_module = isinstance(self.prior_precision, Mapping)
        start = self._deltas(None).detach()
        log_delta = (start if per_module else start[:1]).log().clone().requires_grad_(True)
        opt = torch.optim.Adam([log_delta], lr=lr)
        for _ in range(n_steps):
            opt.zero_grad()
            deltas = log_delta.exp() if per_module else log_delta.exp()[0]
            (-self.log_marginal_likelihood(deltas)).backward()
            opt.step()
        tuned = log_delta.detach().exp()
        if per_module:
            self.prior_precision = dict(zip(self.modules, tuned.tolist(), strict=True))
        else:
            self.prior_precision = float(tuned[0])
        return self.prior_precision

    def _gridsearch(
        self, val_data: Iterable[Any] | None, grid: Sequence[float] | Tensor | None, link: str
    ) -> float:
        """The grid value of least validation NLL; each batch's Jacobians are projected once."""
        if val_data is None:
            raise ValueError("method='gridsearch' needs val_data: batches (X, y) to score.")
        if isinstance(self.loss_fn, nn.MSELoss):
            raise ValueError("method='gridsearch' scores class probabilities: not for MSELoss.")
        _check_link(link)
        values = [float(v) for v in (torch.logspace(-4, 4, 17) if grid is None else grid)]
        if not values or any(not (math.isfinite(v) and v > 0) for v in values):
            raise ValueError(f"grid must hold positive prior precisions, got {values}.")
        nll = [0.0] * len(values)
        for X, y in val_data:
            mu, projection = self._project(X)
            for i, value in enumerate(values):
                deltas = torch.full((len(self.modules),), value, dtype=mu.dtype)
                probs = self._classify(mu, projection, deltas, link, 100, None)
                nll[i] += self._nll(probs, y)
        group = group_of()
        if group is not None:  # the validation shards of every rank: one choice on all of them
            summed = torch.tensor(nll, dtype=torch.float64)
            all_reduce_sums([summed], [False], group)
            nll = summed.tolist()
        best = min(range(len(values)), key=lambda i: nll[i])
        if best in (0, len(values) - 1) and len(values) > 1:
            warn(
                f"The grid search chose {values[best]:g}, at the edge of the grid "
                f"[{min(values):g}, {max(values):g}]: the best prior precision may lie beyond.",
                UserWarning,
            )
        self.prior_precision = values[best]
        return values[best]

    def _nll(self, probs: Tensor, y: Tensor) -> float:
        """The summed negative log-probability of the labels ``y``."""
        if isinstance(self.loss_fn, nn.BCEWithLogitsLoss):
            p = probs.clamp(1e-12, 1 - 1e-12)
            y = y.to(p.dtype).reshape(p.shape)
            return -float((y * p.log() + (1 - y) * (1 - p).log()).sum())
        return -float(probs.clamp_min(1e-12).log().gather(1, y.reshape(-1, 1)).sum())

    # -- the posterior -----------------------------------------------------------------------
    def _operator(self, exponent: float) -> CurvatureOperator:
        """``P^exponent`` as an operator in the flat layout."""
        deltas = self._deltas(None).detach()
        T = self.temperature
        blocks = [
            s.power(float(deltas[i]), T, exponent)
            for s, i in zip(self._spectra, self._block_module, strict=True)
        ]
        return self.curvature._with_blocks(blocks)

    def posterior_covariance(self) -> CurvatureOperator:
        """``Σ = P⁻¹`` as an operator (products only, never a dense ``P x P`` matrix)."""
        return self._operator(-1.0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws ``θ*  + Σ^{1/2} z`` (``z ~ N(0, I)``), ``[n, P]``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}.")
        z = torch.randn(
            self.num_params, n, generator=generator, dtype=self.mean.dtype, device=self.mean.device
        )
        return self.mean + (self._operator(-0.5) @ z).T

    def _jacobian(self, X: Any) -> tuple[Tensor, Tensor]:
        """The outputs ``[B, C]`` and ``J = ∂f/∂θ``, ``[B, C, P]``, per example (torch.func).

        ``vmap`` of ``jacrev`` over the examples, in chunks within :data:`_JACOBIAN_BUDGET`; a
        model whose forward branches on its data (transformers' SDPA attention given an
        ``attention_mask``) cannot be vmapped and gets one ``jacrev`` per example instead.
        """
        params = {f"inner.{n}": p.detach() for n, p in self._params.items()}
        wrapper = _Forward(self.model, self._forward)

        def single(p: dict[str, Tensor], x: Any) -> Tensor:
            batch = {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, Mapping) else x[None]
            return functional_call(wrapper, p, (batch,)).reshape(-1)

        with torch.no_grad():  # the other parameters' gradients are not wanted either
            output = wrapper(X)
            if output.ndim == 1:  # BCE with one output per data point
                output = output[:, None]
            if output.ndim != 2:
                raise ValueError(
                    "The predictive needs outputs [B, C] per data point, got shape "
                    f"{tuple(output.shape)}. Pass forward= returning them (e.g. the last "
                    "token's logits of the answer tokens)."
                )
            B, C = output.shape
            chunk = _JACOBIAN_BUDGET // max(1, C * self.num_params * output.element_size())
            vmapped = vmap(jacrev(single), in_dims=(None, 0), chunk_size=min(max(chunk, 1), B))
            try:
                J = vmapped(params, X)
            except RuntimeError as err:  # vmap refuses data-dependent control flow
                if "data-dependent control flow" not in str(err):
                    raise
                J = _stack([jacrev(single)(params, _example(X, b)) for b in range(B)])
        J_flat = torch.cat([J[f"inner.{n}"].reshape(B, C, -1) for n in self.param_names], dim=-1)
        return output.to(self.mean.dtype), J_flat.to(self.mean.dtype)

    def _project(self, X: Any) -> tuple[Tensor, _Projection]:
        """The outputs ``μ`` of ``X`` and their Jacobians in the blocks' eigenbases."""
        output, J = self._jacobian(X)
        return output, _Projection(self._spectra, self.curvature._slots, self._block_module, J)

    def functional_variance(self, X: Any) -> Tensor:
        """``Σ_f = J Σ Jᵀ`` per data point, ``[B, C, C]``.

        ``J = ∂f/∂θ`` of the selected parameters (per example, ``torch.func``), applied
        through the blocks' eigenbases (:class:`_Projection`).
        """
        _, projection = self._project(X)
        return projection.variance(self._deltas(None).detach(), self.temperature)

    def predictive(
        self,
        X: Any,
        link: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""The linearised predictive of the batch ``X``.

        Cross-entropy: class probabilities ``[B, C]``, ``"probit"``:
        ``softmax(μ / √(1 + π/8 · diag Σ_f))``; ``"mc"``: the mean of ``softmax(f)`` over
        ``n_samples`` draws ``f ~ N(μ, Σ_f)``. BCE: the same with the sigmoid, ``[B, C]``.
        MSE: ``(μ [B, C], Σ_f + ½ I [B, C, C])`` (the observation noise of ``ℓ = (f − y)²``).

        Raises:
            ValueError: An unknown ``link``.
        """
        _check_link(link)
        mu, projection = self._project(X)
        deltas = self._deltas(None).detach()
        if isinstance(self.loss_fn, nn.MSELoss):
            var = projection.variance(deltas, self.temperature)
            eye = torch.eye(var.shape[-1], dtype=var.dtype, device=var.device)
            return mu, var + 0.5 * eye
        return self._classify(mu, projection, deltas, link, n_samples, generator)

    def _classify(
        self,
        mu: Tensor,
        projection: _Projection,
        deltas: Tensor,
        link: str,
        n_samples: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Class probabilities of the linearised model (:meth:`predictive`)."""
        T = self.temperature
        squash = torch.sigmoid if isinstance(self.loss_fn, nn.BCEWithLogitsLoss) else _softmax
        if link == "probit":
            kappa = (1 + math.pi / 8 * projection.diagonal(deltas, T)).rsqrt()
            return squash(kappa * mu)
        var = projection.variance(deltas, T)
        jitter = 1e-10 * var.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        eye = torch.eye(var.shape[-1], dtype=var.dtype, device=var.device)
        L = torch.linalg.cholesky(var + jitter[:, None, None] * eye)
        z = torch.randn(n_samples, *mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        f = mu + (L @ z.unsqueeze(-1)).squeeze(-1)
        return squash(f).mean(0)


class _Projection:
    r"""A batch's Jacobians ``J: [B, C, P]`` in the eigenbases of the blocks of ``H``.

    Per block ``b`` (module ``m``) with eigenvectors ``U_b`` and eigenvalues ``λ_b``, the
    coordinates ``R_b = J_b U_b``; with ``Σ_b = U_b diag(w_b) U_bᵀ + w_c (I − U_b U_bᵀ)``,
    ``w = 1/(λ/T + δ_m)`` (``w_c`` that of the complement of a partial basis),

    .. math::

        J Σ Jᵀ = Σ_b R_b \operatorname{diag}(w_b) R_bᵀ + w_c (J_b J_bᵀ − R_b R_bᵀ),

    so a change of prior costs ``O(B C² P)`` (``O(B C P)`` for the diagonal), not a new
    Jacobian or rotation.
    """

    def __init__(
        self,
        spectra: Sequence[_Spectrum],
        slots: Sequence[Slot],
        modules: Sequence[int],
        J: Tensor,
    ) -> None:
        B, C, P = J.shape
        columns = J.reshape(B * C, P).T  # [P, B·C]
        self.spectra = spectra
        self.coordinates: list[Tensor] = []  # [B, C, n_b]
        self.grams: list[Tensor | None] = []  # [B, C, C]: J_b J_bᵀ where a complement exists
        for spectrum, slot in zip(spectra, slots, strict=True):
            V = slot.gather(columns)  # [g·p, q, B·C]
            self.coordinates.append(spectrum.block.coordinates(V).reshape(B, C, -1))
            gram = None
            if spectrum.rest:
                Jb = V.reshape(-1, B * C).T.reshape(B, C, -1)
                gram = torch.einsum("bcx,bdx->bcd", Jb, Jb)
            self.grams.append(gram)
        self.modules = list(modules)  # each block's module: its index in the prior's deltas

    def _terms(self, deltas: Tensor, temperature: float, modules: Sequence[int]) -> Any:
        for R, gram, spectrum, m in zip(
            self.coordinates, self.grams, self.spectra, modules, strict=True
        ):
            w, w_c = spectrum.weights(float(deltas[m]), temperature)
            yield R, gram, w, w_c

    def variance(self, deltas: Tensor, temperature: float) -> Tensor:
        """``J Σ Jᵀ``, ``[B, C, C]``, for the prior precisions ``deltas`` (per module)."""
        out = None
        for R, gram, w, w_c in self._terms(deltas, temperature, self.modules):
            part = torch.einsum("bcn,bdn->bcd", R * w, R)
            if gram is not None:
                part = part + w_c * (gram - torch.einsum("bcn,bdn->bcd", R, R))
            out = part if out is None else out + part
        assert out is not None  # every operator has a block
        return out

    def diagonal(self, deltas: Tensor, temperature: float) -> Tensor:
        """``diag(J Σ Jᵀ)``, ``[B, C]``."""
        out = None
        for R, gram, w, w_c in self._terms(deltas, temperature, self.modules):
            R2 = R.square()
            part = R2 @ w
            if gram is not None:
                part = part + w_c * (gram.diagonal(dim1=-2, dim2=-1) - R2.sum(-1))
            out = part if out is None else out + part
        assert out is not None  # every operator has a block
        return out


class _Forward(nn.Module):
    """The logits of a batch, ``forward(model, X)`` (or the model's own call), as a module.

    ``torch.func.functional_call`` on it substitutes the parameters of ``inner`` (the model
    itself, attributes and all) for one call.
    """

    def __init__(self, model: nn.Module, forward: Any) -> None:
        super().__init__()
        self.inner, self._fn = model, forward

    def forward(self, X: Any) -> Tensor:
        return _run_forward(self.inner, X, self._fn, 0)


def _example(X: Any, b: int) -> Any:
    """Data point ``b`` of the batch ``X`` (a tensor or a mapping of tensors)."""
    return {k: v[b] for k, v in X.items()} if isinstance(X, Mapping) else X[b]


def _stack(jacobians: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-example Jacobians (dicts of tensors) stacked along a new first dimension."""
    return {k: torch.stack([J[k] for J in jacobians]) for k in jacobians[0]}


def _check_link(link: str) -> None:
    if link not in _LINKS:
        raise ValueError(f"Unknown link {link!r}; expected one of {list(_LINKS)}.")


def _softmax(f: Tensor) -> Tensor:
    return torch.softmax(f, dim=-1)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive number, got {type(value).__name__}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}.")
    return float(value)


def _as_tensor(value: Any, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(like)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"prior_precision values must be positive numbers, got {value!r}.")
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def _check_prior(value: Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()) or bool((value <= 0).any()):
        raise ValueError(f"{what} must be positive and finite, got {value.detach().tolist()}.")
