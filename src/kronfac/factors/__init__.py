"""The factor engine: hooks, the data loop, accumulation, and the factor container."""

from kronfac.factors.container import (
    EigenCorrection,
    FactorFileError,
    FactorPair,
    KroneckerFactors,
    ParamNames,
)
from kronfac.factors.data_pass import FISHER_TYPES, select_modules
from kronfac.factors.engine import compute_factors

__all__ = [
    "FISHER_TYPES",
    "EigenCorrection",
    "FactorFileError",
    "FactorPair",
    "KroneckerFactors",
    "ParamNames",
    "compute_factors",
    "select_modules",
]
