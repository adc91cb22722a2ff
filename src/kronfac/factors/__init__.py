"""The factor engine: hooks, the data loop, accumulation, and the factor container."""

from kronfac.factors.container import (
    EigenCorrection,
    FactorFileError,
    FactorPair,
    KroneckerFactors,
    ParamNames,
)
from kronfac.factors.engine import compute_factors
from kronfac.factors.options import FISHER_TYPES, FactorOptions
from kronfac.factors.selection import select_modules

__all__ = [
    "FISHER_TYPES",
    "EigenCorrection",
    "FactorFileError",
    "FactorOptions",
    "FactorPair",
    "KroneckerFactors",
    "ParamNames",
    "compute_factors",
    "select_modules",
]
