"""kronfac: Kronecker-factored curvature (K-FAC, EKFAC) for any PyTorch model."""

from kronfac.errors import NonFiniteError, NotPSDError, UncoveredParameterWarning
from kronfac.factors import (
    EigenCorrection,
    FactorFileError,
    FactorPair,
    KroneckerFactors,
    ParamNames,
    compute_factors,
)
from kronfac.influence import Influence
from kronfac.laplace import Laplace
from kronfac.linalg import LowRankFactor
from kronfac.operators import EKFAC, KFAC, CurvatureOperator

__version__ = "0.1.0"

__all__ = [
    "EKFAC",
    "KFAC",
    "CurvatureOperator",
    "EigenCorrection",
    "FactorFileError",
    "FactorPair",
    "Influence",
    "KroneckerFactors",
    "Laplace",
    "LowRankFactor",
    "NonFiniteError",
    "NotPSDError",
    "ParamNames",
    "UncoveredParameterWarning",
    "__version__",
    "compute_factors",
]
