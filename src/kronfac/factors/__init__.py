"""The factor engine: hooks, the data loop, accumulation, and the factor container."""

from kronfac.factors.container import FactorFileError, FactorPair, KroneckerFactors, ParamNames
from kronfac.factors.engine import compute_factors, select_modules

__all__ = [
    "FactorFileError",
    "FactorPair",
    "KroneckerFactors",
    "ParamNames",
    "compute_factors",
    "select_modules",
]
