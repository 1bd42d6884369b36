"""Backend discovery: every module here that defines a ``Backend`` subclass is a backend.

Adding a backend means adding one file (plus its tests); nothing else needs to list it.
Backend modules import their heavy packages lazily, so discovering them is cheap.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import os
import pkgutil

from autocpu.backends.base import Availability, Backend, BuildContext, Runner
from autocpu.errors import AutocpuError, one_line

__all__ = ["Availability", "Backend", "BuildContext", "Runner", "all_backends", "get_backend"]


#: Extra backends outside this package: "module:Class" entries, comma-separated (also the
#: ``autocpu.backends`` entry-point group). Worker processes inherit it with the environment.
EXTRA_BACKENDS_ENV = "AUTOCPU_EXTRA_BACKENDS"


def _classes_in(module: object) -> list[type[Backend]]:
    return [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Backend)
        and not inspect.isabstract(cls)
        and cls.__module__ == module.__name__
    ]


def _extra_classes() -> list[type[Backend]]:
    entries = [e.strip() for e in os.environ.get(EXTRA_BACKENDS_ENV, "").split(",") if e.strip()]
    entries += [ep.value for ep in importlib.metadata.entry_points(group="autocpu.backends")]
    classes = []
    for entry in entries:
        module_name, _, class_name = entry.partition(":")
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError) as error:
            raise AutocpuError(
                f"cannot load backend {entry!r} ({one_line(error)})",
                f"fix or remove it from {EXTRA_BACKENDS_ENV} / the autocpu.backends entry points",
            ) from None
    return classes


@functools.lru_cache(maxsize=1)
def _discover() -> dict[str, Backend]:
    classes: list[type[Backend]] = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            classes += _classes_in(importlib.import_module(f"{__name__}.{info.name}"))
    found = {cls.name: cls() for cls in [*classes, *_extra_classes()]}
    return dict(sorted(found.items(), key=lambda item: (item[1].simplicity, item[0])))


def all_backends() -> list[Backend]:
    """Every backend, simplest first."""
    return list(_discover().values())


def get_backend(name: str) -> Backend:
    backends = _discover()
    if name not in backends:
        raise AutocpuError(f"unknown backend {name!r}", f"choose from: {', '.join(backends)}")
    return backends[name]
