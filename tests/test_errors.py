"""Every bad input to kronfac gets a clear exception that names the problem.

Tiny models and data only: the whole file runs in a few seconds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import gen, make_data, mlp, randn
from torch import nn

import kronfac
from kronfac import NonFiniteError, UncoveredParameterWarning

N = 6  # data points per batch


def make_model(seed: int = 0, hidden: int = 4, inplace: bool = False) -> nn.Sequential:
    """``Linear(3, hidden) → ReLU → Linear(hidden, 2)``, float32 (PyTorch's initialisation)."""
    relu = "relu_" if inplace else "relu"
    return mlp((3, hidden, 2), relu, seed=seed, torch_init=True, dtype=torch.float32)


def tiny_batches(num_batches: int = 2, n: int = N, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``num_batches`` float32 batches: ``n`` inputs ``[n, 3]`` and their labels of 2 classes."""
    return make_data(2, "ce", (n,) * num_batches, (3,), seed, dtype=torch.float32)


def compute(model=None, loss_fn=None, data=None, **options):
    return kronfac.compute_factors(
        make_model() if model is None else model,
        nn.CrossEntropyLoss() if loss_fn is None else loss_fn,
        tiny_batches() if data is None else data,
        **options,
    )


def assert_factors_equal(f1, f2):
    assert list(f1) == list(f2)
    for name in f1:
        assert torch.equal(f1[name].A, f2[name].A)
        assert torch.equal(f1[name].S, f2[name].S)


def regression_data(targets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One batch of float32 inputs ``[n, 3]`` for the given targets ``[n, ...]``."""
    return [(randn(targets.shape[0], 3, g=gen(0), dtype=torch.float32), targets)]


# -- losses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn",
    [nn.L1Loss(), nn.NLLLoss(), nn.SmoothL1Loss(), nn.KLDivLoss()],
    ids=lambda loss: type(loss).__name__,
)
def test_unsupported_loss(loss_fn):
    name = type(loss_fn).__name__
    with pytest.raises(NotImplementedError, match=rf"Unsupported loss {name}\..*CrossEntropyLoss"):
        compute(loss_fn=loss_fn)


@pytest.mark.parametrize("loss_cls", [nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss])
def test_reduction_none(loss_cls):
    with pytest.raises(ValueError, match=r"reduction='none'.*not supported"):
        compute(loss_fn=loss_cls(reduction="none"))


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0])), r"weight=\.\.\."),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0])), r"pos_weight=\.\.\."),
        (nn.BCEWithLogitsLoss(weight=torch.tensor([2.0, 1.0])), r"weight=\.\.\."),
    ],
    ids=["ce-weight", "ce-label-smoothing", "bce-pos-weight", "bce-weight"],
)
def test_unsupported_loss_options(loss_fn, match):
    with pytest.raises(NotImplementedError, match=match):
        compute(loss_fn=loss_fn)


def test_every_term_ignored_is_a_clear_error():
    X, y = tiny_batches(1)[0]
    y[:] = -100
    with pytest.raises(ValueError, match="Every loss term is masked"):
        compute(loss_fn=nn.CrossEntropyLoss(), data=[(X, y)])


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, "cross_entropy", nn.CrossEntropyLoss])
def test_loss_fn_not_a_module(loss_fn):
    with pytest.raises(TypeError, match=r"loss_fn must be a torch\.nn loss module"):
        kronfac.compute_factors(make_model(), loss_fn, tiny_batches())


# -- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "exc", "match"),
    [
        ({"fisher": "fim"}, ValueError, r"Invalid fisher 'fim'\. Supported: type-2, mc, empirical"),
        ({"fisher": None}, ValueError, "Invalid fisher None"),
        ({"approx": "kron"}, ValueError, r"Invalid approx 'kron'\. Supported: expand, reduce"),
        ({"bias": "none"}, ValueError, r"Invalid bias 'none'\. Supported: joint, separate"),
        ({"seed": 1.5}, ValueError, r"seed must be an integer, got 1\.5"),
        ({"seed": True}, ValueError, r"seed must be an integer, got True"),
        ({"mc_samples": 0}, ValueError, "mc_samples must be an integer >= 1, got 0"),
        ({"mc_samples": -2}, ValueError, "mc_samples must be an integer >= 1"),
        ({"mc_samples": 2.0}, ValueError, r"mc_samples must be an integer >= 1, got 2\.0"),
        ({"mc_samples": 1.5}, ValueError, "mc_samples must be an integer"),
        ({"mc_samples": True}, ValueError, "mc_samples must be an integer"),
        ({"mc_samples": "2"}, ValueError, "mc_samples must be an integer"),
        (
            {"mc_samples": 2, "fisher": "type-2"},
            ValueError,
            r"mc_samples=2 requires fisher='mc', got fisher='type-2'",
        ),
        ({"mc_samples": 3, "fisher": "empirical"}, ValueError, "requires fisher='mc'"),
        ({"mc_samples": 2, "fisher": "forward-only"}, ValueError, "requires fisher='mc'"),
        ({"num_data": 0}, ValueError, "num_data must be a positive integer or None, got 0"),
        ({"num_data": -12}, ValueError, "num_data must be a positive integer"),
        ({"num_data": 12.0}, ValueError, "num_data must be a positive integer"),
        ({"num_data": True}, ValueError, "num_data must be a positive integer"),
        ({"num_data": "12"}, ValueError, "num_data must be a positive integer"),
        ({"num_per_example_loss_terms": 0}, ValueError, "num_per_example_loss_terms must be"),
        ({"num_per_example_loss_terms": 1.0}, ValueError, "num_per_example_loss_terms must be"),
        ({"num_data": 5}, ValueError, "num_data=5 but the data holds 12 data points"),
        ({"num_data": 13}, ValueError, "num_data=13 but the data holds 12"),
        (
            {"num_per_example_loss_terms": 3},
            ValueError,
            "num_per_example_loss_terms=3 but the model output has 1 loss terms",
        ),
        ({"modules": [0]}, TypeError, "modules must be a list of name substrings"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_bad_options(options, exc, match):
    with pytest.raises(exc, match=match):
        compute(**options)


def test_matching_counts_are_accepted():
    factors = compute(num_data=2 * N, num_per_example_loss_terms=1, fisher="type-2")
    assert factors.num_data == 2 * N


# -- data -----------------------------------------------------------------------------------


def test_empty_data():
    with pytest.raises(ValueError, match="data is empty"):
        compute(data=[])


def test_batch_without_data_points():
    X, y = tiny_batches(1)[0]
    with pytest.raises(ValueError, match=r"(?i)empty|no data|zero|0 data points"):
        compute(data=[(X[:0], y[:0])])
    # Among other batches an empty batch may be skipped or rejected, but with a ValueError.
    try:
        factors = compute(data=[(X, y), (X[:0], y[:0])])
    except ValueError:
        pass
    else:
        assert factors.num_data == N


@pytest.mark.parametrize(
    ("make_batches", "got"),
    [
        (lambda X, y: [(X,)], "tuple"),
        (lambda X, y: [(X, y, y)], "tuple"),
        (lambda X, y: [X], "Tensor"),
        (lambda X, y: (X, y), "Tensor"),  # one batch passed instead of a list of batches
        (lambda X, y: [{"X": X, "y": y}], "dict"),
    ],
    ids=["single", "triple", "tensor", "pair-not-list", "dict"],
)
def test_batch_not_a_pair(make_batches, got):
    X, y = tiny_batches(1)[0]
    with pytest.raises(ValueError, match=rf"Batch 0: expected a pair \(X, y\), got {got}"):
        compute(data=make_batches(X, y))


def test_second_batch_not_a_pair_names_it():
    data = tiny_batches(2)
    data[1] = data[1][:1]
    with pytest.raises(ValueError, match=r"Batch 1: expected a pair"):
        compute(data=data)


def test_targets_not_a_tensor():
    X, y = tiny_batches(1)[0]
    with pytest.raises(
        TypeError, match=r"Batch 0: expected targets y to be a torch\.Tensor, got list"
    ):
        compute(data=[(X, y.tolist())])
    with pytest.raises(ValueError, match="Batch 0: expected batched targets"):
        compute(data=[(X, y[0])])


def test_data_as_a_generator():
    factors = compute(data=iter(tiny_batches()), fisher="type-2")
    assert factors.num_data == 2 * N


# -- modules --------------------------------------------------------------------------------


@pytest.mark.parametrize("modules", [["encoder"], "encoder", ["enc", "dec"], []])
def test_modules_match_nothing(modules):
    with pytest.raises(ValueError, match=r"matches no module.*Module names: 0, 1, 2\."):
        compute(modules=modules)


@pytest.mark.parametrize(
    ("model", "modules"),
    [
        (nn.Sequential(nn.LayerNorm(3)), None),
        (nn.Sequential(nn.ConvTranspose2d(1, 2, 3), nn.Flatten()), None),
        (make_model(), ["1"]),  # only the ReLU
    ],
    ids=["layernorm", "conv-transpose", "relu-only"],
)
def test_no_supported_layer(model, modules):
    with pytest.raises(ValueError, match=r"No supported layer.*Supported layers: .*nn\.Linear"):
        compute(model=model, modules=modules)


@pytest.mark.parametrize("freeze", ["weights", "all"])
def test_all_linear_weights_frozen(freeze):
    model = make_model()
    for name, p in model.named_parameters():
        if freeze == "all" or name.endswith("weight"):
            p.requires_grad_(False)
    with pytest.raises(ValueError, match="No supported layer with trainable weights"):
        compute(model=model)


class NeverCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 2)
        self.spare = nn.Linear(3, 2)

    def forward(self, x):
        return self.used(x)


def test_module_never_called():
    # every module selected (modules=None): left out with a warning naming it
    with pytest.warns(kronfac.UncoveredParameterWarning, match=r"'spare' were never called"):
        assert list(compute(model=NeverCalled())) == ["used"]
    # selected on purpose, or strict: an error
    with pytest.raises(ValueError, match=r"Module\(s\) 'spare' were never called.*exclude="):
        compute(model=NeverCalled(), modules=["used", "spare"])
    with pytest.raises(ValueError, match=r"'spare' were never called"):
        compute(model=NeverCalled(), strict=True)
    assert list(compute(model=NeverCalled(), modules=["used"])) == ["used"]


def test_torch_transformer_layer_leaves_out_what_it_does_not_call():
    """nn.MultiheadAttention applies out_proj through its weight, never as a module."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(8, 3))
    X, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4, 5))
    fwd = lambda m, X: m(X).transpose(1, 2)  # noqa: E731
    with pytest.warns(kronfac.UncoveredParameterWarning) as record:
        E = kronfac.EKFAC(model, nn.CrossEntropyLoss(), [(X, y)], forward=fwd)
    text = " ".join(str(w.message) for w in record)
    assert "self_attn.out_proj" in text and "self_attn.in_proj_weight" in text
    assert list(E.factors) == ["0.linear1", "0.linear2", "1"]


def test_shared_parameter():
    model = mlp((3, 3, 3, 2), "relu", torch_init=True, dtype=torch.float32)
    model[2].weight = model[0].weight
    with pytest.raises(NotImplementedError, match=r"Modules '0' and '2' share a weight but not"):
        compute(model=model)
    # The message suggests selecting one of them, which works.
    with pytest.warns(UserWarning, match=r"'0' \(Linear\) and '2' \(Linear\) share a weight"):
        assert list(compute(model=model, modules=["0", "4"])) == ["0", "4"]


# -- targets that do not fit the loss -------------------------------------------------------


def test_cross_entropy_float_targets():
    X, y = tiny_batches(1)[0]
    with pytest.raises(TypeError, match="CrossEntropyLoss: expected class-index targets"):
        compute(data=[(X, y.float())])
    with pytest.raises(TypeError, match="class-probability targets are not supported"):
        compute(data=[(X, torch.softmax(torch.randn(N, 2), -1))])


@pytest.mark.parametrize(
    ("make_y", "exc", "match"),
    [
        (lambda y: y[:, None], ValueError, r"expected targets of shape \(6,\).*got \(6, 1\)"),
        (lambda y: y[:-1], ValueError, r"expected targets of shape \(6,\).*got \(5,\)"),
        (
            lambda y: y + 2,
            ValueError,
            r"expected class indices in \[0, 2\) \(or ignore_index=-100\), got",
        ),
        (lambda y: y - 1 - y, ValueError, r"expected class indices in \[0, 2\)"),
        (lambda y: y.bool(), TypeError, "expected class-index targets of an integer dtype"),
    ],
    ids=["extra-dim", "short", "too-large", "negative", "bool"],
)
def test_cross_entropy_bad_targets(make_y, exc, match):
    X, y = tiny_batches(1)[0]
    with pytest.raises(exc, match=f"CrossEntropyLoss: {match}"):
        compute(data=[(X, make_y(y))])


def test_cross_entropy_logits_without_class_dimension():
    with pytest.raises(ValueError, match=r"expected logits \[N, C\].*got shape \(6,\)"):
        compute(forward=lambda m, X: m(X)[:, 0])


@pytest.mark.parametrize("loss_cls", [nn.MSELoss, nn.BCEWithLogitsLoss])
@pytest.mark.parametrize("shape", [(N,), (N, 1), (N, 3), (N, 2, 1)])
def test_regression_targets_of_another_shape(loss_cls, shape):
    with pytest.raises(
        ValueError,
        match=rf"{loss_cls.__name__}: expected targets of the output's shape \(6, 2\), got",
    ):
        compute(loss_fn=loss_cls(), data=regression_data(torch.rand(shape)))


@pytest.mark.parametrize("loss_cls", [nn.MSELoss, nn.BCEWithLogitsLoss])
def test_regression_integer_targets(loss_cls):
    with pytest.raises(TypeError, match=r"expected floating-point targets, got dtype torch\.int64"):
        compute(loss_fn=loss_cls(), data=regression_data(torch.ones(N, 2, dtype=torch.long)))


@pytest.mark.parametrize("bad", [1.5, -0.5])
def test_bce_targets_outside_unit_interval(bad):
    y = torch.rand(N, 2)
    y[3, 1] = bad
    with pytest.raises(ValueError, match=r"BCEWithLogitsLoss: expected targets in \[0, 1\]"):
        compute(loss_fn=nn.BCEWithLogitsLoss(), data=regression_data(y))


# -- model outputs and inputs ---------------------------------------------------------------


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x):
        return {"logits": self.net(x)}


class TupleModel(DictModel):
    def forward(self, x):
        return self.net(x), x


@pytest.mark.parametrize(
    ("model_cls", "name"), [(DictModel, "dict"), (TupleModel, "tuple")], ids=["dict", "tuple"]
)
def test_non_tensor_output_suggests_forward(model_cls, name):
    with pytest.raises(TypeError, match=rf"Batch 0: the model returned {name}.*forward="):
        compute(model=model_cls())


def test_forward_extracts_the_logits():
    kw = {"fisher": "type-2"}
    factors = compute(model=DictModel(), forward=lambda m, X: m(X)["logits"], **kw)
    expected = compute(model=make_model(), **kw)
    assert list(factors) == ["net.0", "net.2"]
    for name in expected:
        assert torch.equal(factors[f"net.{name}"].A, expected[name].A)
        assert torch.equal(factors[f"net.{name}"].S, expected[name].S)


class KwargsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x, scale):
        return self.net(x * scale)


def test_mapping_inputs_are_keyword_arguments():
    data = tiny_batches()
    mapped = [({"x": X, "scale": 2.0}, y) for X, y in data]
    factors = compute(model=KwargsModel(), data=mapped, fisher="type-2")
    expected = compute(model=make_model(), data=[(2.0 * X, y) for X, y in data], fisher="type-2")
    for name in expected:
        assert torch.allclose(factors[f"net.{name}"].A, expected[name].A)
        assert torch.allclose(factors[f"net.{name}"].S, expected[name].S)


# -- non-finite values ----------------------------------------------------------------------

FISHERS = ["mc", "type-2", "empirical", "forward-only"]


@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input_names_module_and_batch(fisher, value):
    data = tiny_batches(3)
    data[1][0][2, 1] = value
    with pytest.raises(NonFiniteError, match=r"Non-finite values.*module '0' at batch 1\."):
        compute(data=data, fisher=fisher)


@pytest.mark.parametrize("loss_cls", [nn.MSELoss, nn.BCEWithLogitsLoss])
def test_non_finite_input_regression_mc(loss_cls):
    data = make_data(2, "bce", (N, N), (3,), dtype=torch.float32)  # 0 / 1: MSE or BCE targets
    data[1][0][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"module '0' at batch 1\."):
        compute(loss_fn=loss_cls(), data=data, fisher="mc")


@pytest.mark.parametrize("fisher", FISHERS)
def test_infinite_weight(fisher):
    model = make_model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"module '[02]' at batch 0\."):
        compute(model=model, fisher=fisher)


def test_non_finite_error_is_a_value_error():
    assert issubclass(NonFiniteError, ValueError)


# -- in-place modification of a covered module's output -------------------------------------


@pytest.mark.parametrize("fisher", ["mc", "empirical", "type-2"])
def test_output_modified_in_place(fisher):
    with pytest.raises(
        ValueError, match=r"Batch 0: the output of module '0' was modified in place"
    ):
        compute(model=make_model(inplace=True), fisher=fisher)


def test_output_modified_in_place_forward_only_works():
    factors = compute(model=make_model(inplace=True), fisher="forward-only")
    expected = compute(model=make_model(), fisher="forward-only")
    assert_factors_equal(factors, expected)
    assert torch.equal(factors["0"].S, torch.eye(4))


# -- parameters no block covers -------------------------------------------------------------


def layernorm_model() -> nn.Sequential:
    return mlp((3, 4, 2), None, layernorm=True, torch_init=True, dtype=torch.float32)


def with_raw_parameter(model: nn.Module) -> nn.Module:
    model.temperature = nn.Parameter(torch.ones(1))  # registered, never used by Sequential
    return model


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (layernorm_model, ["1.weight", "1.bias"]),
        (lambda: with_raw_parameter(make_model()), ["temperature"]),
        (lambda: with_raw_parameter(layernorm_model()), ["temperature", "1.weight", "1.bias"]),
    ],
    ids=["layernorm", "raw-parameter", "both"],
)
def test_uncovered_parameters_warn(make, names):
    with pytest.warns(UncoveredParameterWarning) as record:
        factors = compute(model=make())
    assert list(factors) == ["0", "2"]
    messages = [str(w.message) for w in record if w.category is UncoveredParameterWarning]
    assert len(messages) == 1
    assert f"{len(names)} trainable parameter(s)" in messages[0]
    for name in names:
        assert name in messages[0]


def frozen_layernorm_model() -> nn.Sequential:
    model = layernorm_model()
    model[1].requires_grad_(False)
    return model


def frozen_bias_model() -> nn.Sequential:
    model = make_model()
    model[2].bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("make", [make_model, frozen_layernorm_model, frozen_bias_model])
def test_no_warning_when_everything_is_covered(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncoveredParameterWarning)
        compute(model=make())


# -- hooks are removed whatever happens -----------------------------------------------------


def _bad_targets(data):
    data[2] = (data[2][0], data[2][1] + 5)


def _nan_input(data):
    data[1][0][0, 0] = float("nan")


def _raising_forward(options):
    def forward(model, X):
        if forward.calls == 1:
            raise RuntimeError("boom")
        forward.calls += 1
        return model(X)

    forward.calls = 0
    options["forward"] = forward


@pytest.mark.parametrize(
    ("break_data", "break_options", "exc"),
    [
        (_bad_targets, None, ValueError),
        (_nan_input, None, NonFiniteError),
        (None, _raising_forward, RuntimeError),
    ],
    ids=["bad-targets", "nan", "forward-raises"],
)
def test_hooks_removed_when_the_loop_raises(break_data, break_options, exc):
    model = make_model()
    data = tiny_batches(3)
    options = {"fisher": "type-2"}
    if break_data:
        break_data(data)
    if break_options:
        break_options(options)
    seen_hooks = []
    inner = options.get("forward")

    def forward(m, X):
        seen_hooks.append(len(m[0]._forward_hooks))
        return inner(m, X) if inner else m(X)

    options["forward"] = forward
    with pytest.raises(exc):
        compute(model=model, data=data, **options)
    assert seen_hooks and seen_hooks[0] > 0  # the hooks were in place during the loop
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_hooks_with_kwargs, name
        assert not module._forward_pre_hooks, name
        assert not module._backward_hooks, name


def test_hooks_removed_after_success():
    model = make_model()
    compute(model=model)
    assert all(not m._forward_hooks for m in model.modules())


# -- randomness -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn",
    [nn.CrossEntropyLoss(), nn.MSELoss(), nn.BCEWithLogitsLoss()],
    ids=lambda loss: type(loss).__name__,
)
def test_mc_leaves_global_rng_alone(loss_fn):
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        data = tiny_batches()
    else:
        data = make_data(2, "bce", (N,), (3,), dtype=torch.float32)  # MSE or BCE targets
    model = make_model()

    def mc(**options):
        return kronfac.compute_factors(model, loss_fn, data, fisher="mc", mc_samples=3, **options)

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    f1 = mc()
    assert torch.equal(torch.get_rng_state(), state)
    f2 = mc()
    assert_factors_equal(f1, f2)
    f3 = mc(seed=7)
    assert f3.options["seed"] == 7
    assert torch.equal(f1["0"].A, f3["0"].A)
    assert not torch.equal(f1["0"].S, f3["0"].S)
    assert torch.equal(torch.get_rng_state(), state)


# -- operator inputs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def operator():
    return kronfac.KFAC(make_model(), nn.CrossEntropyLoss(), tiny_batches(), fisher="type-2")


PARAM_SHAPES = [(4, 3), (4,), (2, 4), (2,)]
P = sum(int(np.prod(s)) for s in PARAM_SHAPES)  # 26


def test_operator_accepts_valid_inputs(operator):
    assert operator.shape == (P, P)
    v = torch.randn(P)
    assert (operator @ v).shape == (P,)
    assert (operator @ torch.randn(P, 3)).shape == (P, 3)
    parts = [torch.randn(s) for s in PARAM_SHAPES]
    assert [t.shape for t in operator @ parts] == [torch.Size(s) for s in PARAM_SHAPES]
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    out = operator @ dict(zip(names, parts, strict=True))
    assert list(out) == names


@pytest.mark.parametrize(
    "v",
    [
        torch.zeros(P + 1),
        torch.zeros(P - 1),
        torch.zeros(()),
        torch.zeros(P, 2, 1),
        torch.zeros(3, P),
    ],
    ids=["long", "short", "scalar", "3d", "transposed"],
)
def test_operator_tensor_of_wrong_shape(operator, v):
    with pytest.raises(ValueError, match=rf"Expected a vector \[{P}\] or matrix \[{P}, k\], got"):
        operator @ v


@pytest.mark.parametrize(
    "v",
    [
        [torch.zeros(s) for s in PARAM_SHAPES[:-1]],
        [torch.zeros(s) for s in [*PARAM_SHAPES, (2,)]],
        [torch.zeros(s[::-1]) for s in PARAM_SHAPES],
        [torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 4), 0.0],
        [],
    ],
    ids=["missing", "extra", "transposed", "non-tensor", "empty"],
)
def test_operator_list_of_wrong_shapes(operator, v):
    with pytest.raises(ValueError, match=r"Expected tensors of shapes \[\(4, 3\), \(4,\)"):
        operator @ v


def test_operator_dict_with_wrong_keys(operator):
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    v = {n: torch.zeros(s) for n, s in zip(names, PARAM_SHAPES, strict=True)}
    missing = {k: t for k, t in v.items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"missing \['2.bias'\], unexpected \[\]"):
        operator @ missing
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['extra'\]"):
        operator @ {**v, "extra": torch.zeros(1)}


@pytest.mark.parametrize(
    "v", [1.0, None, np.zeros(P), object()], ids=["float", "none", "np", "obj"]
)
def test_operator_non_tensor(operator, v):
    with pytest.raises(TypeError, match="Expected a Tensor, a list of Tensors or a dict, got"):
        operator @ v


@pytest.fixture(scope="module")
def factors():
    return compute(fisher="type-2")


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (make_model(hidden=5), r"Factors of module '0' have shapes A\(4, 4\), S\(4, 4\); expected"),
        (
            nn.Sequential(nn.Linear(3, 4)),
            r"Parameters \['2.bias', '2.weight'\] of the factors are not in the model",
        ),
        (
            nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False)),
            r"Parameters \['0.bias', '2.bias'\] of the factors are not in the model",
        ),
        (
            nn.Sequential(nn.LayerNorm(3), nn.ReLU(), nn.Linear(4, 2)),
            r"Module '0' \(LayerNorm\) is unsupported",
        ),
    ],
    ids=["wrong-shapes", "missing-module", "no-bias", "other-layer"],
)
def test_from_factors_of_another_model(factors, model, match):
    with pytest.raises(ValueError, match=match):
        kronfac.KFAC.from_factors(factors, model)


def test_from_factors_without_modules():
    empty = kronfac.KroneckerFactors(
        {}, param_names={}, options={}, num_data=1, num_per_example_loss_terms=1
    )
    with pytest.raises(ValueError):
        kronfac.KFAC.from_factors(empty, make_model())


def test_from_factors_of_a_plain_dict(factors):
    with pytest.raises(TypeError, match="KroneckerFactors"):
        kronfac.KFAC.from_factors(dict(factors), make_model())


def test_module_shared_across_the_batch_is_left_out_or_a_clear_error():
    """A position embedding called on [1, T] (as GPT-2's wpe) has no per-example gradients."""

    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(4, 3)
            self.out = nn.Linear(3, 2)

        def forward(self, x):  # x: [N, T, 3]
            return self.out(x + self.pos(torch.arange(x.shape[1])[None]))

    X, y = torch.randn(2, 4, 3), torch.randn(2, 4, 2)  # T = 4 is a multiple of N = 2
    data, model = [(X, y)], Positional()
    # every module selected (the default): left out with a warning naming it
    with pytest.warns(UncoveredParameterWarning, match=r"'pos': \(1, 4, 3\) for N = 2.*exclude"):
        default = kronfac.compute_factors(model, nn.MSELoss(), data)
    assert list(default) == ["out"]
    assert_factors_equal(
        default, kronfac.compute_factors(model, nn.MSELoss(), data, exclude=["pos"])
    )
    # selected on purpose, or strict: an error naming the shape, N, and the fixes
    for options in ({"modules": ["pos", "out"]}, {"strict": True}):
        with pytest.raises(
            ValueError,
            match=r"module 'pos' returned shape \(1, 4, 3\), whose first dimension is not the "
            r"batch's N = 2 data points \(read from the first dimension of X \(2, 4, 3\)\)"
            r".*exclude=\['pos'\].*batch_size_fn",
        ):
            kronfac.compute_factors(Positional(), nn.MSELoss(), data, **options)
    factors = kronfac.compute_factors(Positional(), nn.MSELoss(), data, modules=["out"])
    assert list(factors) == ["out"]


def test_to_dense_of_a_large_operator_is_a_clear_error():
    model = nn.Sequential(nn.Linear(300, 200))  # P = 60,200: P² > 2³¹
    data = [(torch.randn(4, 300), torch.randint(0, 200, (4,)))]
    K = kronfac.KFAC(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match=r"to_dense of a 60200 x 60200 operator needs \d+ GiB"):
        K.to_dense()


# -- two passes, randomness, dtypes, options that do nothing ----------------------------------


def test_ekfac_refuses_a_one_shot_generator():
    data = (batch for batch in tiny_batches())
    with pytest.raises(TypeError, match=r"EKFAC makes two passes.*one-shot.*list.*DataLoader"):
        kronfac.EKFAC(make_model(), nn.CrossEntropyLoss(), data)
    # one pass is fine with a generator
    kronfac.compute_factors(make_model(), nn.CrossEntropyLoss(), (b for b in tiny_batches()))


def _user_warnings(record, pattern):
    return [w for w in record if w.category is UserWarning and pattern in str(w.message)]


def test_dropout_in_train_mode_warns_once_naming_the_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.ReLU(), nn.Linear(4, 2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kronfac.EKFAC(model, nn.CrossEntropyLoss(), tiny_batches())
    found = _user_warnings(record, "active dropout")
    assert len(found) == 1 and "'1'" in str(found[0].message)
    assert found[0].filename == __file__  # attributed to the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()  # no dropout: no warning
        kronfac.EKFAC(model, nn.CrossEntropyLoss(), tiny_batches())
        model[1].p = 0.0
        model.train()  # train mode with p = 0: nothing random
        kronfac.EKFAC(model, nn.CrossEntropyLoss(), tiny_batches())


class FunctionalDropout(nn.Module):
    """Randomness that no module advertises: ``F.dropout`` in the forward pass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), 0.5, training=True))


def test_randomness_between_ekfac_passes_warns():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kronfac.EKFAC(FunctionalDropout(), nn.CrossEntropyLoss(), tiny_batches())
    assert len(_user_warnings(record, "differs between EKFAC's two passes")) == 1
    # shuffled data (another first batch) has nothing to compare: no warning
    model = make_model()
    data = tiny_batches()

    class Shuffled:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            return iter(data if self.calls == 1 else data[::-1])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kronfac.EKFAC(model, nn.CrossEntropyLoss(), Shuffled())


@pytest.mark.parametrize(
    ("model_dtype", "data_dtype"), [(torch.float64, torch.float32), (torch.float32, torch.float64)]
)
def test_model_and_data_of_different_dtypes(model_dtype, data_dtype):
    X, y = torch.randn(4, 3, dtype=data_dtype), torch.randint(0, 2, (4,))
    model = make_model().to(model_dtype)
    with pytest.raises(
        TypeError,
        match=rf"Module '0' has {model_dtype} weights but was called on a {data_dtype} input",
    ):
        kronfac.compute_factors(model, nn.CrossEntropyLoss(), [(X, y)])
    # the first module is not a covered one: torch fails inside it, kronfac names both dtypes
    normed = nn.Sequential(nn.LayerNorm(3), make_model()).to(model_dtype)
    with pytest.raises(
        TypeError,
        match=rf"Batch 0: the data is {data_dtype} but module '0' has {model_dtype} parameters",
    ):
        kronfac.compute_factors(normed, nn.CrossEntropyLoss(), [(X, y)], modules=["1."])


def test_rank_that_applies_to_no_factor_warns_once():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kronfac.EKFAC(make_model(), nn.CrossEntropyLoss(), tiny_batches(), rank=2)
    found = _user_warnings(record, "rank=2 applies to no factor")
    assert len(found) == 1 and "rank_threshold=512 (the largest is 5)" in str(found[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute(rank=2, rank_threshold=5)  # A of the last layer: side 4 + 1


def test_bad_exclude():
    with pytest.raises(ValueError, match=r"exclude=\['nope'\] matches no module"):
        compute(exclude=["nope"])
    with pytest.raises(ValueError, match=r"exclude=\['0', '2'\] leaves out every selected"):
        compute(modules=["0", "2"], exclude=["0", "2"])
    with pytest.raises(
        ValueError, match=r"No supported layer .* selected modules \(\(the model\), 1\)"
    ):
        compute(exclude=["0", "2"])
    with pytest.raises(TypeError, match=r"exclude must be a list of name substrings"):
        compute(exclude=[0])
    assert list(compute(exclude="0")) == ["2"]
