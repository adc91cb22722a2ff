"""A registry of implementation classes by key: the layer adapters' and the likelihoods'.

:mod:`kronfac.layers` keys adapters by module type (or a qualified name); :mod:`kronfac.likelihoods`
keys likelihoods by loss type. Both register with a class decorator, refuse a second class for
a key, and can take a key out again (tests register layers and losses of their own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry"]

K = TypeVar("K")
T = TypeVar("T", bound=type)


class Registry(Generic[K, T]):
    """Classes that implement a base class, by key, in registration order.

    Type parameters: ``K``, the keys (hashable); ``T``, the registered classes.

    Args:
        base: The base class every registered class must subclass.
        kind: What a registered class is, for messages (``"adapter"``).
        description: What the registry holds per key, for messages (``"layer adapter"``).
        stem: The name of the public functions (``"layer"``: ``register_layer``,
            ``unregister_layer``).
        name: How a key reads in messages.
    """

    def __init__(
        self, base: type, kind: str, description: str, stem: str, name: Callable[[K], str]
    ) -> None:
        self._entries: dict[K, T] = {}
        self._base, self._kind, self._description, self._stem = base, kind, description, stem
        self._name = name

    def register(self, key: K) -> Callable[[T], T]:
        """A class decorator registering the decorated class for ``key``.

        Registering the same class again changes nothing.

        Raises:
            TypeError: (from the decorator) If the class does not subclass the base class.
            ValueError: (from the decorator) If ``key`` already has another class.
        """

        def decorate(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, self._base)):
                raise TypeError(
                    f"register_{self._stem} expects a {self._base.__name__} subclass, got {cls!r}."
                )
            registered = self._entries.get(key)
            if registered is not None and registered is not cls:
                raise ValueError(
                    f"{self._name(key)} already has the {self._kind} {registered.__qualname__}; "
                    f"unregister_{self._stem} it first to replace the {self._kind}."
                )
            self._entries[key] = cls
            return cls

        return decorate

    def unregister(self, key: K) -> T:
        """Remove and return the class of ``key``.

        Raises:
            KeyError: If no class is registered for ``key``, listing the registered ones.
        """
        try:
            return self._entries.pop(key)
        except KeyError:
            raise KeyError(
                f"No {self._description} is registered for {self._name(key)}. "
                f"Registered: {', '.join(self.names())}."
            ) from None

    def get(self, key: K) -> T | None:
        """The class of ``key``, or ``None``."""
        return self._entries.get(key)

    def names(self) -> tuple[str, ...]:
        """The registered keys as they read in messages, in registration order."""
        return tuple(self._name(k) for k in self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)
