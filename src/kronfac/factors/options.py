"""The values the engine's options take, shared by the pass, the factor file and the CLI."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "BIAS_MODES",
    "FISHER_TYPES",
    "KFAC_APPROXES",
    "REDUCTIONS",
    "check_recorded_options",
]

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
KFAC_APPROXES = ("expand", "reduce")
BIAS_MODES = ("joint", "separate")
REDUCTIONS = ("mean", "sum")

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
