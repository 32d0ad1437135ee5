"""Bearer API keys for ``auditpipe serve``.

``[serve] api_keys`` may read, update and delete; ``[serve] read_api_keys`` may only read. A
key is a string, or ``{ name = "...", key = "..." }``. A request presents a key as
``Authorization: Bearer KEY`` (what the openai client sends) or, for the web viewer in a
browser, as the password of HTTP Basic authentication (any user name). Every configured key is
compared with :func:`hmac.compare_digest` on SHA-256 digests, all of them on every request, so
the time taken says nothing about which key (or how much of one) matched.

The change log records who changed what as the key's name, or for an unnamed key its
fingerprint ``key:<first 12 hex of its SHA-256>``: never the key itself. With no keys at all the
server only listens on loopback (``auditpipe serve`` refuses other hosts) and every local
caller may read and write, recorded as ``local``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

from auditpipe.settings import ApiKey, ServeSettings


@dataclass(frozen=True)
class Principal:
    actor: str
    can_write: bool


ANONYMOUS = Principal("local", can_write=True)


def fingerprint(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class KeyRing:
    def __init__(self, serve: ServeSettings) -> None:
        self._keys: list[tuple[bytes, Principal]] = []
        for keys, can_write in ((serve.api_keys, True), (serve.read_api_keys, False)):
            for entry in keys:
                key, name = (entry.key, entry.name) if isinstance(entry, ApiKey) else (entry, None)
                digest = hashlib.sha256(key.encode()).digest()
                self._keys.append((digest, Principal(name or fingerprint(key), can_write)))

    @property
    def open(self) -> bool:
        """No keys configured: everyone (on loopback) may read and write."""
        return not self._keys

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal of an ``Authorization`` header value, or None."""
        if self.open:
            return ANONYMOUS
        token = _token(authorization or "")
        if token is None:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found: Principal | None = None
        for key_digest, principal in self._keys:  # no early exit: constant work per request
            if hmac.compare_digest(digest, key_digest) and found is None:
                found = principal
        return found


def _token(authorization: str) -> str | None:
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None
