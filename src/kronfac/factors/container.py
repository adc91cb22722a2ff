"""``KroneckerFactors``: the result of :func:`kronfac.compute_factors` and its file format.

Files are safetensors: two tensors per module (``"<module>/A"``, ``"<module>/S"``) and a JSON
document in the header metadata with the options, ``num_data``, the number of loss terms per
data point and the parameter names of every block. Nothing is ever unpickled, a file is written
to a temporary name and moved into place (never half-written), and a file that is truncated, not
safetensors, or inconsistent raises :class:`FactorFileError`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kronfac.linalg import LowRankFactor

__all__ = ["EigenCorrection", "FactorFileError", "FactorPair", "KroneckerFactors", "ParamNames"]

_FORMAT = "kronfac.factors"
_FORMAT_VERSION = 1


class FactorFileError(ValueError):
    """A factor file is unreadable, not a kronfac factor file, or inconsistent."""


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
            ``approx``, ``bias``, ``seed``, ``loss``, ``reduction``).
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

        return KroneckerFactors(
            {k: FactorPair(*map(move, v)) for k, v in self.items()},
            param_names=self.param_names,
            options=self.options,
            num_data=self.num_data,
            num_per_example_loss_terms=self.num_per_example_loss_terms,
            corrections=None
            if self.corrections is None
            else {k: EigenCorrection(*map(move, v)) for k, v in self.corrections.items()},
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

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the factors and their metadata to a safetensors file at ``path``.

        The file is written to a temporary name in the same folder and renamed into place, so
        ``path`` is never left half-written.
        """
        from safetensors.torch import save_file

        tensors = {}
        for name, pair in self.items():
            for side, t in zip("AS", pair, strict=True):
                if isinstance(t, LowRankFactor):
                    tensors[f"{name}/{side}.U"] = t.U.detach().cpu().contiguous()
                    tensors[f"{name}/{side}.eigenvalues"] = (
                        t.eigenvalues.detach().cpu().contiguous()
                    )
                    shift = torch.tensor(float(t.shift), dtype=t.U.dtype)
                    tensors[f"{name}/{side}.shift"] = shift
                else:
                    tensors[f"{name}/{side}"] = t.detach().cpu().contiguous()
        for name, corr in (self.corrections or {}).items():
            for field, t in corr._asdict().items():
                if t is not None:
                    tensors[f"{name}/{field}"] = t.detach().cpu().contiguous()
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=self._metadata())
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

        Raises:
            FactorFileError: If the file is missing, truncated, not safetensors, not a kronfac
                factor file, or its tensors disagree with its metadata.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise FactorFileError(f"{path}: not a readable safetensors file ({e}).") from e
        try:
            doc = json.loads(meta["kronfac"])
            if not isinstance(doc, dict):
                raise TypeError("the metadata is not a JSON object")
            if doc.get("format") != _FORMAT or doc.get("version") != _FORMAT_VERSION:
                raise FactorFileError(
                    f"{path}: expected format {_FORMAT!r} version {_FORMAT_VERSION!r}, "
                    f"got {doc.get('format')!r} version {doc.get('version')!r}."
                )
            options, num_data = doc["options"], doc["num_data"]
            terms, raw_modules = doc["num_per_example_loss_terms"], doc["modules"]
            if not isinstance(options, dict) or not isinstance(raw_modules, dict):
                raise TypeError("options and modules must be JSON objects")
            for key, value in (("num_data", num_data), ("num_per_example_loss_terms", terms)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise TypeError(f"{key} must be a positive integer, got {value!r}")
            modules = {}
            for name, names in raw_modules.items():
                if (
                    not isinstance(names, list)
                    or len(names) != 2
                    or not isinstance(names[0], str)
                    or not (names[1] is None or isinstance(names[1], str))
                ):
                    raise TypeError(f"module {name!r}: expected [weight name, bias name or null]")
                modules[name] = ParamNames(*names)
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise FactorFileError(f"{path}: missing or malformed kronfac metadata ({e}).") from e
        has_corrections = doc.get("corrections", False)
        if not isinstance(has_corrections, bool):
            raise FactorFileError(f"{path}: metadata 'corrections' must be true or false.")
        lowrank = doc.get("lowrank", {})
        if not isinstance(lowrank, dict) or not all(
            isinstance(v, list) and set(v) <= {"A", "S"} for v in lowrank.values()
        ):
            raise FactorFileError(f"{path}: metadata 'lowrank' must map modules to ['A', 'S'].")
        base = {
            f"{m}/{side}{suffix}"
            for m in modules
            for side in "AS"
            for suffix in (
                (".U", ".eigenvalues", ".shift") if side in lowrank.get(m, []) else ("",)
            )
        }
        fields: dict[str, list[str]] = {m: [] for m in modules}
        if has_corrections:
            for m, names in modules.items():
                A = tensors.get(f"{m}/A")
                diagonal_A = A is not None and A.ndim == 1
                fields[m] += ["Q_S", "eigenvalues"] if diagonal_A else ["Q_A", "Q_S", "eigenvalues"]
                separate_bias = options.get("bias") == "separate" and names.bias is not None
                if separate_bias:
                    fields[m].append("bias_eigenvalues")
                if lowrank.get(m):
                    fields[m].append("complement")
                    if separate_bias and "S" in lowrank[m]:
                        fields[m].append("bias_complement")
        expected = base | {f"{m}/{f}" for m, fs in fields.items() for f in fs}
        if set(tensors) != expected:
            raise FactorFileError(
                f"{path}: tensors {sorted(set(tensors) ^ expected)} disagree with the metadata."
            )
        factors, corrections = {}, {}
        for m in modules:
            pair = []
            for side in "AS":
                if side not in lowrank.get(m, []):
                    pair.append(tensors[f"{m}/{side}"])
                    continue
                U, lam = tensors[f"{m}/{side}.U"], tensors[f"{m}/{side}.eigenvalues"]
                shift = tensors[f"{m}/{side}.shift"]
                if U.ndim != 2 or lam.shape != (U.shape[1],) or shift.ndim != 0:
                    raise FactorFileError(
                        f"{path}: low-rank factor {m}/{side} must be U [side, k], eigenvalues "
                        f"[k] and a scalar shift, got {tuple(U.shape)}, {tuple(lam.shape)}, "
                        f"{tuple(shift.shape)}."
                    )
                pair.append(LowRankFactor(U, lam, float(shift)))
            A, S = pair
            for side, t in (("A", A), ("S", S)):
                if isinstance(t, LowRankFactor):
                    continue
                square = t.ndim in (2, 3) and t.shape[-1] == t.shape[-2]  # [g, d, d]: groups
                diagonal = side == "A" and t.ndim == 1
                if not (square or diagonal) or not t.is_floating_point():
                    raise FactorFileError(
                        f"{path}: factor {m}/{side} must be a square floating-point matrix"
                        f"{' (or a diagonal vector)' if side == 'A' else ''}, "
                        f"got shape {tuple(t.shape)} and dtype {t.dtype}."
                    )
            if (
                not isinstance(A, LowRankFactor)
                and A.ndim == 3
                and (isinstance(S, LowRankFactor) or S.ndim != 3 or S.shape[0] != A.shape[0])
            ):
                raise FactorFileError(
                    f"{path}: grouped factors of {m} disagree: "
                    f"A{tuple(A.shape)}, S{tuple(S.shape)}."
                )
            factors[m] = FactorPair(A, S)
            if has_corrections:
                if isinstance(A, LowRankFactor) or isinstance(S, LowRankFactor):
                    lead = ()
                    p = S.side if isinstance(S, LowRankFactor) else S.shape[-1]
                    q = A.side if isinstance(A, LowRankFactor) else A.shape[-1]
                else:
                    lead, p, q = tuple(S.shape[:-2]), S.shape[-1], A.shape[-1]
                kS = S.U.shape[1] if isinstance(S, LowRankFactor) else p
                kA = A.U.shape[1] if isinstance(A, LowRankFactor) else q
                shapes = {
                    "Q_A": (*lead, q, kA),
                    "Q_S": (*lead, p, kS),
                    "eigenvalues": (*lead, kS, kA),
                    "bias_eigenvalues": (*lead, kS),
                    "complement": (),
                    "bias_complement": (),
                }
                for f in fields[m]:
                    t = tensors[f"{m}/{f}"]
                    if tuple(t.shape) != shapes[f] or not t.is_floating_point():
                        raise FactorFileError(
                            f"{path}: {m}/{f} must be a floating-point tensor of shape "
                            f"{shapes[f]}, got {tuple(t.shape)} and dtype {t.dtype}."
                        )
                corrections[m] = EigenCorrection(
                    *(tensors.get(f"{m}/{f}") for f in EigenCorrection._fields)
                )
        return cls(
            factors,
            param_names=modules,
            options=options,
            num_data=num_data,
            num_per_example_loss_terms=terms,
            corrections=corrections if has_corrections else None,
        )
