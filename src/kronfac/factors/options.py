"""The values the engine's options take, shared by the pass, the factor file and the CLI."""

from __future__ import annotations

__all__ = ["BIAS_MODES", "FISHER_TYPES", "KFAC_APPROXES", "REDUCTIONS"]

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
KFAC_APPROXES = ("expand", "reduce")
BIAS_MODES = ("joint", "separate")
REDUCTIONS = ("mean", "sum")
