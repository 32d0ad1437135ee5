"""Envelope encryption of an event's content, and reading it back (crypto-shredding).

With ``[sinks.NAME] encrypt_content = true`` the sink runner replaces the event's ``input`` and
``output`` (each, when not null) with an envelope before the sink writes::

    {"encrypted": "aes-256-gcm", "key_id": "...", "nonce": "<base64>", "ciphertext": "<base64>"}

AES-256-GCM under the data key of the event's subject (``(tenant, user)``, see
:mod:`auditpipe.privacy.keys`), a fresh 96-bit nonce per value, the plaintext the compact JSON
of the value, AAD the ``event_id`` (an envelope moved onto another record does not decrypt).
Everything else (ids, user, tenant, metadata, usage, timings, error) stays readable, so stores
can still be searched and erased by subject.

:func:`decrypt_event` undoes it with access to the key store; where the key is gone (the
subject was erased) the value becomes :data:`ERASED`.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import orjson

from auditpipe.errors import AuditpipeError

from .keys import KeyStore, Subject, open_key_store, subject_of

if TYPE_CHECKING:
    from auditpipe.settings import Settings

ALGORITHM = "aes-256-gcm"
ERASED = "[erased]"
CONTENT_FIELDS = ("input", "output")


class DecryptError(AuditpipeError):
    """An envelope does not decrypt with its key (tampered, or moved to another record)."""


def is_envelope(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and value.get("encrypted") == ALGORITHM
        and isinstance(value.get("key_id"), str)
        and isinstance(value.get("nonce"), str)
        and isinstance(value.get("ciphertext"), str)
    )


def as_envelope(value: Any) -> dict[str, Any] | None:
    """``value`` as an envelope: itself, or parsed from the JSON string the Avro layout
    stores content as; None if it is not one."""
    if isinstance(value, str) and value.startswith("{") and ALGORITHM in value:
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    return dict(value) if is_envelope(value) else None


def _aead(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def seal(value: Any, key_id: str, key: bytes | Any, event_id: str) -> dict[str, str]:
    """The envelope of ``value``; ``key`` is the data key or an ``AESGCM`` made from it."""
    aead = _aead(key) if isinstance(key, bytes) else key
    nonce = secrets.token_bytes(12)
    ciphertext = aead.encrypt(nonce, orjson.dumps(value), event_id.encode())
    return {
        "encrypted": ALGORITHM,
        "key_id": key_id,
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }


def open_envelope(envelope: Mapping[str, Any], key: bytes, event_id: str) -> Any:
    from cryptography.exceptions import InvalidTag

    try:
        nonce = base64.b64decode(envelope["nonce"])
        ciphertext = base64.b64decode(envelope["ciphertext"])
        return orjson.loads(_aead(key).decrypt(nonce, ciphertext, event_id.encode()))
    except (InvalidTag, ValueError) as exc:
        raise DecryptError(
            f"event {event_id}: content under key {envelope.get('key_id')} does not decrypt "
            f"({type(exc).__name__}): tampered, or not this event's"
        ) from None


def encrypt_event(event: Mapping[str, Any], key_id: str, key: bytes | Any) -> dict[str, Any]:
    """A copy of ``event`` with ``input``/``output`` sealed under ``key`` (null stays null;
    ``key`` as for :func:`seal`)."""
    key = _aead(key) if isinstance(key, bytes) else key
    out = dict(event)
    for name in CONTENT_FIELDS:
        if out.get(name) is not None:
            out[name] = seal(out[name], key_id, key, str(event["event_id"]))
    return out


def envelope_key_ids(event: Mapping[str, Any]) -> set[str] | None:
    """The key ids ``event``'s content is sealed under; None if any content is in clear."""
    ids = set()
    for name in CONTENT_FIELDS:
        value = event.get(name)
        if value is None:
            continue
        envelope = as_envelope(value)
        if envelope is None:
            return None
        ids.add(envelope["key_id"])
    return ids


def decrypt_event(
    event: Mapping[str, Any],
    keystore: KeyStore | Callable[[str], bytes | None],
) -> dict[str, Any]:
    """A copy of ``event`` with sealed ``input``/``output`` restored, or :data:`ERASED` where
    the key is gone. Content that is not an envelope is returned as it is. ``keystore`` is a
    :class:`KeyStore` (or a mapping) or any ``key_id -> key | None`` function (e.g. a caching
    one).

    Raises :class:`DecryptError` when an envelope does not decrypt with its key, and the key
    store's :class:`~auditpipe.privacy.keys.MasterKeyError` when the key cannot be unwrapped.
    """
    # (not isinstance(..., KeyStore): a runtime Protocol check costs more than the decryption)
    lookup = cast(Callable[[str], "bytes | None"], getattr(keystore, "get", keystore))
    out = dict(event)
    for name in CONTENT_FIELDS:
        envelope = as_envelope(out.get(name))
        if envelope is None:
            continue
        key = lookup(envelope["key_id"])
        out[name] = ERASED if key is None else open_envelope(envelope, key, str(out["event_id"]))
    return out


class ContentCipher:
    """Seals events for a sink: data keys from ``store``, cached per subject.

    The cache (``cache_secs``, at most ``max_cached`` subjects) keeps the key store off the
    write path. Its consequence: records of a subject written up to ``cache_secs`` after the
    subject's keys were deleted (erased) are sealed under the deleted key, so they are
    unreadable from the start, i.e. erased too. Thread-safe (the runner seals on a thread).
    """

    def __init__(self, store: KeyStore, cache_secs: float = 60.0, max_cached: int = 10_000) -> None:
        self.store = store
        self.cache_secs = cache_secs
        self.max_cached = max_cached
        self._cache: OrderedDict[Subject, tuple[float, str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def data_key(self, subject: Subject) -> tuple[str, Any]:
        """(key id, ``AESGCM`` of the subject's data key), from the cache when fresh."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(subject)
            if hit is not None and now - hit[0] < self.cache_secs:
                self._cache.move_to_end(subject)
                return hit[1], hit[2]
        key_id, raw = self.store.get_or_create(subject)
        key = _aead(raw)  # made once per subject: it costs about as much as a seal
        with self._lock:
            self._cache[subject] = (now, key_id, key)
            self._cache.move_to_end(subject)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return key_id, key

    def encrypt(self, event: Mapping[str, Any]) -> dict[str, Any]:
        if all(event.get(name) is None for name in CONTENT_FIELDS):
            return dict(event)
        key_id, key = self.data_key(subject_of(event))
        return encrypt_event(event, key_id, key)

    def encrypt_all(self, events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [self.encrypt(e) for e in events]

    def close(self) -> None:
        self.store.close()


def content_cipher(settings: Settings) -> ContentCipher:
    """The cipher ``[privacy]`` configures (key store opened, master key checked)."""
    return ContentCipher(open_key_store(settings), cache_secs=settings.privacy.key_cache_secs)
