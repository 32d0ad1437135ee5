"""Redaction shared by every part: the detectors, the redact step and its policy version.

The processors run it in their chain, the producer in its sender (``[producer] redact =
true``), a sink before it writes (``[sinks.NAME] steps = ["redact"]``), all with the same
configuration model (``[pipeline.redact]``, or the sink's own table).

Importing this package is cheap: :mod:`.detectors` (which compiles the patterns) and
:mod:`.step` load on first use of what they define.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .detectors import BUILTIN, BUILTIN_NAMES, Detector, find_all
    from .step import RedactConfig, RedactStep

#: Headers that carry credentials: never recorded at capture (whatever the allowlist says),
#: and removed by the redact step wherever a record has them (header maps, request bodies
#: that carry headers, ``[name, value]`` pairs, text). ``credential_headers`` adds to them.
CREDENTIAL_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-auth-token",
        "x-amz-security-token",
        "x-goog-api-key",
    }
)

_WHERE = {
    "BUILTIN": "detectors",
    "BUILTIN_NAMES": "detectors",
    "Detector": "detectors",
    "find_all": "detectors",
    "RedactConfig": "step",
    "RedactStep": "step",
}

__all__ = [
    "BUILTIN",
    "BUILTIN_NAMES",
    "CREDENTIAL_HEADERS",
    "Detector",
    "RedactConfig",
    "RedactStep",
    "find_all",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
