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

__all__ = ["FactorFileError", "FactorPair", "KroneckerFactors", "ParamNames"]

_FORMAT = "kronfac.factors"
_FORMAT_VERSION = 1


class FactorFileError(ValueError):
    """A factor file is unreadable, not a kronfac factor file, or inconsistent."""


class FactorPair(NamedTuple):
    """The two Kronecker factors of one module: ``G ≈ S ⊗ A``.

    Attributes:
        A: Input factor ``[d_in(+1), d_in(+1)]`` (``+1``: the bias column with ``bias="joint"``).
        S: Output-gradient factor ``[d_out, d_out]``.
    """

    A: Tensor
    S: Tensor


class ParamNames(NamedTuple):
    """Names (as in ``model.named_parameters()``) of the parameters one module's block covers.

    Attributes:
        weight: The weight's name.
        bias: The bias's name, or ``None`` when the module has no trainable bias.
    """

    weight: str
    bias: str | None


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
    """

    def __init__(
        self,
        factors: Mapping[str, FactorPair],
        *,
        param_names: Mapping[str, ParamNames],
        options: Mapping[str, Any],
        num_data: int,
        num_per_example_loss_terms: int,
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

    def __getitem__(self, name: str) -> FactorPair:
        return self._factors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)

    def __repr__(self) -> str:
        body = ", ".join(
            f"{k}: A{tuple(v.A.shape)} S{tuple(v.S.shape)}" for k, v in self._factors.items()
        )
        return f"KroneckerFactors({body}; num_data={self.num_data}, options={self.options})"

    def _replace_factors(self, factors: Mapping[str, FactorPair]) -> KroneckerFactors:
        return KroneckerFactors(
            factors,
            param_names=self.param_names,
            options=self.options,
            num_data=self.num_data,
            num_per_example_loss_terms=self.num_per_example_loss_terms,
        )

    def to(self, *args: Any, **kwargs: Any) -> KroneckerFactors:
        """A copy with every factor moved / cast by ``Tensor.to(*args, **kwargs)``."""
        return self._replace_factors(
            {
                k: FactorPair(v.A.to(*args, **kwargs), v.S.to(*args, **kwargs))
                for k, v in self.items()
            }
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
        }
        return {"kronfac": json.dumps(doc)}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the factors and their metadata to a safetensors file at ``path``.

        The file is written to a temporary name in the same folder and renamed into place, so
        ``path`` is never left half-written.
        """
        from safetensors.torch import save_file

        tensors = {}
        for name, (A, S) in self.items():
            tensors[f"{name}/A"] = A.detach().cpu().contiguous()
            tensors[f"{name}/S"] = S.detach().cpu().contiguous()
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
        expected = {f"{m}/{side}" for m in modules for side in ("A", "S")}
        if set(tensors) != expected:
            raise FactorFileError(
                f"{path}: tensors {sorted(set(tensors) ^ expected)} disagree with the metadata."
            )
        factors = {}
        for m in modules:
            A, S = tensors[f"{m}/A"], tensors[f"{m}/S"]
            for side, t in (("A", A), ("S", S)):
                if t.ndim != 2 or t.shape[0] != t.shape[1] or not t.is_floating_point():
                    raise FactorFileError(
                        f"{path}: factor {m}/{side} must be a square floating-point matrix, "
                        f"got shape {tuple(t.shape)} and dtype {t.dtype}."
                    )
            factors[m] = FactorPair(A, S)
        return cls(
            factors,
            param_names=modules,
            options=options,
            num_data=num_data,
            num_per_example_loss_terms=terms,
        )
