"""Likelihoods: one file per supported loss, registered by loss type."""

from kronfac.likelihoods import bernoulli, categorical, gaussian  # noqa: F401  (registration)
from kronfac.likelihoods.base import (
    Likelihood,
    get_likelihood,
    register_likelihood,
    supported_losses,
    unregister_likelihood,
)

__all__ = [
    "Likelihood",
    "get_likelihood",
    "register_likelihood",
    "supported_losses",
    "unregister_likelihood",
]
