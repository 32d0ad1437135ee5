"""Loading the classes that entry points name (steps, sinks): one lookup, one set of errors."""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import ConfigError


@functools.cache
def _group(group: str) -> tuple[EntryPoint, ...]:
    # Scanning the installed distributions takes milliseconds; settings validation asks for
    # every sink and step. Installed packages do not change under a running process.
    return tuple(entry_points(group=group))


def available(group: str) -> dict[str, str]:
    """Installed entry points of ``group``: name -> ``module:Class`` (nothing imported)."""
    return {ep.name: ep.value for ep in _group(group)}


def load_entry_point(
    group: str, name: str, base: type, kind: str, install: str, key: str = ""
) -> Any:
    """The class that entry point ``name`` of ``group`` names, a subclass of ``base``.

    Raises ConfigError saying what is installed (``kind``: "step", "sink"), how to get a
    missing dependency (``install``), prefixed with the setting it came from (``key``).
    """
    where = f"{key}: " if key else ""
    matches = [ep for ep in _group(group) if ep.name == name]
    if not matches:
        names = ", ".join(sorted(available(group))) or "none"
        raise ConfigError(f"{where}unknown {kind} {name!r}; installed {kind}s: {names}")
    try:
        cls = matches[0].load()
    except ImportError as exc:
        raise ConfigError(f"{where}{kind} {name!r} cannot be loaded ({exc}); {install}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{where}entry point {name!r} is not a {base.__name__} subclass")
    return cls
