"""``KroneckerFactors``: the mapping, its metadata, and its safetensors file."""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import factors_like, make_data, mlp
from safetensors import safe_open
from torch import nn

import kronfac
from kronfac import FactorFileError, FactorPair, KroneckerFactors, ParamNames

N = 6


def make_model() -> nn.Sequential:
    """Linear with bias, bias-free Linear, Linear with a frozen bias (float32, PyTorch's init)."""
    model = mlp(
        (3, 4, 5, 2),
        ("relu", "tanh"),
        bias=(True, False, True),
        torch_init=True,
        dtype=torch.float32,
    )
    model[4].bias.requires_grad_(False)
    return model


def tiny_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two float32 batches: ``N`` inputs ``[N, 3]`` and their labels of 2 classes."""
    return make_data(2, "ce", (N, N), (3,), dtype=torch.float32)


def compute(model=None, **options) -> KroneckerFactors:
    options = {"fisher": "type-2", **options}
    model = make_model() if model is None else model
    return kronfac.compute_factors(model, nn.CrossEntropyLoss(), tiny_batches(), **options)


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


def _tensors(f: KroneckerFactors) -> list[torch.Tensor]:
    """Every tensor of ``f``: dense factors, low-rank parts, EKFAC corrections."""
    out = []
    for pair in [*f.values(), *(f.corrections or {}).values()]:
        for t in pair:
            out += [t.U, t.eigenvalues] if isinstance(t, kronfac.LowRankFactor) else [t]
    return [t for t in out if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("device", ["meta", *(["cuda"] if torch.cuda.is_available() else [])])
def test_to_device(factors, device):
    """A real move (the meta device on any machine, CUDA where there is one) of every tensor."""
    model = mlp((3, 20, 2), "tanh", seed=3)
    data = make_data(model, "ce", (6, 5), (3,), seed=4)
    ekfac = kronfac.EKFAC(model, nn.CrossEntropyLoss(), data, rank=2, rank_threshold=10).factors
    for f in (factors, ekfac):
        moved = f.to(device)
        assert moved is not f and list(moved) == list(f)
        tensors, originals = _tensors(moved), _tensors(f)
        assert len(tensors) == len(originals) > 0
        assert all(t.device.type == device for t in tensors)
        assert all(t.device.type == "cpu" for t in originals)  # the original stays
        pairs = zip(tensors, originals, strict=True)
        assert all(t.shape == o.shape and t.dtype == o.dtype for t, o in pairs)
        if device != "meta":  # data survives a round trip
            assert_same(moved.to("cpu"), f)
    moved = factors.to(device)
    moved.options["fisher"] = "changed"  # the copy's options are its own
    assert factors.options["fisher"] == "type-2"


# -- save / load ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_round_trip(tmp_path, dtype, bias):
    """Half-precision factors are written as float32 (exactly): files hold float32 / float64."""
    factors = compute(bias=bias).to(dtype)
    path = tmp_path / "factors.safetensors"
    factors.save(path)
    loaded = KroneckerFactors.load(path)
    half = dtype in (torch.bfloat16, torch.float16)
    assert_same(loaded, factors.to(torch.float32) if half else factors)
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
    op = kronfac.KFAC(model, nn.CrossEntropyLoss(), tiny_batches(), fisher="type-2", bias=bias)
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


def a_directory(path, factors, tmp_path):
    path.mkdir()


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
NOT_SQUARE = (
    r"must be a square matrix \[d, d\] or \[groups, d, d\]( \(or a diagonal vector \[d\]\))?"
)
FORMAT = r"expected format 'kronfac\.factors' version 1, got"


@pytest.mark.parametrize(
    ("make_file", "match"),
    [
        (a_directory, NOT_SAFETENSORS),
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


# -- every kind of file kronfac writes, and what load refuses in them -----------------------

T = 5  # positions of the zoo's sequences


class Zoo(nn.Module):
    """An embedding (diagonal ``A``), a grouped Conv1d (``[g, d, d]``), a Linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.conv = nn.Conv1d(4, 4, 3, groups=2, padding=1)
        self.head = nn.Linear(4 * T, 8)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(self.emb(x).transpose(1, 2))).flatten(1))


def zoo_ekfac(dtype: torch.dtype) -> KroneckerFactors:
    """EKFAC factors holding every kind of tensor a file has: ``head`` is low-rank on both sides
    (``U`` / eigenvalues / shift, complements) and every bias is a separate block."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randint(0, 7, (N, T), generator=g), torch.randint(0, 8, (N,), generator=g))
        for _ in range(2)
    ]
    model = Zoo().to(dtype)
    options = {"fisher": "type-2", "bias": "separate", "rank": 2, "rank_threshold": 8}
    return kronfac.EKFAC(model, nn.CrossEntropyLoss(), data, **options).factors


ZOO_TENSORS = [
    *("emb/A", "emb/S", "emb/Q_S", "emb/eigenvalues"),
    *("conv/A", "conv/S", "conv/Q_A", "conv/Q_S", "conv/eigenvalues", "conv/bias_eigenvalues"),
    *("head/A.U", "head/A.eigenvalues", "head/A.shift"),
    *("head/S.U", "head/S.eigenvalues", "head/S.shift"),
    *("head/Q_A", "head/Q_S", "head/eigenvalues", "head/bias_eigenvalues"),
    *("head/complement", "head/bias_complement"),
]


@pytest.fixture(scope="module")
def zoo() -> KroneckerFactors:
    return zoo_ekfac(torch.float32)


def without_corrections(factors: KroneckerFactors) -> KroneckerFactors:
    return factors_like(factors, dict(factors))


def leaves(factors: KroneckerFactors) -> list:
    """Every tensor (and low-rank shift) of the factors and corrections, in order."""

    def flat(x) -> list:
        return [y for v in x for y in flat(v)] if isinstance(x, tuple) else [x]

    corrections = factors.corrections or {}
    return [y for m in factors for y in flat((factors[m], corrections.get(m)))]


def test_zoo_file_holds_every_kind_of_tensor(tmp_path, zoo):
    tensors, doc = _valid_parts(zoo, tmp_path)
    assert sorted(tensors) == sorted(ZOO_TENSORS)
    assert tensors["emb/A"].ndim == 1 and tensors["conv/A"].shape == (2, 6, 6)
    assert doc["lowrank"] == {"emb": [], "conv": [], "head": ["A", "S"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ekfac", [True, False], ids=["ekfac", "kfac"])
def test_every_kind_of_file_round_trips(tmp_path, dtype, ekfac):
    """Embedding diagonal, grouped conv, low-rank, corrections, separate bias, both dtypes."""
    factors = zoo_ekfac(dtype)
    factors = factors if ekfac else without_corrections(factors)
    factors.save(tmp_path / "a.safetensors")
    loaded = KroneckerFactors.load(tmp_path / "a.safetensors")
    assert (loaded.corrections is None) == (not ekfac)
    assert isinstance(loaded["head"].A, kronfac.LowRankFactor)
    expected, actual = leaves(factors), leaves(loaded)
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected, strict=True):
        assert type(a) is type(b)
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype == dtype and torch.equal(a, b)
        else:
            assert a == b
    assert loaded.options == factors.options and loaded.param_names == factors.param_names
    loaded.save(tmp_path / "b.safetensors")  # and writes the very same file again
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_missing_file_is_file_not_found(tmp_path):
    path = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        KroneckerFactors.load(path)
    assert not isinstance(info.value, FactorFileError)
    assert info.value.filename == str(path)


def _rewritten(tmp_path, factors, *, tensors=None, options=None, drop=()) -> Path:
    """A file of ``factors``, rewritten with some tensors replaced (``{name: f(t)}``), some
    options changed and option keys in ``drop`` removed."""
    parts, doc = _valid_parts(factors, tmp_path)
    for name, edit in (tensors or {}).items():
        parts[name] = edit(parts[name])
    doc["options"].update(options or {})
    for key in drop:
        del doc["options"][key]
    path = tmp_path / "edited.safetensors"
    _write(path, parts, doc)
    return path


def _refused(path: Path, match: str) -> None:
    with pytest.raises(FactorFileError, match=match) as info:
        KroneckerFactors.load(path)
    assert str(path) in str(info.value)


def _set_last(value: float):
    def edit(t):
        t = t.clone()
        t.view(-1)[-1] = value
        return t

    return edit


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ZOO_TENSORS)
def test_non_finite_tensor_is_refused(tmp_path, zoo, name, value):
    path = _rewritten(tmp_path, zoo, tensors={name: _set_last(value)})
    _refused(path, rf"tensor {name} holds NaN or Inf")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("emb/A", torch.float16),
        ("conv/S", torch.bfloat16),
        ("head/A.U", torch.int32),
        ("head/S.shift", torch.int64),
        ("conv/Q_A", torch.bool),
        ("emb/eigenvalues", torch.complex64),
    ],
)
def test_dtype_kronfac_never_writes_is_refused(tmp_path, zoo, name, dtype):
    path = _rewritten(tmp_path, zoo, tensors={name: lambda t: t.to(dtype)})
    _refused(path, rf"tensor {name} has dtype {dtype}: kronfac writes float32 or float64 only")


@pytest.mark.parametrize(
    ("name", "other"), [("conv/Q_A", "conv/A"), ("head/S.shift", "head/A.U"), ("emb/A", "emb/S")]
)
def test_mixed_dtypes_in_one_module_are_refused(tmp_path, zoo, name, other):
    """Both tensors are named (the first of the module's tensors is the reference)."""
    path = _rewritten(tmp_path, zoo, tensors={name: torch.Tensor.double})
    pair = (
        rf"(tensor {name} has dtype torch.float64, {other} torch.float32"
        rf"|tensor {other} has dtype torch.float32, {name} torch.float64)"
    )
    _refused(path, rf"{pair}: the tensors of one module share one dtype")


def _skew(relative: float, group: int | None = None):
    """Add ``relative`` of the largest entry to one off-diagonal entry (of one group)."""

    def edit(t):
        t = t.clone()
        M = t if group is None else t[group]
        M[0, 1] += relative * t.abs().max()
        return t

    return edit


@pytest.mark.parametrize(
    ("dtype", "name", "group", "refused", "kept"),
    [
        (torch.float32, "0/A", None, 1e-3, 1e-5),
        (torch.float32, "2/S", None, 1e-3, 1e-5),
        (torch.float64, "0/S", None, 1e-7, 1e-11),
        (torch.float32, "conv/A", 1, 1e-3, 1e-5),
        (torch.float64, "conv/S", 0, 1e-7, 1e-11),
    ],
)
def test_asymmetric_factor_is_refused_round_off_is_not(
    tmp_path, factors, zoo, dtype, name, group, refused, kept
):
    """Tolerance √ε of the largest entry (float32 3.5e-4, float64 1.5e-8): round-off of the
    GEMMs (a few ε) loads, a matrix that is not symmetric does not."""
    source = zoo if name.startswith("conv") else factors
    source = source.to(dtype)
    path = _rewritten(tmp_path, source, tensors={name: _skew(refused, group)})
    _refused(path, rf"factor {name} is not symmetric: .* of its largest entry")
    path = _rewritten(tmp_path, source, tensors={name: _skew(kept, group)})
    loaded = KroneckerFactors.load(path)
    A = loaded[name.split("/")[0]][0 if name.endswith("A") else 1]
    assert not torch.equal(A, A.mT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_factors_asymmetric_by_round_off_load(tmp_path, dtype):
    """What the tolerance rests on: the GEMMs' two triangles may differ by a few ε (here up to
    ~2ε of the largest entry, e.g. S of the 96 → 10 layer in float32), far below √ε."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 10)).to(dtype)
    g = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(256, 64, generator=g, dtype=dtype) + 1,
            torch.randint(0, 10, (256,), generator=g),
        )
        for _ in range(3)
    ]
    factors = kronfac.compute_factors(model, nn.CrossEntropyLoss(), data, fisher="type-2")
    for F in (t for pair in factors.values() for t in pair):
        eps = torch.finfo(F.dtype).eps
        assert (F - F.mT).abs().max() <= 16 * eps * F.abs().max()
    factors.save(tmp_path / "f.safetensors")
    assert_same(KroneckerFactors.load(tmp_path / "f.safetensors"), factors)


def _negate(index: tuple = ()):
    def edit(t):
        t = t.clone()
        t[index] = -1.0 - t[index].abs()
        return t

    return edit


@pytest.mark.parametrize(
    ("name", "index", "what"),
    [
        ("emb/A", (0,), "entries"),
        ("emb/S", (1, 1), "diagonal entries"),
        ("conv/A", (1, 2, 2), "diagonal entries"),
        ("head/A.eigenvalues", (0,), "entries"),
        ("head/S.shift", (), "entries"),
        ("emb/eigenvalues", (0, 0), "entries"),
        ("conv/bias_eigenvalues", (1, 0), "entries"),
        ("head/complement", (), "entries"),
        ("head/bias_complement", (), "entries"),
    ],
)
def test_negative_entries_are_refused(tmp_path, zoo, name, index, what):
    """Diagonal A, the diagonals of dense factors, eigenvalues, shifts and complements."""
    path = _rewritten(tmp_path, zoo, tensors={name: _negate(index)})
    _refused(path, rf"tensor {name}: {what} must be non-negative, the smallest is -")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fisher", "bogus"),
        ("approx", "expanded"),
        ("bias", "both"),
        ("reduction", "none"),
        ("loss", "L1Loss"),
        ("loss", None),
        ("mc_samples", 0),
        ("mc_samples", "1"),
        ("mc_samples", True),
        ("seed", 1.5),
        ("seed", None),
        ("rank", 0),
        ("rank", "2"),
        ("rank_threshold", 0),
        ("rank_threshold", None),
        ("oversample", -1),
        ("oversample", 2.0),
    ],
)
def test_option_value_kronfac_never_records_is_refused(tmp_path, factors, key, value):
    path = _rewritten(tmp_path, factors, options={key: value})
    _refused(path, rf"metadata option '{key}' must be .*, got {re.escape(repr(value))}")


def test_mc_samples_without_mc_fisher_is_refused(tmp_path, factors):
    path = _rewritten(tmp_path, factors, options={"mc_samples": 4})
    _refused(path, r"option 'mc_samples' must be 1 unless fisher='mc', got 4")


def test_unknown_or_missing_option_key_is_refused(tmp_path, factors):
    _refused(_rewritten(tmp_path, factors, options={"lr": 0.1}), r"unknown option\(s\) 'lr'")
    for key in ("fisher", "loss"):
        _refused(_rewritten(tmp_path, factors, drop=[key]), rf"option\(s\) '{key}' missing")


@pytest.mark.parametrize(
    ("options", "drop"),
    [
        ({}, ["oversample"]),  # written before oversample existed
        ({}, ["rank", "rank_threshold", "oversample"]),  # ... before low-rank factors
        ({"oversample": 0, "seed": -3}, []),
        ({"fisher": "mc", "mc_samples": 3, "rank": 4, "oversample": 10}, []),
        ({"fisher": "forward-only", "reduction": "sum", "loss": "MSELoss"}, []),
    ],
)
def test_files_with_other_recorded_options_load(tmp_path, factors, options, drop):
    path = _rewritten(tmp_path, factors, options=options, drop=drop)
    loaded = KroneckerFactors.load(path)
    assert all(key not in loaded.options for key in drop)
    assert loaded.options.items() >= options.items()


def test_old_low_rank_ekfac_file_loads(tmp_path, zoo):
    loaded = KroneckerFactors.load(_rewritten(tmp_path, zoo, drop=["oversample"]))
    assert "oversample" not in loaded.options and loaded.corrections is not None


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda f: f.to(torch.float64).to(torch.float32), None),
        (lambda f: _replace(f, "0", A=f["0"].A.clone().fill_(float("nan"))), "0/A holds NaN"),
        (lambda f: _replace(f, "2", S=f["2"].S.triu()), "factor 2/S is not symmetric"),
        (lambda f: _replace(f, "4", S=f["4"].S.double()), "tensor 4/S has dtype torch.float64"),
        (lambda f: _with_options(f, fisher="bogus"), "option 'fisher' must be one of"),
        (lambda f: _with_options(f, lr=0.1), r"unknown option\(s\) 'lr'"),
    ],
    ids=["valid", "nan", "asymmetric", "mixed-dtypes", "bad-option", "unknown-option"],
)
def test_save_refuses_what_load_would_refuse(tmp_path, factors, edit, match):
    path = tmp_path / "f.safetensors"
    if match is None:
        edit(factors).save(path)
        assert_same(KroneckerFactors.load(path), factors)
        return
    with pytest.raises(FactorFileError, match=rf"{re.escape(str(path))}: not written, .*{match}"):
        edit(factors).save(path)
    assert os.listdir(tmp_path) == []


def _replace(factors: KroneckerFactors, module: str, **sides) -> KroneckerFactors:
    pairs = {m: factors[m]._replace(**sides) if m == module else factors[m] for m in factors}
    return factors_like(factors, pairs)


def _with_options(factors: KroneckerFactors, **options) -> KroneckerFactors:
    copy = factors.to("cpu")
    copy.options.update(options)
    return copy


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
