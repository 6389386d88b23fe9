"""Registries: every swappable piece (prior, likelihood, model, objective) is found by a short name.

A :class:`Registry` maps a name to a class. The class carries its own name
(``cls.name``); ``registry.register`` is usable as a decorator, and
``registry.build(config)`` turns the dict that ``obj.config()`` wrote back
into an object, so that a run's ``config.json`` rebuilds it exactly. An
unknown name gets an error that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Mapping, Generic[T]):
    """Classes of one kind, by their short ``name``.

    :param kind: what the classes are, for messages ("prior", "likelihood", ...).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Make ``cls`` known by ``cls.name``; usable as a decorator. A name taken by another class is refused."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {self.kind} class needs a non-empty string attribute `name`; {cls!r} has {name!r}.")
        if self._classes.get(name, cls) is not cls:
            raise ValueError(f"A different {self.kind} is already registered as {name!r}.")
        self._classes[name] = cls
        return cls

    def lookup(self, name: str) -> T:
        """The class registered as ``name``, or a ``ValueError`` that lists the known names."""
        if name not in self._classes:
            raise ValueError(f"Unknown {self.kind} {name!r}; choose one of {sorted(self._classes)}.")
        return self._classes[name]

    def build(self, config: dict | str, **extra):
        """An object from its short name, or from the dict its ``config()`` wrote (``{"name": ..., **arguments}``).

        A class with a ``from_config`` classmethod gets the whole dict; any
        other is called with the arguments.
        """
        config = {"name": config} if isinstance(config, str) else dict(config)
        if "name" not in config:
            raise ValueError(f"A {self.kind} config needs a 'name'; got {config}.")
        cls = self.lookup(config["name"])
        if hasattr(cls, "from_config"):
            return cls.from_config(config, **extra)
        return cls(**{key: value for key, value in config.items() if key != "name"}, **extra)

    def __getitem__(self, name: str) -> T:
        return self._classes[name]

    def __delitem__(self, name: str) -> None:
        """Forget ``name`` (for tests and notebooks that register throwaway classes)."""
        del self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._classes)})"
