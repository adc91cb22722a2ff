"""``KroneckerFactors``: the result of :func:`kronfac.compute_factors` and its file format.

Files are safetensors: two tensors per module (``"<module>/A"``, ``"<module>/S"``; low-rank
factors and EKFAC's corrections add more) and a JSON document in the header metadata with the
options, ``num_data``, the number of loss terms per data point and the parameter names of every
block. Nothing is ever unpickled, a file is written to a temporary name and moved into place
(never half-written), and loading checks everything a file holds: one that is truncated, not
safetensors, inconsistent, or holds what kronfac never writes (NaN / Inf, asymmetric factors,
half-precision tensors, unknown options) raises :class:`FactorFileError` naming the offending
tensor or metadata key. ``save`` makes the same checks before writing.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kronfac.errors import FactorFileError
from kronfac.factors.options import check_recorded_options
from kronfac.linalg import LowRankFactor

__all__ = ["EigenCorrection", "FactorFileError", "FactorPair", "KroneckerFactors", "ParamNames"]

_FORMAT = "kronfac.factors"
_FORMAT_VERSION = 1


class FactorPair(NamedTuple):
    """The two Kronecker factors of one module: ``G ≈ S ⊗ A``.

    Attributes:
        A: Input factor ``[d_in(+1), d_in(+1)]`` (``+1``: the bias column with ``bias="joint"``);
            ``[d_in]`` for a diagonal one (embeddings); ``[g, ·, ·]`` for a grouped convolution.
        S: Output-gradient factor ``[d_out, d_out]`` (``[g, d_out, d_out]`` with groups).

    Either may be a :class:`~kronfac.LowRankFactor` (``rank=`` of ``compute_factors``).
    """

    A: Tensor | LowRankFactor
    S: Tensor | LowRankFactor


class ParamNames(NamedTuple):
    """Names (as in ``model.named_parameters()``) of the parameters one module's block covers.

    Attributes:
        weight: The weight's name.
        bias: The bias's name, or ``None`` when the module has no trainable bias.
    """

    weight: str
    bias: str | None


class EigenCorrection(NamedTuple):
    """EKFAC's eigenbasis and corrected eigenvalues of one module (George et al., 2018).

    The weight's (or joint weight-and-bias) block is
    ``(Q_S ⊗ Q_A) diag(vec eigenvalues) (Q_S ⊗ Q_A)ᵀ``, with
    ``eigenvalues[a, b] = 1/D Σ_{n,k} (Q_Sᵀ G_{n,k} Q_A)[a, b]²`` for the per-example gradients
    ``G_{n,k} = Σ_t g_{n,t,k} a_{n,t}ᵀ`` (``D`` as for ``S``).

    Attributes:
        Q_A: ``[q, q]`` eigenvectors (columns) of ``A``; ``None`` (the identity) for a
            diagonal ``A``.
        Q_S: ``[p, p]`` eigenvectors (columns) of ``S``.
        eigenvalues: ``[p, q]`` corrected eigenvalues.
        bias_eigenvalues: ``[p]`` corrected eigenvalues of a separate bias block
            (``Q_S diag(·) Q_Sᵀ``), or ``None``.
        complement: With low-rank factors the bases are partial (``Q_S: [p, k_S]``,
            ``Q_A: [q, k_A]``): the mean second moment outside their span, a scalar (else
            ``None``); ``bias_complement`` likewise for a separate bias.
    """

    Q_A: Tensor | None
    Q_S: Tensor
    eigenvalues: Tensor
    bias_eigenvalues: Tensor | None
    complement: Tensor | None = None
    bias_complement: Tensor | None = None


class KroneckerFactors(Mapping[str, FactorPair]):
    """Kronecker factors keyed by module name (``model.named_modules()`` names).

    ``factors[name]`` is a :class:`FactorPair` ``(A, S)``. With ``bias="joint"`` and a bias,
    ``A`` carries the bias as a last row/column and the module's block is ``S ⊗ A`` on
    ``[W | b]``; with ``bias="separate"`` the weight's block is ``S ⊗ A`` and the bias's is
    ``S``.

    Attributes:
        options: The options the factors were computed with (``fisher``, ``mc_samples``,
            ``approx``, ``bias``, ``seed``, ``rank``, ``rank_threshold``, ``oversample``,
            ``loss``, ``reduction``).
        num_data: ``N``, the number of data points.
        num_per_example_loss_terms: ``R``, the number of loss terms per data point.
        param_names: Module name → :class:`ParamNames` of the parameters its block covers.
        corrections: Module name → :class:`EigenCorrection` (EKFAC), or ``None``.
    """

    def __init__(
        self,
        factors: Mapping[str, FactorPair],
        *,
        param_names: Mapping[str, ParamNames],
        options: Mapping[str, Any],
        num_data: int,
        num_per_example_loss_terms: int,
        corrections: Mapping[str, EigenCorrection] | None = None,
    ) -> None:
        if set(factors) != set(param_names):
            raise ValueError(
                f"factors and param_names must have the same modules, got {sorted(factors)} "
                f"and {sorted(param_names)}."
            )
        self._factors = {k: FactorPair(*v) for k, v in factors.items()}
        self.param_names = {k: ParamNames(*param_names[k]) for k in self._factors}
        self.options = dict(options)
        self.num_data = int(num_data)
        self.num_per_example_loss_terms = int(num_per_example_loss_terms)
        if corrections is not None and set(corrections) != set(self._factors):
            raise ValueError(
                f"corrections must cover the same modules as the factors, got "
                f"{sorted(corrections)} and {sorted(self._factors)}."
            )
        self.corrections = (
            None if corrections is None else {k: EigenCorrection(*corrections[k]) for k in self}
        )

    def __getitem__(self, name: str) -> FactorPair:
        return self._factors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)

    def __repr__(self) -> str:
        def shape(t: Any) -> str:
            if isinstance(t, LowRankFactor):
                return f"(rank {t.U.shape[1]} of {t.side})"
            return str(tuple(t.shape))

        body = ", ".join(f"{k}: A{shape(v.A)} S{shape(v.S)}" for k, v in self._factors.items())
        return f"KroneckerFactors({body}; num_data={self.num_data}, options={self.options})"

    def with_corrections(self, corrections: Mapping[str, EigenCorrection]) -> KroneckerFactors:
        """A copy carrying EKFAC's ``corrections`` (same factors and metadata)."""
        return KroneckerFactors(
            self._factors,
            param_names=self.param_names,
            options=self.options,
            num_data=self.num_data,
            num_per_example_loss_terms=self.num_per_example_loss_terms,
            corrections=corrections,
        )

    def to(self, *args: Any, **kwargs: Any) -> KroneckerFactors:
        """A copy with every tensor moved / cast by ``Tensor.to(*args, **kwargs)``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(*args, **kwargs)

        factors = {
            k: FactorPair(A.to(*args, **kwargs), S.to(*args, **kwargs))
            for k, (A, S) in self.items()
        }
        corrections = None
        if self.corrections is not None:  # (move keeps each field a tensor or None, as it was)
            corrections = {
                k: EigenCorrection._make(map(move, c)) for k, c in self.corrections.items()
            }
        return KroneckerFactors(
            factors,
            param_names=self.param_names,
            options=self.options,
            num_data=self.num_data,
            num_per_example_loss_terms=self.num_per_example_loss_terms,
            corrections=corrections,
        )

    # -- file format ----------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        doc = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "options": self.options,
            "num_data": self.num_data,
            "num_per_example_loss_terms": self.num_per_example_loss_terms,
            "modules": {k: list(v) for k, v in self.param_names.items()},
            "corrections": self.corrections is not None,
            "lowrank": {
                k: [side for side, t in zip("AS", v, strict=True) if isinstance(t, LowRankFactor)]
                for k, v in self.items()
            },
        }
        return {"kronfac": json.dumps(doc)}

    def _file_tensors(self) -> dict[str, Tensor]:
        """The file's tensors: contiguous, on the CPU, half precision widened to float32."""

        def stored(t: Tensor) -> Tensor:
            t = t.detach().cpu()
            return (t.float() if t.dtype in _HALF_DTYPES else t).contiguous()

        tensors = {}
        for name, pair in self.items():
            for side, t in zip("AS", pair, strict=True):
                if isinstance(t, LowRankFactor):
                    U = stored(t.U)
                    tensors[f"{name}/{side}.U"] = U
                    tensors[f"{name}/{side}.eigenvalues"] = stored(t.eigenvalues)
                    tensors[f"{name}/{side}.shift"] = torch.tensor(float(t.shift), dtype=U.dtype)
                else:
                    tensors[f"{name}/{side}"] = stored(t)
        for name, corr in (self.corrections or {}).items():
            for field, t in corr._asdict().items():
                if t is not None:
                    tensors[f"{name}/{field}"] = stored(t)
        return tensors

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the factors and their metadata to a safetensors file at ``path``.

        The file is written to a temporary name in the same folder and renamed into place, so
        ``path`` is never left half-written. Tensors are stored in float32 or float64: half
        precision ones (``factors.to(torch.bfloat16)``) are written as float32, exactly.

        Raises:
            FactorFileError: If :meth:`load` would refuse the file (NaN / Inf, a factor that is
                not symmetric, options ``compute_factors`` never records, ...); nothing is
                written then.
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors, metadata = self._file_tensors(), self._metadata()
        try:
            _parse(tensors, metadata)
        except FactorFileError as e:
            raise FactorFileError(f"{path}: not written, {e}") from e.__cause__
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; honour the umask like open()
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
    ) -> KroneckerFactors:
        """Read factors written by :meth:`save`.

        Only a file :meth:`save` could have written loads. Refused are:

        - a file that is not safetensors, truncated, or unreadable, and a directory;
        - metadata that is not a kronfac document of this format version, or malformed;
        - options ``compute_factors`` never records: a missing or unknown key, a value it does
          not accept (``fisher="bogus"``, ``mc_samples=0``, a loss without a registered
          likelihood, ...; see :func:`~kronfac.factors.options.check_recorded_options`).
          ``rank``, ``rank_threshold`` and ``oversample`` may be missing (older files);
        - tensors other than the metadata implies, or of the wrong shapes;
        - tensors that are not float32 or float64 (float16, bfloat16, integer, bool, complex),
          and a module whose tensors do not share one dtype;
        - NaN or Inf in any tensor;
        - a dense factor ``A`` / ``S`` (each group of a ``[g, d, d]`` one) that is not
          symmetric to ``√ε`` of its largest entry (``ε`` of its dtype: GEMM round-off leaves
          a few ``ε``), or with a negative diagonal entry;
        - negative entries of a diagonal ``A``, of a low-rank factor's eigenvalues or shift,
          or of EKFAC's corrected eigenvalues and complements.

        Raises:
            FileNotFoundError: If there is no file at ``path``.
            FactorFileError: If the file is refused; the message names the offending tensor
                (``"<module>/A"``) or metadata key.
        """
        path = Path(path)
        tensors, metadata = _read(path, device)
        try:
            return cls(**_parse(tensors, metadata))
        except FactorFileError as e:
            raise FactorFileError(f"{path}: {e}") from e.__cause__


# -- reading and checking a factor file ---------------------------------------------------------

_FILE_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_LOWRANK_PARTS = ("U", "eigenvalues", "shift")

_Factor = Tensor | LowRankFactor


class _Header(NamedTuple):
    """A factor file's checked metadata."""

    options: dict[str, Any]
    num_data: int
    num_per_example_loss_terms: int
    modules: dict[str, ParamNames]
    corrections: bool
    lowrank: dict[str, list[str]]


def _read(path: Path, device: str | torch.device) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and header metadata of the safetensors file at ``path``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except FileNotFoundError as e:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)) from e
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise FactorFileError(f"{path}: not a readable safetensors file ({e}).") from e


def _parse(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, Any]:
    """Check a file's tensors and metadata; the keyword arguments of :class:`KroneckerFactors`.

    Raises:
        FactorFileError: For everything :meth:`KroneckerFactors.load` refuses (without the
            path, which the caller adds).
    """
    header = _parse_header(metadata)
    names = _tensor_names(header, tensors)
    expected = {n for module_names in names.values() for n in module_names}
    if set(tensors) != expected:
        raise FactorFileError(
            f"tensors {sorted(set(tensors) ^ expected)} disagree with the metadata."
        )
    factors, corrections = {}, {}
    for m, module_names in names.items():
        _check_module_tensors({n: tensors[n] for n in module_names})
        low = header.lowrank.get(m, [])
        A, S = (_factor(m, side, tensors, side in low) for side in "AS")
        if _lead(A) != _lead(S):
            raise FactorFileError(f"grouped factors of {m} disagree: A{_shape(A)}, S{_shape(S)}.")
        factors[m] = FactorPair(A, S)
        if header.corrections:
            corrections[m] = _correction(m, A, S, tensors)
    return {
        "factors": factors,
        "param_names": header.modules,
        "options": header.options,
        "num_data": header.num_data,
        "num_per_example_loss_terms": header.num_per_example_loss_terms,
        "corrections": corrections if header.corrections else None,
    }


def _parse_header(metadata: Mapping[str, str]) -> _Header:
    """The checked kronfac metadata document (format, counts, modules, options)."""
    try:
        doc = json.loads(metadata["kronfac"])
        if not isinstance(doc, dict):
            raise TypeError("the metadata is not a JSON object")
        if doc.get("format") != _FORMAT or doc.get("version") != _FORMAT_VERSION:
            raise FactorFileError(
                f"expected format {_FORMAT!r} version {_FORMAT_VERSION!r}, "
                f"got {doc.get('format')!r} version {doc.get('version')!r}."
            )
        options, num_data = doc["options"], doc["num_data"]
        terms, raw_modules = doc["num_per_example_loss_terms"], doc["modules"]
        if not isinstance(options, dict) or not isinstance(raw_modules, dict):
            raise TypeError("options and modules must be JSON objects")
        for key, value in (("num_data", num_data), ("num_per_example_loss_terms", terms)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TypeError(f"{key} must be a positive integer, got {value!r}")
        modules = {name: _param_names(name, names) for name, names in raw_modules.items()}
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise FactorFileError(f"missing or malformed kronfac metadata ({e}).") from e
    try:
        check_recorded_options(options)
    except ValueError as e:
        raise FactorFileError(f"metadata {e}.") from None
    corrections = doc.get("corrections", False)
    if not isinstance(corrections, bool):
        raise FactorFileError("metadata 'corrections' must be true or false.")
    lowrank = doc.get("lowrank", {})
    if not isinstance(lowrank, dict) or not all(
        isinstance(v, list) and set(v) <= {"A", "S"} for v in lowrank.values()
    ):
        raise FactorFileError("metadata 'lowrank' must map modules to ['A', 'S'].")
    return _Header(options, num_data, terms, modules, corrections, lowrank)


def _param_names(module: str, names: Any) -> ParamNames:
    """A module's ``[weight name, bias name or null]`` from the metadata."""
    if (
        not isinstance(names, list)
        or len(names) != 2
        or not isinstance(names[0], str)
        or not (names[1] is None or isinstance(names[1], str))
    ):
        raise TypeError(f"module {module!r}: expected [weight name, bias name or null]")
    return ParamNames(*names)


def _tensor_names(header: _Header, tensors: Mapping[str, Tensor]) -> dict[str, list[str]]:
    """Module → the names of its tensors in a file with ``header``.

    A diagonal ``A`` (embeddings) has no EKFAC ``Q_A``: ``A``'s shape in ``tensors`` decides.
    """
    names = {}
    for m, params in header.modules.items():
        low = header.lowrank.get(m, [])
        module_names = [
            f"{m}/{side}{suffix}"
            for side in "AS"
            for suffix in ([f".{p}" for p in _LOWRANK_PARTS] if side in low else [""])
        ]
        if header.corrections:
            A = tensors.get(f"{m}/A")
            fields = ["Q_S", "eigenvalues"]
            if A is None or A.ndim != 1:
                fields.insert(0, "Q_A")
            separate_bias = header.options["bias"] == "separate" and params.bias is not None
            if separate_bias:
                fields.append("bias_eigenvalues")
            if low:
                fields.append("complement")
                if separate_bias and "S" in low:
                    fields.append("bias_complement")
            module_names += [f"{m}/{f}" for f in fields]
        names[m] = module_names
    return names


def _check_module_tensors(tensors: Mapping[str, Tensor]) -> None:
    """One module's tensors: float32 or float64, all of one dtype, and finite."""
    first, reference = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.dtype not in _FILE_DTYPES:
            raise FactorFileError(
                f"tensor {name} has dtype {t.dtype}: kronfac writes float32 or float64 only."
            )
        if t.dtype != reference.dtype:
            raise FactorFileError(
                f"tensor {name} has dtype {t.dtype}, {first} {reference.dtype}: the tensors "
                "of one module share one dtype."
            )
        if not bool(torch.isfinite(t).all()):
            raise FactorFileError(f"tensor {name} holds NaN or Inf.")


def _check_nonnegative(name: str, t: Tensor, what: str = "entries") -> None:
    if bool((t < 0).any()):
        raise FactorFileError(
            f"tensor {name}: {what} must be non-negative, the smallest is {float(t.min()):.3g}."
        )


def _check_symmetric(name: str, F: Tensor) -> None:
    """A dense factor (each group): symmetric to ``√ε`` of its largest entry, diagonal >= 0.

    The factors are Gram matrices from GEMMs, whose two triangles may differ by round-off (a
    few ``ε`` of the largest entry); a matrix that is not a Gram matrix differs by ``O(1)``.
    """
    if F.numel() == 0:
        return
    tol = torch.finfo(F.dtype).eps ** 0.5
    asym = (F - F.mT).abs_().amax(dim=(-2, -1))
    low, high = torch.aminmax(F.flatten(-2), dim=-1)
    scale = torch.maximum(high, -low)
    if bool((asym > tol * scale).any()):
        rel = float((asym / scale.clamp(min=torch.finfo(F.dtype).tiny)).max())
        raise FactorFileError(
            f"factor {name} is not symmetric: max |F - Fᵀ| is {rel:.2g} of its largest entry "
            f"(tolerance {tol:.1g} for {F.dtype})."
        )
    _check_nonnegative(name, F.diagonal(dim1=-2, dim2=-1), "diagonal entries")


def _factor(module: str, side: str, tensors: Mapping[str, Tensor], lowrank: bool) -> _Factor:
    """``A`` or ``S`` of ``module``: dense (grouped), diagonal (``A`` only) or low-rank."""
    name = f"{module}/{side}"
    if lowrank:
        U, lam, shift = (tensors[f"{name}.{part}"] for part in _LOWRANK_PARTS)
        if U.ndim not in (2, 3) or lam.shape != (*U.shape[:-2], U.shape[-1]) or shift.ndim:
            raise FactorFileError(
                f"low-rank factor {name} must be U [(groups,) side, k], eigenvalues "
                f"[(groups,) k] and a scalar shift, got {tuple(U.shape)}, {tuple(lam.shape)}, "
                f"{tuple(shift.shape)}."
            )
        _check_nonnegative(f"{name}.eigenvalues", lam)
        _check_nonnegative(f"{name}.shift", shift)
        return LowRankFactor(U, lam, float(shift))
    F = tensors[name]
    if side == "A" and F.ndim == 1:
        _check_nonnegative(name, F)
    elif F.ndim in (2, 3) and F.shape[-1] == F.shape[-2]:
        _check_symmetric(name, F)
    else:
        raise FactorFileError(
            f"factor {name} must be a square matrix [d, d] or [groups, d, d]"
            f"{' (or a diagonal vector [d])' if side == 'A' else ''}, "
            f"got shape {tuple(F.shape)}."
        )
    return F


def _lead(F: _Factor) -> tuple[int, ...]:
    """The group dimension of a grouped factor, ``()`` otherwise."""
    return tuple((F.U if isinstance(F, LowRankFactor) else F).shape[:-2])


def _shape(F: _Factor) -> tuple[int, ...]:
    return (*_lead(F), F.side, F.side) if isinstance(F, LowRankFactor) else tuple(F.shape)


def _correction(
    module: str, A: _Factor, S: _Factor, tensors: Mapping[str, Tensor]
) -> EigenCorrection:
    """EKFAC's eigenbases, corrected eigenvalues and complements of ``module``, checked."""

    def side_and_rank(F: _Factor) -> tuple[int, int]:
        if isinstance(F, LowRankFactor):
            return F.side, F.U.shape[-1]
        return F.shape[-1], F.shape[-1]

    lead = _lead(S)
    (p, kS), (q, kA) = side_and_rank(S), side_and_rank(A)
    shapes = {
        "Q_A": (*lead, q, kA),
        "Q_S": (*lead, p, kS),
        "eigenvalues": (*lead, kS, kA),
        "bias_eigenvalues": (*lead, kS),
        "complement": (),
        "bias_complement": (),
    }
    fields = {f: tensors[k] for f in EigenCorrection._fields if (k := f"{module}/{f}") in tensors}
    for f, t in fields.items():
        if tuple(t.shape) != shapes[f]:
            raise FactorFileError(
                f"{module}/{f} must have shape {shapes[f]}, got {tuple(t.shape)}."
            )
        if f not in ("Q_A", "Q_S"):
            _check_nonnegative(f"{module}/{f}", t)
    get = fields.get  # Q_S and the eigenvalues are there: _parse checked the file's tensors
    return EigenCorrection(
        get("Q_A"),
        fields["Q_S"],
        fields["eigenvalues"],
        get("bias_eigenvalues"),
        get("complement"),
        get("bias_complement"),
    )
