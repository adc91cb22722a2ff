"""kronfac: Kronecker-factored curvature (K-FAC, EKFAC) for any PyTorch model."""

from kronfac.errors import NonFiniteError, UncoveredParameterWarning
from kronfac.factors import (
    FactorFileError,
    FactorPair,
    KroneckerFactors,
    ParamNames,
    compute_factors,
)
from kronfac.operators import KFAC

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "FactorFileError",
    "FactorPair",
    "KroneckerFactors",
    "NonFiniteError",
    "ParamNames",
    "UncoveredParameterWarning",
    "__version__",
    "compute_factors",
]
