"""The redact step's detectors, kept importable here for compatibility: they live in
:mod:`auditpipe.redaction.detectors` (shared with the producer and the sinks)."""

from auditpipe.redaction.detectors import (
    BUILTIN,
    BUILTIN_NAMES,
    CREDENTIAL_HEADERS,
    Detector,
    Gate,
    aws_secret_ok,
    find_all,
    iban_ok,
    ipv6_ok,
    luhn_ok,
    phone_ok,
)

__all__ = [
    "BUILTIN",
    "BUILTIN_NAMES",
    "CREDENTIAL_HEADERS",
    "Detector",
    "Gate",
    "aws_secret_ok",
    "find_all",
    "iban_ok",
    "ipv6_ok",
    "luhn_ok",
    "phone_ok",
]
