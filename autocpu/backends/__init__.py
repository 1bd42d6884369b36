"""Backend discovery: every module here that defines a ``Backend`` subclass is a backend.

Adding a backend means adding one file (plus its tests); nothing else needs to list it.
Backend modules import their heavy packages lazily, so discovering them is cheap.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

from autocpu.backends.base import Availability, Backend, BuildContext, Runner
from autocpu.errors import AutocpuError

__all__ = ["Availability", "Backend", "BuildContext", "Runner", "all_backends", "get_backend"]


@functools.lru_cache(maxsize=1)
def _discover() -> dict[str, Backend]:
    found: dict[str, Backend] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, Backend)
                and not inspect.isabstract(cls)
                and cls.__module__ == module.__name__
            ):
                found[cls.name] = cls()
    return dict(sorted(found.items(), key=lambda item: (item[1].simplicity, item[0])))


def all_backends() -> list[Backend]:
    """Every backend, simplest first."""
    return list(_discover().values())


def get_backend(name: str) -> Backend:
    backends = _discover()
    if name not in backends:
        raise AutocpuError(f"unknown backend {name!r}", f"choose from: {', '.join(backends)}")
    return backends[name]
