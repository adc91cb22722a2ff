"""Exceptions and warnings raised by kronfac.

Every error is a subclass of a built-in exception (``ValueError``, ``TypeError``,
``NotImplementedError``) so callers can catch either the precise kronfac type or the
built-in one.
"""

from __future__ import annotations

__all__ = ["NonFiniteError", "NotPSDError", "UncoveredParameterWarning"]


class NonFiniteError(ValueError):
    """A Kronecker factor, activation or output gradient contained NaN or Inf.

    The message names the module and the batch in which the non-finite value appeared.
    """


class UncoveredParameterWarning(UserWarning):
    """Trainable parameters that no Kronecker block covers (they are left out of the curvature)."""


class NotPSDError(ValueError):
    """A Kronecker factor (or eigenvalue) is not positive (semi-)definite where it must be.

    Raised after a float64 retry, with the module's name in the message.
    """
