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

from .headers import CREDENTIAL_HEADERS

if TYPE_CHECKING:
    from .detectors import BUILTIN, BUILTIN_NAMES, Detector, find_all
    from .step import RedactConfig, RedactStep

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
