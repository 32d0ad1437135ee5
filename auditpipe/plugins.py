"""Loading the classes that entry points name (steps, sinks): one lookup, one set of errors."""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points
from typing import Any, get_args, get_origin

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


def bind_config_model(cls: type, base: type) -> None:
    """Give ``cls`` (a subclass of the generic ``base``, e.g. ``Sink[S3Config]``) the config
    model its generic argument names as ``cls.Config``, so a plugin states it once.

    A class that sets ``Config`` itself keeps it; it must then be the generic argument or a
    subclass of it (TypeError otherwise, at import time, naming both).
    """
    bound = next(
        (
            get_args(b)[0]
            for b in getattr(cls, "__orig_bases__", ())
            if isinstance(get_origin(b), type) and issubclass(get_origin(b), base) and get_args(b)
        ),
        None,
    )
    if not isinstance(bound, type):
        return
    own = cls.__dict__.get("Config")
    if own is None:
        setattr(cls, "Config", bound)  # noqa: B010 - cls is any plugin class
    elif not (isinstance(own, type) and issubclass(own, bound)):
        raise TypeError(
            f"{cls.__name__}.Config is {getattr(own, '__name__', own)!r} but the class is "
            f"declared as {base.__name__}[{bound.__name__}]: drop Config or make it that model"
        )
