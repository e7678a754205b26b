"""The distillation methods by name. A method is one module here holding its config dataclass (which embeds a
:class:`~.config.RunConfig`), its loop ``Method`` and ``METHOD``, the :class:`~.runner.MethodEntry` that
registers them; adding a method is that module and one line below."""

from __future__ import annotations

from importlib import import_module

from .runner import MethodEntry

METHODS = {
    "shortcut": ".shortcut",
    "progressive": ".progressive",
    "sfd": ".sfd",
    "gdd": ".gdd",
    "disback": ".disback",
}


def entry(name: str) -> MethodEntry:
    """The registered method ``name``."""
    if name not in METHODS:
        raise KeyError(f"no method {name!r}; the methods are {', '.join(METHODS)}")
    return import_module(METHODS[name], __package__).METHOD
