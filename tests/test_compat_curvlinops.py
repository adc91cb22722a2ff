"""``kronfac.compat.curvlinops`` against the real curvlinops 3.0.1 (a drop-in replacement).

Every matrix here is compared with the one curvlinops computes from the same model, loss,
parameter list and data: the dense matrices ``op @ I`` of ``KFACLinearOperator`` /
``EKFACLinearOperator``, of ``KFACInverseLinearOperator`` (default, heuristic and exact
damping), curvlinops' ``trace`` / ``frobenius_norm`` / ``logdet`` / ``det`` properties and its
Kronecker factors. Products on lists of tensors and through ``to_scipy()`` are checked against
curvlinops' dense matrix times the flat vector, never against kronfac itself.

Cases: a small MLP with cross-entropy / MSE / BCE-with-logits losses, mean and sum reduction,
the four Fisher types (MC labels are drawn from a generator seeded with ``seed`` by both
libraries, so ``"mc"`` is compared to round-off too), joint and separate biases; sequences
(``[N, T, d]`` inputs, ``expand`` / ``reduce``); small convolutional nets; EKFAC; parameter
subsets and orders; option spellings; and the errors of the drop-in API.

Known differences from curvlinops 3.0.1, each pinned by a test: a module called several times
is one block over more positions (its ``A`` averaged over the calls, as documented; curvlinops'
hooks backend is documented as wrong there), and ``num_data`` / ``num_per_example_loss_terms``
are checked against the data.

Tolerances. Everything is float64 and both libraries evaluate the same formulas in a different
order, so the only difference is round-off: measured ~1e-16..1e-15 relative for the matrices,
≤ 2e-14 for the inverses (well-conditioned: damping ≥ 1e-2 or min_damping active). ``TOL =
1e-10`` relative to the largest entry leaves four orders of magnitude of headroom while any
modelling difference (a missing scale, a wrong label, a transposed factor) is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    DT,
    LOSSES,
    PerPosition,
    assert_rel_close,
    called_twice,
    gen,
    init,
    make_targets,
    mlp,
    randn,
    require_peer,
    split_batches,
)
from torch import Tensor, nn

from kronfac.compat import curvlinops as compat

curvlinops = require_peer("curvlinops")

TOL = 1e-10  # float64 round-off only (module docstring)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: threads only cost time

FISHERS = ("type-2", "mc", "empirical", "forward-only")


# -- data and models -------------------------------------------------------------------------
def mlp_case(loss: str, seed: int = 0) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """``Linear(5, 4) → tanh → Linear(4, 3)`` and 10 data points in batches of 6 and 4."""
    g = gen(seed + 100)
    X = randn(10, 5, g=g)
    return mlp((5, 4, 3), seed=seed), split_batches(X, make_targets(loss, (10, 3), g), (6, 4))


T_SEQ = 3


def seq_case(loss: str) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """Linear layers on ``[N, T_SEQ, 4]`` (``[N, 3, T_SEQ]`` logits for CE, else
    ``[N, T_SEQ, 3]`` outputs) and six sequences in batches of 4 and 2."""
    g = gen(7)
    X = randn(6, T_SEQ, 4, g=g)
    model = PerPosition(mlp((4, 5, 3), seed=3), class_dim_1=loss == "ce")
    y = make_targets(loss, (6, 3, T_SEQ) if loss == "ce" else (6, T_SEQ, 3), g)
    return model, split_batches(X, y, (4, 2))


CONVS: dict[str, tuple[dict[str, Any], int]] = {  # Conv2d(2, c_out, **kw), flattened size
    "plain": ({"out_channels": 3, "kernel_size": 3}, 27),
    "strided": ({"out_channels": 3, "kernel_size": 3, "stride": 2, "padding": 1}, 27),
    "dilated": ({"out_channels": 4, "kernel_size": 2, "padding": 1, "dilation": 2}, 100),
}


def conv_case(which: str = "plain") -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """Conv2d -> ReLU -> Flatten -> Linear on 8 images ``[2, 5, 5]`` (batches of 5 and 3)."""
    kw, flat = CONVS[which]
    model = nn.Sequential(nn.Conv2d(2, **kw), nn.ReLU(), nn.Flatten(), nn.Linear(flat, 2))
    g = gen(11)
    X = randn(8, 2, 5, 5, g=g)
    return init(model, 5), split_batches(X, make_targets("mse", (8, 2), g), (5, 3))


# -- building both operators ------------------------------------------------------------------
def build(
    kind: str,
    model: nn.Module,
    loss_func: nn.Module,
    params: dict[str, Tensor] | list[Tensor],
    data: Any,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """``(kronfac.compat operator, curvlinops operator)`` of ``kind`` for the same inputs."""
    ours = getattr(compat, kind)(model, loss_func, params, data, **kwargs)
    plist = list(params.values()) if isinstance(params, dict) else list(params)
    ref = getattr(curvlinops, kind)(model, loss_func, plist, data, **kwargs)
    return ours, ref


def dense(op: Any) -> Tensor:
    """``op @ I`` (both libraries accept a ``[P, P]`` tensor)."""
    return op @ torch.eye(op.shape[0], dtype=DT)


def assert_same_matrix(ours: Any, ref: Any, what: str = "") -> Tensor:
    expected = dense(ref)
    assert torch.isfinite(expected).all(), f"{what}: curvlinops' matrix is not finite"
    assert_rel_close(dense(ours), expected, TOL, what)
    return expected


# -- 1. dense K-FAC of an MLP -----------------------------------------------------------------
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_kfac_mlp(loss: str, reduction: str, fisher: str, separate: bool) -> None:
    model, data = mlp_case(loss)
    ours, ref = build(
        "KFACLinearOperator",
        model,
        LOSSES[loss](reduction=reduction),
        dict(model.named_parameters()),
        data,
        fisher_type=fisher,
        separate_weight_and_bias=separate,
    )
    assert ours.shape == ref.shape == (39, 39)
    assert_same_matrix(ours, ref, f"{loss}/{reduction}/{fisher}/{separate}")


# mc_samples > 1. curvlinops draws the labels sample by sample (``mc_samples`` calls of the
# generator per batch, each for all the batch's terms); kronfac draws all samples of a batch in
# one call (``multinomial(p, S)`` / ``randn(S, ...)``), which consumes the generator in another
# order for CE and MSE (BCE's ``bernoulli`` happens to agree). The matrices then differ by the
# MC noise. ``test_kfac_mc_samples_in_curvlinops_draw_order`` shows that this order is the only
# difference.


def _mc_case(case: str) -> tuple[str, nn.Module, nn.Module, list[Any], dict[str, Any]]:
    """``(kind, model, loss_func, data, options)`` of ``"<arch>-<loss>-<options>"``."""
    arch, loss, *rest = case.split("-")
    if arch == "seq":
        model, data = seq_case(loss)
        kw: dict[str, Any] = {"kfac_approx": rest[1]}
        return "KFACLinearOperator", model, LOSSES[loss](reduction=rest[0]), data, kw
    kind = "EKFACLinearOperator" if arch == "ekfac" else "KFACLinearOperator"
    model, data = mlp_case(loss, seed=1)
    kw = {"separate_weight_and_bias": rest[0] == "separate"}
    return kind, model, LOSSES[loss](), data, kw


MC_CASES = [
    "mlp-bce-separate",
    "mlp-bce-joint",
    "mlp-ce-separate",
    "mlp-ce-joint",
    "mlp-mse-separate",
    "mlp-mse-joint",
    "seq-ce-mean-reduce",
    "seq-ce-sum-expand",
    "seq-mse-mean-expand",
    "ekfac-bce-separate",
    "ekfac-ce-joint",
    "ekfac-mse-separate",
]


@pytest.mark.parametrize("case", MC_CASES)
def test_kfac_mc_samples(case: str) -> None:
    """Several labels per term: both libraries draw them one sample at a time, in order."""
    kind, model, loss_func, data, kw = _mc_case(case)
    kw = {"fisher_type": "mc", **kw}
    params = dict(model.named_parameters())
    ours, ref = build(kind, model, loss_func, params, data, mc_samples=3, **kw)
    expected = assert_same_matrix(ours, ref, f"{case} mc_samples=3")
    # the samples count: one sample per term gives another matrix (the comparison is sharp)
    one = getattr(curvlinops, kind)(model, loss_func, list(params.values()), data, **kw)
    assert (dense(one) - expected).abs().max() > 1e-3 * expected.abs().max()


def test_kfac_factors_equal_curvlinops_factors() -> None:
    """``.factors`` holds curvlinops' ``A`` (input) and ``S`` (gradient) covariances."""
    model, data = mlp_case("ce")
    ours, ref = build(
        "KFACLinearOperator", model, nn.CrossEntropyLoss(), dict(model.named_parameters()), data,
        fisher_type="type-2", separate_weight_and_bias=False,
    )  # fmt: skip
    dense(ref)  # curvlinops computes its factors lazily, on first use
    assert list(ours.factors) == ["0", "2"]
    for name, (A, S) in ours.factors.items():
        # curvlinops 3.0.1's (private) factor dictionaries, keyed by module name
        assert_rel_close(A, ref._input_covariances[name], TOL, f"A of {name}")
        assert_rel_close(S, ref._gradient_covariances[name], TOL, f"S of {name}")


# -- 2. inverses -------------------------------------------------------------------------------
INVERSES = {
    "default": {"damping": 0.1},
    "heuristic": {"damping": 1e-2, "use_heuristic_damping": True},
    "heuristic-min": {"damping": 1e-6, "use_heuristic_damping": True, "min_damping": 1e-3},
    "exact": {"damping": 0.05, "use_exact_damping": True},
}


@pytest.mark.parametrize("variant", list(INVERSES))
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_kfac_inverse(loss: str, separate: bool, variant: str) -> None:
    model, data = mlp_case(loss)
    ours, ref = build(
        "KFACLinearOperator", model, LOSSES[loss](), dict(model.named_parameters()), data,
        fisher_type="type-2", separate_weight_and_bias=separate,
    )  # fmt: skip
    kw = INVERSES[variant]
    expected = dense(curvlinops.KFACInverseLinearOperator(ref, **kw))
    assert torch.isfinite(expected).all()
    assert_rel_close(dense(ours.inverse(**kw)), expected, TOL, f"inverse {variant}")
    if variant == "heuristic-min":  # min_damping is active: without it the inverse differs
        no_min = dense(curvlinops.KFACInverseLinearOperator(ref, **{**kw, "min_damping": 0.0}))
        assert (no_min - expected).abs().max() > 1e-3 * expected.abs().max()


def test_kfac_inverse_products_of_lists() -> None:
    """The inverse takes lists too: compared with curvlinops' inverse on the same list."""
    model, data = mlp_case("mse")
    params = dict(model.named_parameters())
    ours, ref = build("KFACLinearOperator", model, nn.MSELoss(), params, data)
    g = gen(3)
    V = [randn(*p.shape, 2, g=g) for p in params.values()]
    got = ours.inverse(0.1) @ V
    expected = curvlinops.KFACInverseLinearOperator(ref, damping=0.1) @ V
    assert isinstance(got, list) and len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert_rel_close(a, b, TOL, "inverse @ list")


# -- 3. scalar summaries -----------------------------------------------------------------------
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
def test_scalars(fisher: str, separate: bool) -> None:
    model, data = mlp_case("mse")
    ours, ref = build(
        "KFACLinearOperator", model, nn.MSELoss(), dict(model.named_parameters()), data,
        fisher_type=fisher, separate_weight_and_bias=separate,
    )  # fmt: skip
    assert torch.isfinite(ref.logdet), "the case must be non-singular"
    # curvlinops 3.0.1: properties; kronfac.compat: methods
    assert_rel_close(ours.trace(), ref.trace, TOL, "trace")
    assert_rel_close(ours.frobenius_norm(), ref.frobenius_norm, TOL, "frobenius_norm")
    assert_rel_close(ours.logdet(), ref.logdet, TOL, "logdet")
    assert_rel_close(ours.det(), ref.det, TOL, "det")
    # ... and curvlinops' scalars are those of its dense matrix (the reference is right)
    M = dense(ref)
    assert_rel_close(ref.trace, M.trace(), TOL, "curvlinops trace")
    assert_rel_close(ref.logdet, torch.linalg.slogdet(M)[1], 1e-8, "curvlinops logdet")


# -- 4. sequences ------------------------------------------------------------------------------
@pytest.mark.parametrize("terms", [None, T_SEQ], ids=["inferred", "explicit"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    ("loss", "fisher"), [("mse", "type-2"), ("mse", "mc"), ("ce", "type-2"), ("ce", "empirical")]
)
def test_kfac_sequences(
    loss: str, fisher: str, approx: str, separate: bool, terms: int | None
) -> None:
    model, data = seq_case(loss)
    ours, ref = build(
        "KFACLinearOperator", model, LOSSES[loss](), dict(model.named_parameters()), data,
        fisher_type=fisher, kfac_approx=approx, separate_weight_and_bias=separate,
        num_per_example_loss_terms=terms,
    )  # fmt: skip
    assert_same_matrix(ours, ref, f"sequence {loss}/{fisher}/{approx}")


class FlatSeqNet(PerPosition):
    """:class:`PerPosition` with its outputs flattened data point by data point: ``[N·T, 3]``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).reshape(-1, 3)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    ("loss", "fisher"),
    [("ce", "type-2"), ("ce", "mc"), ("ce", "empirical"), ("mse", "type-2"), ("mse", "mc")],
)
def test_kfac_flattened_sequence_outputs(loss: str, fisher: str, approx: str) -> None:
    """The usual LM loss, ``loss(logits.reshape(-1, V), labels.reshape(-1))``."""
    _, data = seq_case(loss)
    model = FlatSeqNet(mlp((4, 5, 3), seed=3))
    flat = [(X, y.reshape(-1, *y.shape[2:])) for X, y in data]
    ours, ref = build(
        "KFACLinearOperator", model, LOSSES[loss](), dict(model.named_parameters()), flat,
        fisher_type=fisher, kfac_approx=approx,
    )  # fmt: skip
    assert_same_matrix(ours, ref, f"flattened {loss}/{fisher}/{approx}")
    assert ours.factors.num_per_example_loss_terms == T_SEQ


# -- 5. convolutions ---------------------------------------------------------------------------
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    ("which", "fisher"),
    [("plain", "type-2"), ("plain", "mc"), ("strided", "type-2"), ("dilated", "mc")],
)
def test_kfac_conv(which: str, fisher: str, approx: str, separate: bool) -> None:
    model, data = conv_case(which)
    ours, ref = build(
        "KFACLinearOperator", model, nn.MSELoss(), dict(model.named_parameters()), data,
        fisher_type=fisher, kfac_approx=approx, separate_weight_and_bias=separate,
    )  # fmt: skip
    P = sum(p.numel() for p in model.parameters())
    assert ours.shape == ref.shape == (P, P)
    assert_same_matrix(ours, ref, f"conv {which} {approx}/{fisher}")


@pytest.mark.parametrize(
    "inv",
    [
        {"damping": 1e-2, "use_heuristic_damping": True},
        {"damping": 1e-2, "use_exact_damping": True},
    ],
    ids=["heuristic", "exact"],
)
def test_kfac_conv_inverse(inv: dict[str, Any]) -> None:
    model, data = conv_case()
    ours, ref = build(
        "KFACLinearOperator", model, nn.MSELoss(), dict(model.named_parameters()), data,
        separate_weight_and_bias=False,
    )  # fmt: skip
    expected = dense(curvlinops.KFACInverseLinearOperator(ref, **inv))
    assert_rel_close(dense(ours.inverse(**inv)), expected, TOL, "conv inverse")


# -- 6. EKFAC ----------------------------------------------------------------------------------
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_ekfac(loss: str, fisher: str, separate: bool) -> None:
    model, data = mlp_case(loss, seed=2)
    ours, ref = build(
        "EKFACLinearOperator", model, LOSSES[loss](), dict(model.named_parameters()), data,
        fisher_type=fisher, separate_weight_and_bias=separate,
    )  # fmt: skip
    assert_same_matrix(ours, ref, f"EKFAC {loss}/{fisher}")
    inv = curvlinops.KFACInverseLinearOperator(ref, damping=0.1, use_exact_damping=True)
    assert_rel_close(dense(ours.inverse(0.1)), dense(inv), TOL, "EKFAC inverse")


def test_ekfac_scalars_sum_reduction() -> None:
    model, data = mlp_case("mse", seed=2)
    ours, ref = build(
        "EKFACLinearOperator", model, nn.MSELoss(reduction="sum"),
        dict(model.named_parameters()), data, fisher_type="type-2",
    )  # fmt: skip
    assert_same_matrix(ours, ref, "EKFAC sum")
    assert torch.isfinite(ref.logdet), "the case must be non-singular"
    assert_rel_close(ours.trace(), ref.trace, TOL, "EKFAC trace")
    assert_rel_close(ours.frobenius_norm(), ref.frobenius_norm, TOL, "EKFAC frobenius_norm")
    assert_rel_close(ours.logdet(), ref.logdet, TOL, "EKFAC logdet")


# -- 7. parameter subsets and orders ------------------------------------------------------------
SUBSETS: dict[str, list[str]] = {
    "weights-only": ["0.weight", "2.weight"],
    "last-layer": ["2.weight", "2.bias"],
    "first-layer": ["0.weight", "0.bias"],
    "reversed": ["2.bias", "2.weight", "0.bias", "0.weight"],
    "interleaved": ["2.weight", "0.weight", "0.bias", "2.bias"],
}


@pytest.mark.parametrize("as_list", [False, True], ids=["dict", "list"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("subset", list(SUBSETS))
def test_param_subsets_and_orders(subset: str, separate: bool, as_list: bool) -> None:
    model, data = mlp_case("ce")
    named = dict(model.named_parameters())
    params = OrderedDict((n, named[n]) for n in SUBSETS[subset])
    P = sum(p.numel() for p in params.values())
    ours, ref = build(
        "KFACLinearOperator", model, nn.CrossEntropyLoss(),
        list(params.values()) if as_list else params, data,
        fisher_type="type-2", separate_weight_and_bias=separate,
    )  # fmt: skip
    assert ours.shape == ref.shape == (P, P)
    assert_same_matrix(ours, ref, f"params {subset}")


def test_unsupported_layer_outside_params() -> None:
    """A LayerNorm in the model is fine as long as its parameters are not in ``params``."""
    model = mlp((5, 4, 3), layernorm=True, seed=4)
    _, data = mlp_case("ce")
    params = {n: p for n, p in model.named_parameters() if not n.startswith("1.")}
    ours, ref = build(
        "KFACLinearOperator", model, nn.CrossEntropyLoss(), params, data, fisher_type="type-2"
    )
    assert_same_matrix(ours, ref, "LayerNorm outside params")


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_module_called_twice_expand(loss: str) -> None:
    """A documented divergence: a module called ``R`` times is one block over ``R`` positions.

    kronfac averages the inputs' second moment over the ``R = 2`` calls (``A / R``, as for ``R``
    positions of a sequence under ``expand``); curvlinops 3.0.1 sums the calls' ``A``. ``S`` is
    the same in both (summed over the calls), so kronfac's weight block is exactly half of
    curvlinops' and everything else (``lin``'s separate bias block, ``head``) is equal.
    """
    model = called_twice(5, 3)  # head(tanh(lin(tanh(lin(x)))))
    _, data = mlp_case(loss)
    ours, ref = build(
        "KFACLinearOperator", model, LOSSES[loss](), dict(model.named_parameters()), data,
        fisher_type="type-2", kfac_approx="expand",
    )  # fmt: skip
    expected = dense(ref)
    expected[:25, :25] /= 2  # lin.weight: [5, 5], first in the flat layout
    assert_rel_close(dense(ours), expected, TOL, "module called twice")


# -- 8. products -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["KFACLinearOperator", "EKFACLinearOperator"])
def test_products(kind: str) -> None:
    model, data = mlp_case("mse")
    params = {n: p for n, p in model.named_parameters() if n != "0.bias"}
    ours, ref = build(kind, model, nn.MSELoss(), params, data, fisher_type="mc")
    M = dense(ref)
    P = M.shape[0]
    g = gen(5)
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def split(V: Tensor, trailing: tuple[int, ...]) -> list[Tensor]:
        return [c.reshape(*s, *trailing) for c, s in zip(V.split(sizes), shapes, strict=True)]

    v, V = randn(P, g=g), randn(P, 3, g=g)
    assert_rel_close(ours @ v, M @ v, TOL, "flat vector")
    assert_rel_close(ours @ V, M @ V, TOL, "flat matrix")
    for got, exp in zip(ours @ split(v, ()), split(M @ v, ()), strict=True):
        assert_rel_close(got, exp, TOL, "list of tensors")
    for got, exp in zip(ours @ split(V, (3,)), split(M @ V, (3,)), strict=True):
        assert_rel_close(got, exp, TOL, "list of tensors with trailing K")
    for got, exp in zip(ours @ tuple(split(v, ())), ref @ split(v, ()), strict=True):
        assert_rel_close(got, exp, TOL, "tuple vs curvlinops' list product")

    S = ours.to_scipy()
    assert S.shape == (P, P)
    x, X = v.numpy(), V.numpy()
    np.testing.assert_allclose(S @ x, (M @ v).numpy(), rtol=0, atol=TOL * M.abs().max().item())
    np.testing.assert_allclose(S @ X, (M @ V).numpy(), rtol=0, atol=TOL * M.abs().max().item())
    np.testing.assert_allclose(
        S.matvec(x), (M @ v).numpy(), rtol=0, atol=TOL * M.abs().max().item()
    )


# -- 9. options --------------------------------------------------------------------------------
def _fisher_spellings() -> list[Any]:
    spellings: list[Any] = [compat.FisherType.MC, "mc", curvlinops.FisherType.MC]
    kfac_mod = getattr(curvlinops, "kfac", None)
    if kfac_mod is not None and hasattr(kfac_mod, "FisherType"):
        spellings.append(kfac_mod.FisherType.MC)
    return spellings


def _approx_spellings() -> list[Any]:
    spellings: list[Any] = [compat.KFACType.REDUCE, "reduce", curvlinops.KFACType.REDUCE]
    kfac_mod = getattr(curvlinops, "kfac", None)
    if kfac_mod is not None and hasattr(kfac_mod, "KFACType"):
        spellings.append(kfac_mod.KFACType.REDUCE)
    return spellings


def test_option_spellings() -> None:
    model, data = seq_case("mse")
    params = dict(model.named_parameters())
    ref = dense(
        curvlinops.KFACLinearOperator(
            model, nn.MSELoss(), list(params.values()), data,
            fisher_type=curvlinops.FisherType.MC, kfac_approx=curvlinops.KFACType.REDUCE,
        )
    )  # fmt: skip
    for fisher in _fisher_spellings():
        for approx in _approx_spellings():
            ours = compat.KFACLinearOperator(
                model, nn.MSELoss(), params, data, fisher_type=fisher, kfac_approx=approx
            )
            assert_rel_close(dense(ours), ref, TOL, f"fisher={fisher!r}, approx={approx!r}")
    assert {m.value for m in compat.FisherType} == {m.value for m in curvlinops.FisherType}
    assert {m.value for m in compat.KFACType} == {m.value for m in curvlinops.KFACType}


def test_defaults_are_curvlinops_defaults() -> None:
    """No options at all: MC Fisher, seed 2147483647, expand, separate biases."""
    model, data = seq_case("ce")
    ours, ref = build(
        "KFACLinearOperator", model, nn.CrossEntropyLoss(), dict(model.named_parameters()), data
    )
    assert_same_matrix(ours, ref, "defaults")


OPTIONS: dict[str, dict[str, Any]] = {
    "make_fx": {"backend": "make_fx"},
    "progressbar": {"progressbar": True},
    "seed": {"seed": 7},
    "num_data": {"num_data": 10},  # the true count: test_counts_must_match_the_data
    "batch_size_fn": {"batch_size_fn": lambda X: X.shape[0]},
    "no-check": {"check_deterministic": False},
}


@pytest.mark.parametrize("kind", ["KFACLinearOperator", "EKFACLinearOperator"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options(option: str, kind: str) -> None:
    model, data = mlp_case("ce")
    params = dict(model.named_parameters())
    kw = OPTIONS[option]
    ours = getattr(compat, kind)(model, nn.CrossEntropyLoss(), params, data, **kw)
    curv_kw = {k: v for k, v in kw.items() if k != "backend"}  # curvlinops has no backend
    ref = getattr(curvlinops, kind)(
        model, nn.CrossEntropyLoss(), list(params.values()), data, **curv_kw
    )
    expected = assert_same_matrix(ours, ref, option)
    if option == "seed":  # the option matters: the default gives another matrix
        default = dense(
            getattr(curvlinops, kind)(model, nn.CrossEntropyLoss(), list(params.values()), data)
        )
        assert (default - expected).abs().max() > 1e-3 * expected.abs().max()


# -- 9b. dict-like inputs ----------------------------------------------------------------------
class DictNet(nn.Module):
    """curvlinops' convention for dict-like ``X``: the model receives the dict itself."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp((5, 4, 3))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(batch["x"])


def test_dict_inputs_are_passed_as_one_argument() -> None:
    model = init(DictNet(), 0)
    _, data = mlp_case("ce")
    dict_data = [({"x": X}, y) for X, y in data]
    params = dict(model.named_parameters())
    size = {"batch_size_fn": lambda X: X["x"].shape[0]}
    ref = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), list(params.values()), dict_data, **size
    )
    expected = dense(ref)
    ours = compat.KFACLinearOperator(model, nn.CrossEntropyLoss(), params, dict_data, **size)
    assert_rel_close(dense(ours), expected, TOL, "dict inputs")


class FlatDictNet(nn.Module):
    """A dict ``{"pos": [1, T], "x": [N, T, 4]}``: only ``batch_size_fn`` knows ``N``."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = FlatSeqNet(mlp((4, 5, 3)))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.seq(batch["x"] + batch["pos"][..., None])


def test_batch_size_fn_is_passed_through() -> None:
    model = init(FlatDictNet(), 1)
    _, data = seq_case("ce")
    pos = torch.arange(T_SEQ, dtype=DT)[None]
    dict_data = [({"pos": pos, "x": X}, y.reshape(-1)) for X, y in data]
    params = dict(model.named_parameters())
    size = {"batch_size_fn": lambda X: X["x"].shape[0]}
    ours, ref = build("KFACLinearOperator", model, nn.CrossEntropyLoss(), params, dict_data, **size)
    assert_same_matrix(ours, ref, "batch_size_fn")
    with pytest.raises(ValueError, match=r"N = 1 data points \(read from the first dimension "):
        compat.KFACLinearOperator(model, nn.CrossEntropyLoss(), params, dict_data)


# -- 10. errors --------------------------------------------------------------------------------
def _mlp_args() -> tuple[nn.Module, nn.Module, dict[str, Tensor], list[Any]]:
    model, data = mlp_case("ce")
    return model, nn.CrossEntropyLoss(), dict(model.named_parameters()), data


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fisher_type": "fisher"}, "Unknown fisher_type"),
        ({"kfac_approx": "merge"}, "Unknown kfac_approx"),
        ({"backend": "functorch"}, "Invalid backend"),
        ({"fisher_type": "empirical", "mc_samples": 2}, "mc_samples"),
    ],
    ids=["fisher_type", "kfac_approx", "backend", "mc_samples"],
)
def test_bad_options(kwargs: dict[str, Any], match: str) -> None:
    model, loss, params, data = _mlp_args()
    with pytest.raises(ValueError, match=match):
        compat.KFACLinearOperator(model, loss, params, data, **kwargs)


def test_bad_params() -> None:
    model, loss, params, data = _mlp_args()
    stranger = nn.Parameter(torch.zeros(4, 5, dtype=DT))
    with pytest.raises(ValueError, match="is not a parameter of model_func"):
        compat.KFACLinearOperator(model, loss, {**params, "0.weight": stranger}, data)
    with pytest.raises(ValueError, match="is not a parameter of model_func"):
        compat.KFACLinearOperator(model, loss, [*params.values(), stranger], data)
    with pytest.raises(ValueError, match="must be the names"):
        compat.KFACLinearOperator(
            model, loss, {"0.weight": params["2.weight"], "2.bias": params["2.bias"]}, data
        )
    with pytest.raises(NotImplementedError, match="without its weight"):
        compat.KFACLinearOperator(model, loss, {"0.bias": params["0.bias"]}, data)


def test_unsupported_layer_in_params() -> None:
    model = mlp((5, 4, 3), None, layernorm=True)
    _, data = mlp_case("ce")
    with pytest.raises(NotImplementedError, match=r"\['1\.weight', '1\.bias'\]"):
        compat.KFACLinearOperator(
            model, nn.CrossEntropyLoss(), dict(model.named_parameters()), data
        )


def test_functional_model() -> None:
    model, loss, params, data = _mlp_args()

    def func(X: Tensor) -> Tensor:
        return model(X)

    with pytest.raises(NotImplementedError, match=r"must be an nn\.Module"):
        compat.KFACLinearOperator(func, loss, params, data)  # type: ignore[arg-type]


def test_check_deterministic_with_dropout() -> None:
    model = init(
        nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 3)), 0
    ).train()
    _, data = mlp_case("ce")
    params = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="not deterministic"):
        compat.KFACLinearOperator(model, nn.CrossEntropyLoss(), params, data)
    with torch.random.fork_rng():  # dropout draws from the global RNG: keep it untouched
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match=r"active dropout in '1'"):
            op = compat.KFACLinearOperator(
                model, nn.CrossEntropyLoss(), params, data, check_deterministic=False
            )
        M = dense(op)
    assert M.shape == (39, 39) and torch.isfinite(M).all()
    assert_rel_close(M, M.T, TOL, "symmetric")
    # in eval mode the model is deterministic and the operator is curvlinops' (no dropout)
    ours, ref = build("KFACLinearOperator", model.eval(), nn.CrossEntropyLoss(), params, data)
    assert_same_matrix(ours, ref, "dropout in eval mode")


def test_one_shot_generator() -> None:
    model, loss, params, data = _mlp_args()
    with pytest.raises(TypeError, match="one-shot"):
        compat.KFACLinearOperator(model, loss, params, (b for b in data))


def test_inverse_errors() -> None:
    model, loss, params, data = _mlp_args()
    kfac = compat.KFACLinearOperator(model, loss, params, data)
    with pytest.raises(NotImplementedError, match="Separate"):
        kfac.inverse(damping=(0.1, 0.2))  # type: ignore[arg-type]
    ekfac = compat.EKFACLinearOperator(model, loss, params, data)
    with pytest.raises(ValueError, match="Only exact damping"):
        ekfac.inverse(0.1, use_heuristic_damping=True)
    with pytest.raises(ValueError, match="Only exact damping"):
        ekfac.inverse(0.1, use_exact_damping=False)
    # curvlinops refuses the same
    ref = curvlinops.EKFACLinearOperator(model, loss, list(params.values()), data)
    with pytest.raises(ValueError, match="Only exact damping"):
        curvlinops.KFACInverseLinearOperator(ref, damping=0.1, use_exact_damping=False)


def test_ekfac_forward_only_is_rejected_like_curvlinops() -> None:
    model, loss, params, data = _mlp_args()
    with pytest.raises(ValueError, match="forward-only"):
        curvlinops.EKFACLinearOperator(
            model, loss, list(params.values()), data, fisher_type="forward-only"
        )
    with pytest.raises(ValueError, match="forward-only"):
        compat.EKFACLinearOperator(model, loss, params, data, fisher_type="forward-only")


def test_counts_must_match_the_data() -> None:
    """kronfac checks ``num_data`` and ``num_per_example_loss_terms`` against the data.

    (curvlinops 3.0.1 takes both on trust and rescales the factors by them instead.)
    """
    model, loss, params, data = _mlp_args()
    with pytest.raises(ValueError, match="num_data=25 but the data holds 10"):
        compat.KFACLinearOperator(model, loss, params, data, num_data=25)
    model, data = seq_case("ce")
    with pytest.raises(ValueError, match="num_per_example_loss_terms=2"):
        compat.KFACLinearOperator(
            model, loss, dict(model.named_parameters()), data, num_per_example_loss_terms=2
        )


@pytest.mark.parametrize("operand", ["string", 3, np.ones(39)], ids=["str", "int", "numpy"])
def test_matmul_bad_operand(operand: Any) -> None:
    model, loss, params, data = _mlp_args()
    op = compat.KFACLinearOperator(model, loss, params, data)
    with pytest.raises(TypeError, match="Expected a Tensor"):
        op @ operand
