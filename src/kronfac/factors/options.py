"""The engine's options: one validated object, and the values the factor file records.

:class:`FactorOptions` holds every option of :func:`kronfac.compute_factors` (also taken by
``KFAC``, ``EKFAC``, the compatibility layer and the optimizer), checked once when it is made,
with one set of error messages. :func:`check_recorded_options` checks the subset a factor file
records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BIAS_MODES",
    "FISHER_TYPES",
    "KFAC_APPROXES",
    "REDUCTIONS",
    "BatchSizeFn",
    "FactorOptions",
    "ForwardFn",
    "check_recorded_options",
    "name_patterns",
]

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
KFAC_APPROXES = ("expand", "reduce")
BIAS_MODES = ("joint", "separate")
REDUCTIONS = ("mean", "sum")

ForwardFn = Callable[[nn.Module, Any], Tensor]
BatchSizeFn = Callable[[Any], int]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name} {value!r}. Supported: {', '.join(choices)}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_process_group(value: Any) -> bool:
    dist = torch.distributed
    return dist.is_available() and isinstance(value, dist.ProcessGroup)


def name_patterns(option: str, value: Iterable[str] | str | None) -> tuple[str, ...] | None:
    """``modules`` / ``exclude`` as a tuple of name substrings (a single string counts as one)."""
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{option} must be a list of name substrings, got {list(patterns)!r}.")
    return patterns


@dataclass(frozen=True)
class FactorOptions:
    """The options of :func:`kronfac.compute_factors` (documented there), validated once.

    Build it with the keyword arguments of ``compute_factors`` (``FactorOptions(fisher="mc")``)
    or :meth:`of` from a mapping; an invalid value raises at construction. ``modules`` and
    ``exclude`` are kept as tuples of name substrings.

    Raises:
        ValueError: An unknown choice (``fisher``, ``approx``, ``bias``), a count that is not a
            positive integer, ``mc_samples != 1`` without ``fisher="mc"``, or a negative
            ``oversample``.
        TypeError: ``modules`` / ``exclude`` that are not name substrings, or ``forward`` /
            ``batch_size_fn`` that are not callable.
    """

    fisher: str = "mc"
    mc_samples: int = 1
    approx: str = "expand"
    modules: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    bias: str = "joint"
    forward: ForwardFn | None = None
    num_data: int | None = None
    num_per_example_loss_terms: int | None = None
    seed: int = 2147483647
    progress: bool = False
    strict: bool = False
    rank: int | None = None
    rank_threshold: int = 512
    oversample: int | None = None
    batch_size_fn: BatchSizeFn | None = None
    process_group: Any = None

    def __post_init__(self) -> None:
        _check_choice("fisher", self.fisher, FISHER_TYPES)
        _check_choice("approx", self.approx, KFAC_APPROXES)
        _check_choice("bias", self.bias, BIAS_MODES)
        if not _is_int(self.mc_samples) or self.mc_samples < 1:
            raise ValueError(f"mc_samples must be an integer >= 1, got {self.mc_samples!r}.")
        if self.fisher != "mc" and self.mc_samples != 1:
            raise ValueError(
                f"mc_samples={self.mc_samples} requires fisher='mc', got fisher={self.fisher!r}."
            )
        for name in ("num_data", "num_per_example_loss_terms", "rank"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if not _is_int(self.rank_threshold) or self.rank_threshold < 1:
            raise ValueError(
                f"rank_threshold must be a positive integer, got {self.rank_threshold!r}."
            )
        if self.oversample is not None and (not _is_int(self.oversample) or self.oversample < 0):
            raise ValueError(
                f"oversample must be a non-negative integer or None, got {self.oversample!r}."
            )
        self._check_types()
        object.__setattr__(self, "modules", name_patterns("modules", self.modules))
        object.__setattr__(self, "exclude", name_patterns("exclude", self.exclude))

    def _check_types(self) -> None:
        """The callables and the process group."""
        for name in ("forward", "batch_size_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be a callable, got {type(value).__name__}.")
        if self.process_group is not None and not _is_process_group(self.process_group):
            raise TypeError(
                "process_group must be a torch.distributed.ProcessGroup or None (the default "
                f"group when initialised), got {type(self.process_group).__name__}."
            )

    @classmethod
    def of(
        cls, options: FactorOptions | Mapping[str, Any] | None = None, **kwargs: Any
    ) -> FactorOptions:
        """Options from an instance, a mapping and / or keyword arguments (later ones win).

        Raises:
            TypeError: For a name that is not an option, listing the options.
        """
        merged: dict[str, Any] = {}
        if isinstance(options, FactorOptions):  # (not asdict: it deep-copies `forward`)
            merged = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        if isinstance(options, Mapping):
            merged.update(options)
        merged.update(kwargs)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise TypeError(
                f"Unknown option(s) {', '.join(unknown)}. Options: {', '.join(sorted(names))}."
            )
        return cls(**merged)

    @property
    def select_all(self) -> bool:
        """Whether every supported module is selected (``modules=None``)."""
        return self.modules is None

    def recorded(self, loss_fn: nn.Module, reduction: str) -> dict[str, Any]:
        """The options a :class:`~kronfac.KroneckerFactors` records (its file's metadata)."""
        return {
            "fisher": self.fisher,
            "mc_samples": self.mc_samples,
            "approx": self.approx,
            "bias": self.bias,
            "seed": self.seed,
            "rank": self.rank,
            "rank_threshold": self.rank_threshold,
            "oversample": self.oversample,
            "loss": type(loss_fn).__name__,
            "reduction": reduction,
        }


# Options recorded since the first factor file; the later ones (``rank``, ``rank_threshold``,
# ``oversample``) are missing from files written before they existed.
_ALWAYS_RECORDED = ("fisher", "mc_samples", "approx", "bias", "seed", "loss", "reduction")

# A rule returns ``None`` for a valid value, else what the value must be.
_Rule = Callable[[Any], str | None]


def _integer(low: int | None, allow_none: bool = False) -> _Rule:
    what = "an integer" if low is None else f"an integer >= {low}"

    def rule(value: Any) -> str | None:
        if value is None and allow_none:
            return None
        valid = isinstance(value, int) and not isinstance(value, bool)
        if valid and (low is None or value >= low):
            return None
        return f"{what} or null" if allow_none else what

    return rule


def _one_of(choices: Callable[[], tuple[str, ...]]) -> _Rule:
    def rule(value: Any) -> str | None:
        allowed = choices()  # at check time: likelihoods may be registered later
        if isinstance(value, str) and value in allowed:
            return None
        return f"one of {', '.join(map(repr, allowed))}"

    return rule


def _supported_losses() -> tuple[str, ...]:
    from kronfac.likelihoods import supported_losses

    return supported_losses()


_RULES: dict[str, _Rule] = {
    "fisher": _one_of(lambda: FISHER_TYPES),
    "mc_samples": _integer(1),
    "approx": _one_of(lambda: KFAC_APPROXES),
    "bias": _one_of(lambda: BIAS_MODES),
    "seed": _integer(None),
    "loss": _one_of(_supported_losses),
    "reduction": _one_of(lambda: REDUCTIONS),
    "rank": _integer(1, allow_none=True),
    "rank_threshold": _integer(1),
    "oversample": _integer(0, allow_none=True),
}


def check_recorded_options(options: Mapping[str, Any]) -> None:
    """Check options as :func:`kronfac.compute_factors` records them (a factor file's).

    Every recorded key must be present (``rank``, ``rank_threshold`` and ``oversample`` may be
    missing: files written before they existed lack them), no other key may be, and each value
    must be one ``compute_factors`` accepts: ``fisher``, ``approx``, ``bias`` and ``reduction``
    one of their values, ``loss`` the class name of a loss with a registered likelihood,
    ``mc_samples >= 1`` (1 unless ``fisher="mc"``), an integer ``seed``, ``rank`` null or
    ``>= 1``, ``rank_threshold >= 1``, ``oversample`` null or ``>= 0``.

    Raises:
        ValueError: Naming the first offending key.
    """
    missing = [key for key in _ALWAYS_RECORDED if key not in options]
    if missing:
        raise ValueError(f"option(s) {', '.join(map(repr, missing))} missing")
    unknown = [key for key in options if key not in _RULES]
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} (kronfac records "
            f"{', '.join(_RULES)})"
        )
    for key, value in options.items():
        requirement = _RULES[key](value)
        if requirement is not None:
            hint = " (register its likelihood first)" if key == "loss" else ""
            raise ValueError(f"option {key!r} must be {requirement}, got {value!r}{hint}")
    if options["mc_samples"] != 1 and options["fisher"] != "mc":
        raise ValueError(
            f"option 'mc_samples' must be 1 unless fisher='mc', got {options['mc_samples']!r} "
            f"with fisher={options['fisher']!r}"
        )
