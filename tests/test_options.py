"""One options object: every entry point validates the engine's options the same way, once."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import torch
from helpers import make_data, mlp
from torch import nn

import kronfac
from kronfac.compat.curvlinops import KFACLinearOperator
from kronfac.factors import FactorOptions
from kronfac.optim import KFAC as KFACOptimizer
from kronfac.optim import KFACPreconditioner


def model() -> nn.Module:
    return mlp((3, 4, 2), torch_init=True, dtype=torch.float32)


DATA = make_data(2, "ce", (5,), (3,), dtype=torch.float32)
LOSS = nn.CrossEntropyLoss()


def test_compute_factors_defaults_are_the_options_defaults():
    """The public signature and FactorOptions cannot drift apart."""
    params = inspect.signature(kronfac.compute_factors).parameters
    fields = {f.name: f.default for f in dataclasses.fields(FactorOptions)}
    assert set(fields) == set(params) - {"model", "loss_fn", "data"}
    for name, default in fields.items():
        assert params[name].default == default, name


ENTRY_POINTS = {
    "compute_factors": lambda **o: kronfac.compute_factors(model(), LOSS, DATA, **o),
    "KFAC": lambda **o: kronfac.KFAC(model(), LOSS, DATA, **o),
    "EKFAC": lambda **o: kronfac.EKFAC(model(), LOSS, DATA, **o),
    "preconditioner": lambda **o: KFACPreconditioner(model(), loss_fn=LOSS, **o),
    "optimizer": lambda **o: KFACOptimizer(model(), 0.1, loss_fn=LOSS, **o),
}
BAD = [
    ({"fisher": "type-3"}, r"Invalid fisher 'type-3'\. Supported: type-2, mc, empirical"),
    ({"approx": "kron"}, r"Invalid approx 'kron'\. Supported: expand, reduce"),
    ({"bias": "none"}, r"Invalid bias 'none'\. Supported: joint, separate"),
    ({"mc_samples": 0}, "mc_samples must be an integer >= 1, got 0"),
    ({"rank": 0}, "rank must be a positive integer or None, got 0"),
    ({"rank_threshold": True}, "rank_threshold must be a positive integer, got True"),
    ({"oversample": -1}, "oversample must be a non-negative integer or None, got -1"),
    ({"seed": 0.5}, "seed must be an integer, got 0.5"),
    ({"exclude": ["nope"]}, r"exclude=\['nope'\] matches no module"),
]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(("options", "match"), BAD)
def test_every_entry_point_gives_the_same_error(entry, options, match):
    with pytest.raises(ValueError, match=match):
        ENTRY_POINTS[entry](**options)


def test_compat_layer_gives_the_same_error():
    m = model()
    with pytest.raises(ValueError, match=r"mc_samples must be an integer >= 1, got 0"):
        KFACLinearOperator(m, LOSS, dict(m.named_parameters()), DATA, mc_samples=0)


def test_unknown_option_names_the_options():
    with pytest.raises(TypeError, match=r"Unknown option\(s\) fishr\. Options: .*fisher"):
        kronfac.KFAC(model(), LOSS, DATA, fishr="mc")
    with pytest.raises(TypeError, match=r"Unknown option\(s\) fishr"):
        KFACPreconditioner(model(), loss_fn=LOSS, fishr="mc")


def test_options_normalise_and_copy():
    options = FactorOptions(modules="0", exclude=["2"])
    assert options.modules == ("0",) and options.exclude == ("2",)
    assert options.select_all is False and FactorOptions().select_all is True
    again = FactorOptions.of(options, rank=4)
    assert again.rank == 4 and again.modules == ("0",) and options.rank is None
    forward = model().forward  # a bound method: kept as it is, never deep-copied
    assert FactorOptions.of(FactorOptions(forward=forward)).forward == forward
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.rank = 3  # type: ignore[misc]


def test_ekfac_warns_once_for_what_its_two_passes_leave_out():
    m = nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kronfac.EKFAC(m, LOSS, DATA)
    uncovered = [w for w in record if w.category is kronfac.UncoveredParameterWarning]
    assert len(uncovered) == 1 and "0.weight, 0.bias" in str(uncovered[0].message)
    assert uncovered[0].filename == __file__
