"""Exceptions and warnings raised by kronfac.

Every error is a subclass of a built-in exception (``ValueError``, ``TypeError``,
``NotImplementedError``) so callers can catch either the precise kronfac type or the
built-in one.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = [
    "FactorFileError",
    "NonFiniteError",
    "NotPSDError",
    "UncoveredParameterWarning",
    "warn",
]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class NonFiniteError(ValueError):
    """A Kronecker factor, activation or output gradient contained NaN or Inf.

    The message names the module and the batch in which the non-finite value appeared.
    """


class FactorFileError(ValueError):
    """A factor file is unreadable, not a kronfac factor file, or holds what kronfac never writes.

    The message names the file and the offending tensor or metadata key.
    """


class UncoveredParameterWarning(UserWarning):
    """Trainable parameters that no Kronecker block covers (they are left out of the curvature)."""


class NotPSDError(ValueError):
    """A Kronecker factor (or eigenvalue) is not positive (semi-)definite where it must be.

    Raised after a float64 retry, with the module's name in the message.
    """


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside kronfac (the user's line).

    Every public entry point reaches its warnings through a different depth of kronfac calls;
    skipping kronfac's own frames gives each the user's call site.
    """
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
