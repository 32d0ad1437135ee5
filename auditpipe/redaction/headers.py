"""The credential headers: a name list every part needs, without loading the detectors."""

from __future__ import annotations

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
