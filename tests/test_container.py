"""``KroneckerFactors``: the mapping, its metadata, and its safetensors file."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import kronfac
from kronfac import FactorFileError, FactorPair, KroneckerFactors, ParamNames

N = 6


def make_model() -> nn.Sequential:
    """Linear with bias, bias-free Linear, Linear with a frozen bias."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 2)
    )
    model[4].bias.requires_grad_(False)
    return model


def make_data(num_batches: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(N, 3, generator=g), torch.randint(0, 2, (N,), generator=g))
        for _ in range(num_batches)
    ]


def compute(model=None, **options) -> KroneckerFactors:
    options = {"fisher": "type-2", **options}
    model = make_model() if model is None else model
    return kronfac.compute_factors(model, nn.CrossEntropyLoss(), make_data(), **options)


@pytest.fixture(scope="module")
def factors() -> KroneckerFactors:
    return compute()


def assert_same(loaded: KroneckerFactors, factors: KroneckerFactors) -> None:
    assert list(loaded) == list(factors)
    for name in factors:
        for a, b in zip(loaded[name], factors[name], strict=True):
            assert a.dtype == b.dtype
            assert torch.equal(a, b)
    assert loaded.options == factors.options
    assert loaded.num_data == factors.num_data
    assert loaded.num_per_example_loss_terms == factors.num_per_example_loss_terms
    assert loaded.param_names == factors.param_names
    assert all(type(p) is ParamNames for p in loaded.param_names.values())


# -- the mapping ----------------------------------------------------------------------------


def test_mapping_of_factor_pairs(factors):
    assert isinstance(factors, Mapping)
    assert len(factors) == 3
    assert list(factors) == ["0", "2", "4"]
    assert list(factors.keys()) == ["0", "2", "4"]
    assert "0" in factors and "1" not in factors
    with pytest.raises(KeyError):
        factors["1"]
    A, S = factors["0"]
    assert isinstance(factors["0"], FactorPair)
    assert A is factors["0"].A and S is factors["0"].S
    assert factors["0"] == (A, S)
    for A, S in factors.values():
        assert A.ndim == S.ndim == 2
        assert A.shape[0] == A.shape[1] and S.shape[0] == S.shape[1]
        assert A.dtype == S.dtype == torch.float32


def test_shapes_follow_the_bias(factors):
    shapes = {name: (tuple(A.shape), tuple(S.shape)) for name, (A, S) in factors.items()}
    # joint bias: A gets a bias row/column; none for a bias-free or frozen-bias Linear.
    assert shapes == {"0": ((4, 4), (4, 4)), "2": ((4, 4), (5, 5)), "4": ((5, 5), (2, 2))}
    separate = compute(bias="separate")
    assert tuple(separate["0"].A.shape) == (3, 3)
    assert separate.options["bias"] == "separate"


def test_param_names(factors):
    assert factors.param_names == {
        "0": ParamNames("0.weight", "0.bias"),
        "2": ParamNames("2.weight", None),
        "4": ParamNames("4.weight", None),
    }
    weight, bias = factors.param_names["0"]
    assert (weight, bias) == ("0.weight", "0.bias")
    assert factors.param_names["2"].bias is None


def test_options_and_counts(factors):
    expected = {
        "fisher": "type-2",
        "mc_samples": 1,
        "approx": "expand",
        "bias": "joint",
        "loss": "CrossEntropyLoss",
        "reduction": "mean",
    }
    assert {k: factors.options[k] for k in expected} == expected
    assert factors.num_data == 2 * N
    assert factors.num_per_example_loss_terms == 1


def test_loss_terms_per_example_of_a_sequence_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    data = [(torch.randn(N, 5, 3), torch.randn(N, 5, 2))]
    factors = kronfac.compute_factors(model, nn.MSELoss(), data, fisher="type-2")
    assert factors.num_data == N
    assert factors.num_per_example_loss_terms == 5


class Unsorted(nn.Module):
    """Modules whose registration order is neither alphabetical nor numeric-as-string."""

    def __init__(self):
        super().__init__()
        self.zeta = nn.Linear(2, 2)
        self.body = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])
        self.alpha = nn.Linear(2, 2)

    def forward(self, x):
        return self.alpha(self.body(self.zeta(x)))


def test_iteration_follows_module_order_also_after_load(tmp_path):
    torch.manual_seed(0)
    model = Unsorted()
    data = [(torch.randn(4, 2), torch.randint(0, 2, (4,)))]
    factors = kronfac.compute_factors(model, nn.CrossEntropyLoss(), data, fisher="type-2")
    order = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert order[:3] == ["zeta", "body.0", "body.1"] and order[-1] == "alpha"
    assert list(factors) == order
    assert list(factors.param_names) == order
    factors.save(tmp_path / "f.safetensors")
    loaded = KroneckerFactors.load(tmp_path / "f.safetensors")
    assert list(loaded) == order
    assert list(loaded.param_names) == order
    assert_same(loaded, factors)


def test_constructor_checks_modules():
    with pytest.raises(ValueError, match="same modules"):
        KroneckerFactors(
            {"a": (torch.eye(2), torch.eye(2))},
            param_names={"b": ("b.weight", None)},
            options={},
            num_data=1,
            num_per_example_loss_terms=1,
        )


# -- .to ------------------------------------------------------------------------------------


def test_to_dtype(factors):
    cast = factors.to(torch.float64)
    assert cast is not factors and isinstance(cast, KroneckerFactors)
    assert list(cast) == list(factors)
    for name in factors:
        for a, b in zip(cast[name], factors[name], strict=True):
            assert a.dtype == torch.float64 and b.dtype == torch.float32
            assert torch.equal(a, b.double())
    assert cast.options == factors.options
    assert cast.num_data == factors.num_data
    assert cast.num_per_example_loss_terms == factors.num_per_example_loss_terms
    assert cast.param_names == factors.param_names


def test_to_device(factors):
    moved = factors.to("cpu")
    assert moved is not factors
    assert_same(moved, factors)
    assert all(t.device.type == "cpu" for pair in moved.values() for t in pair)
    moved.options["fisher"] = "changed"  # the copy's options are its own
    assert factors.options["fisher"] == "type-2"


# -- save / load ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_round_trip(tmp_path, dtype, bias):
    factors = compute(bias=bias).to(dtype)
    path = tmp_path / "factors.safetensors"
    factors.save(path)
    loaded = KroneckerFactors.load(path)
    assert_same(loaded, factors)
    assert loaded.options["bias"] == bias
    assert os.listdir(tmp_path) == ["factors.safetensors"]


def test_round_trip_str_path_and_device(tmp_path, factors):
    path = str(tmp_path / "factors.safetensors")
    factors.save(path)
    assert_same(KroneckerFactors.load(path, device="cpu"), factors)
    assert_same(KroneckerFactors.load(path, device=torch.device("cpu")), factors)


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_operator_from_loaded_factors(tmp_path, bias):
    model = make_model()
    op = kronfac.KFAC(model, nn.CrossEntropyLoss(), make_data(), fisher="type-2", bias=bias)
    op.factors.save(tmp_path / "f.safetensors")
    loaded = KroneckerFactors.load(tmp_path / "f.safetensors")
    dense = kronfac.KFAC.from_factors(loaded, model).to_dense()
    assert torch.equal(dense, op.to_dense())
    assert dense.shape == (4 * 3 + 4 + 5 * 4 + 2 * 5,) * 2


def test_file_is_safetensors(tmp_path, factors):
    path = tmp_path / "f.safetensors"
    factors.save(path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys == {f"{m}/{side}" for m in factors for side in ("A", "S")}
    for m, (A, S) in factors.items():
        assert torch.equal(tensors[f"{m}/A"], A)
        assert torch.equal(tensors[f"{m}/S"], S)
    doc = json.loads(meta["kronfac"])
    assert doc["num_data"] == factors.num_data
    assert doc["options"] == factors.options
    assert safetensors.torch.load_file(str(path)).keys() == keys


def test_no_pickle_involved(tmp_path, factors, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle must not be used")

    class ForbiddenUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    for name in ("load", "loads", "dump", "dumps"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    monkeypatch.setattr(pickle, "Pickler", ForbiddenUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    path = tmp_path / "f.safetensors"
    factors.save(path)
    assert_same(KroneckerFactors.load(path), factors)


def test_saved_file_respects_umask(tmp_path, factors):
    factors.save(tmp_path / "f.safetensors")
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    mode = os.stat(tmp_path / "f.safetensors").st_mode & 0o777
    assert mode == os.stat(reference).st_mode & 0o777


# -- loading bad files ----------------------------------------------------------------------


def _valid_parts(factors: KroneckerFactors, tmp_path: Path) -> tuple[dict, dict]:
    path = tmp_path / "valid.safetensors"
    factors.save(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        doc = json.loads(f.metadata()["kronfac"])
    path.unlink()
    return tensors, doc


def _write(path: Path, tensors: dict, doc=None, raw: str | None = None) -> None:
    metadata = None
    if doc is not None:
        metadata = {"kronfac": json.dumps(doc)}
    if raw is not None:
        metadata = {"kronfac": raw}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def _valid_bytes(factors, tmp_path):
    path = tmp_path / "valid.safetensors"
    factors.save(path)
    data = path.read_bytes()
    path.unlink()
    return data


def missing(path, factors, tmp_path):
    pass


def truncated(path, factors, tmp_path):
    data = _valid_bytes(factors, tmp_path)
    path.write_bytes(data[: len(data) // 2])


def truncated_header(path, factors, tmp_path):
    path.write_bytes(_valid_bytes(factors, tmp_path)[:5])


def empty_file(path, factors, tmp_path):
    path.write_bytes(b"")


def random_bytes(path, factors, tmp_path):
    g = torch.Generator().manual_seed(0)
    path.write_bytes(bytes(torch.randint(0, 256, (512,), generator=g).tolist()))


def a_pickle(path, factors, tmp_path):
    path.write_bytes(pickle.dumps({"0": (torch.eye(2), torch.eye(2))}))


def no_metadata(path, factors, tmp_path):
    safetensors.torch.save_file({"0/A": torch.eye(4), "0/S": torch.eye(4)}, str(path))


def other_metadata(path, factors, tmp_path):
    tensors, _ = _valid_parts(factors, tmp_path)
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})


def metadata_not_json(path, factors, tmp_path):
    tensors, _ = _valid_parts(factors, tmp_path)
    _write(path, tensors, raw="{not json")


def metadata_not_an_object(path, factors, tmp_path):
    tensors, _ = _valid_parts(factors, tmp_path)
    _write(path, tensors, raw="[1, 2, 3]")


def metadata_missing_field(path, factors, tmp_path):
    tensors, doc = _valid_parts(factors, tmp_path)
    del doc["modules"]
    _write(path, tensors, doc)


def bad_param_names(path, factors, tmp_path):
    tensors, doc = _valid_parts(factors, tmp_path)
    doc["modules"]["0"] = ["0.weight"]
    _write(path, tensors, doc)


def tensor_missing(path, factors, tmp_path):
    tensors, doc = _valid_parts(factors, tmp_path)
    del tensors["2/S"]
    _write(path, tensors, doc)


def module_missing_from_tensors(path, factors, tmp_path):
    tensors, doc = _valid_parts(factors, tmp_path)
    del tensors["4/A"], tensors["4/S"]
    _write(path, tensors, doc)


def extra_tensor(path, factors, tmp_path):
    tensors, doc = _valid_parts(factors, tmp_path)
    tensors["9/A"] = torch.eye(2)
    _write(path, tensors, doc)


def non_square(path, factors, tmp_path):
    tensors, doc = _valid_parts(factors, tmp_path)
    tensors["0/A"] = torch.ones(4, 3)
    _write(path, tensors, doc)


def one_dimensional(path, factors, tmp_path):
    tensors, doc = _valid_parts(factors, tmp_path)
    tensors["2/S"] = torch.ones(5)
    _write(path, tensors, doc)


def three_dimensional(path, factors, tmp_path):
    tensors, doc = _valid_parts(factors, tmp_path)
    tensors["2/S"] = torch.ones(5, 5, 1)
    _write(path, tensors, doc)


def wrong_format(path, factors, tmp_path):
    tensors, doc = _valid_parts(factors, tmp_path)
    doc["format"] = "other.factors"
    _write(path, tensors, doc)


def wrong_version(path, factors, tmp_path):
    tensors, doc = _valid_parts(factors, tmp_path)
    doc["version"] = 999
    _write(path, tensors, doc)


NOT_SAFETENSORS = "not a readable safetensors file"
BAD_METADATA = "missing or malformed kronfac metadata"
DISAGREE = "disagree with the metadata"
NOT_SQUARE = r"must be a square floating-point matrix( \(or a diagonal vector\))?"
FORMAT = r"expected format 'kronfac\.factors' version 1, got"


@pytest.mark.parametrize(
    ("make_file", "match"),
    [
        (missing, NOT_SAFETENSORS),
        (truncated, NOT_SAFETENSORS),
        (truncated_header, NOT_SAFETENSORS),
        (empty_file, NOT_SAFETENSORS),
        (random_bytes, NOT_SAFETENSORS),
        (a_pickle, NOT_SAFETENSORS),
        (no_metadata, BAD_METADATA),
        (other_metadata, BAD_METADATA),
        (metadata_not_json, BAD_METADATA),
        (metadata_not_an_object, BAD_METADATA),
        (metadata_missing_field, BAD_METADATA),
        (bad_param_names, BAD_METADATA),
        (tensor_missing, rf"\['2/S'\] {DISAGREE}"),
        (module_missing_from_tensors, rf"\['4/A', '4/S'\] {DISAGREE}"),
        (extra_tensor, rf"\['9/A'\] {DISAGREE}"),
        (non_square, rf"factor 0/A {NOT_SQUARE}, got shape \(4, 3\)"),
        (one_dimensional, rf"factor 2/S {NOT_SQUARE}, got shape \(5,\)"),
        (three_dimensional, rf"factor 2/S {NOT_SQUARE}"),
        (wrong_format, rf"{FORMAT} 'other\.factors' version 1"),
        (wrong_version, rf"{FORMAT} 'kronfac\.factors' version 999"),
    ],
    ids=lambda v: v.__name__ if callable(v) else "",
)
def test_load_bad_file(tmp_path, factors, make_file, match):
    path = tmp_path / "bad.safetensors"
    make_file(path, factors, tmp_path)
    with pytest.raises(FactorFileError, match=match) as info:
        KroneckerFactors.load(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)


def _with_doc(**changes):
    def make(path, factors, tmp_path):
        tensors, doc = _valid_parts(factors, tmp_path)
        doc.update(changes)
        _write(path, tensors, doc)

    return make


def _integer_factor(path, factors, tmp_path):
    tensors, doc = _valid_parts(factors, tmp_path)
    tensors["0/A"] = tensors["0/A"].to(torch.int64)
    _write(path, tensors, doc)


@pytest.mark.parametrize(
    "make_file",
    [
        _with_doc(num_data=None),
        _with_doc(num_data="many"),
        _with_doc(num_data=0),
        _with_doc(num_per_example_loss_terms=None),
        _with_doc(options=[1, 2]),
        _with_doc(modules=["0"]),
        _integer_factor,
    ],
    ids=[
        "num_data-null",
        "num_data-str",
        "num_data-zero",
        "terms-null",
        "options-list",
        "modules-list",
        "integer-factor",
    ],
)
def test_load_malformed_metadata_values(tmp_path, factors, make_file):
    """Well-formed JSON with values of the wrong type is a FactorFileError, nothing else."""
    path = tmp_path / "bad.safetensors"
    make_file(path, factors, tmp_path)
    with pytest.raises(FactorFileError):
        KroneckerFactors.load(path)


# -- save never leaves a half-written file --------------------------------------------------


def _failing_save_file(exc: BaseException):
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise exc

    return save_file


@pytest.mark.parametrize(
    "exc", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "interrupt"]
)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_save_is_atomic(tmp_path, factors, monkeypatch, exc, existing):
    target = tmp_path / "f.safetensors"
    before = None
    if existing:
        compute(fisher="forward-only").save(target)
        before = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(exc))
    with pytest.raises(type(exc)):
        factors.save(target)
    monkeypatch.undo()
    if existing:
        assert target.read_bytes() == before
        assert KroneckerFactors.load(target).options["fisher"] == "forward-only"
        assert os.listdir(tmp_path) == ["f.safetensors"]
    else:
        assert not target.exists()
        assert os.listdir(tmp_path) == []


def test_save_overwrites(tmp_path, factors):
    target = tmp_path / "f.safetensors"
    compute(fisher="forward-only").save(target)
    factors.save(target)
    assert_same(KroneckerFactors.load(target), factors)
    assert os.listdir(tmp_path) == ["f.safetensors"]
