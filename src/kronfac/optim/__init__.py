"""Natural-gradient training with K-FAC / EKFAC: a gradient preconditioner and an optimizer."""

from kronfac.optim.kfac import KFAC
from kronfac.optim.preconditioner import KFACPreconditioner

__all__ = ["KFAC", "KFACPreconditioner"]
