"""Influence functions with K-FAC / EKFAC curvature: :class:`Influence`."""

from kronfac.influence.influence import Influence

__all__ = ["Influence"]
