"""Laplace approximations with K-FAC / EKFAC posterior precisions (:class:`Laplace`)."""

from kronfac.laplace.posterior import Laplace

__all__ = ["Laplace"]
