"""Registries: every swappable piece (prior, likelihood, model, objective) is found by a short name.

A :class:`Registry` maps a name to a class. The class carries its own name
(``cls.name``); ``registry.register`` is usable as a decorator, and
``registry.build(config)`` turns the dict that ``obj.config()`` wrote back
into an object, so that a run's ``config.json`` rebuilds it exactly. An
unknown name gets an error that lists the known ones. The ``pyro-vae``
command first imports the modules that installed packages declare as
``pyro_vae.plugins`` entry points, and those named in the environment
variable ``PYRO_VAE_PLUGINS`` (:func:`load_plugins`), so that the pieces they
register are known to it too.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)

#: The entry-point group whose modules the ``pyro-vae`` command imports before it starts (:func:`load_plugins`).
PLUGIN_GROUP = "pyro_vae.plugins"
#: The environment variable that names more modules to import, comma-separated: modules of one's own, without
#: a package to install (found on the usual path, and in the current folder).
PLUGIN_VARIABLE = "PYRO_VAE_PLUGINS"


class Registry(Mapping, Generic[T]):
    """Classes of one kind, by their short ``name``.

    :param kind: what the classes are, for messages ("prior", "likelihood", ...).
    :param base: the class they all derive from (their interface), checked as each is registered.
    """

    def __init__(self, kind: str, base: type):
        self.kind, self.base = kind, base
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Make ``cls`` known by ``cls.name``; usable as a decorator. A class that is not a subclass of the
        registry's base, or a name taken by another class, is refused."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(
                f"A {self.kind} must subclass {self.base.__module__}.{self.base.__name__}, whose methods the "
                f"library calls; {cls!r} does not."
            )
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
            raise ValueError(
                f"Unknown {self.kind} {name!r}; choose one of {sorted(self._classes)}. A {self.kind} of your own is "
                f"known once the module that registers it is imported: in Python, import it first; for the "
                f"pyro-vae command, name the module in {PLUGIN_VARIABLE} (e.g. {PLUGIN_VARIABLE}=my_module "
                f"pyro-vae ...) or declare it as a {PLUGIN_GROUP!r} entry point of its package."
            )
        return self._classes[name]

    def build(self, config: dict | str):
        """An object from its short name, or from the dict its ``config()`` wrote (``{"name": ..., **arguments}``):
        the class called with the arguments."""
        config = {"name": config} if isinstance(config, str) else dict(config)
        if "name" not in config:
            raise ValueError(f"A {self.kind} config needs a 'name'; got {config}.")
        cls = self.lookup(config["name"])
        return cls(**{key: value for key, value in config.items() if key != "name"})

    def instance(self, value, default: Callable[[], object]):
        """``value`` where it is an instance of the base; built from its short name or config dict; ``default()``
        for None."""
        if value is None:
            return default()
        if isinstance(value, str | dict):
            return self.build(value)
        if not isinstance(value, self.base):
            raise TypeError(
                f"The {self.kind} must be a {self.base.__name__}, its short name ({', '.join(sorted(self._classes))}) "
                f"or its config dict; got a {type(value).__name__}. A {self.kind} of your own is a "
                f"{self.base.__name__} subclass (docs/howto/custom-prior-likelihood.md)."
            )
        return value

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


def load_plugins() -> list[str]:
    """Import every module that an installed package declares in the entry-point group ``pyro_vae.plugins``,
    then every module named in the environment variable ``PYRO_VAE_PLUGINS`` (comma-separated; the current
    folder is searched after the usual path, so that ``PYRO_VAE_PLUGINS=my_prior`` finds ``./my_prior.py``).

    The modules register their priors, likelihoods, objectives or models as they are imported, so that
    the command line offers them and rebuilds the runs that used them. A package declares its module in
    its ``pyproject.toml``::

        [project.entry-points."pyro_vae.plugins"]
        my_likelihoods = "my_package.likelihoods"

    :returns: the names of the entry points and modules loaded.
    """
    loaded = []
    for entry_point in entry_points(group=PLUGIN_GROUP):
        try:
            entry_point.load()
        except Exception as err:
            raise ImportError(
                f"The {PLUGIN_GROUP} entry point {entry_point.name!r} ({entry_point.value}) failed to import: {err}. "
                f"Fix or uninstall the package that declares it."
            ) from err
        loaded.append(entry_point.name)
    modules = [name.strip() for name in os.environ.get(PLUGIN_VARIABLE, "").split(",") if name.strip()]
    if modules and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:
            raise ImportError(
                f"The module {module!r} named in {PLUGIN_VARIABLE} failed to import: {err}. Fix it, or leave it out "
                f"of {PLUGIN_VARIABLE}."
            ) from err
        loaded.append(module)
    return loaded
