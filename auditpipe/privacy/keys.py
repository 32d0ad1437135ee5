"""Per-subject data keys for crypto-shredding (``[sinks.NAME] encrypt_content``).

A subject is ``(tenant, user)``, taken from an event the way the erasure selector reads it
(the ``tenant``/``user`` field, else the caller metadata key of the same name; ``""`` where
there is none). Events with neither share the *anonymous* subject ``("", "")``: their content
is encrypted too, so an encrypting archive never holds plaintext content, but there is no
person to shred it for (erasing a tenant or user never touches it).

A :class:`KeyStore` keeps one 256-bit data key per subject::

    get_or_create(subject) -> (key_id, key)   # the same pair for every caller, every process
    get(key_id) -> key | None                 # None: deleted (shredded) or never existed
    delete_subject(subject) -> int            # keys deleted
    key_ids(user=..., tenant=...) -> [...]    # every key of a user (any tenant) / a tenant
    delete_where(user=..., tenant=...) -> int

Two implementations share the SQL: :class:`SQLiteKeyStore` (a file, mode 0600, for one machine
and dev) and :class:`PostgresKeyStore` (a table, created idempotently). Another backend (a
KMS) implements the same five methods.

Master key: with ``[privacy] master_key_env`` naming an environment variable that holds 32
bytes (64 hex digits or base64), every stored data key is wrapped with AES-256-GCM under it
(AAD: the key id), so a copy of the key store alone reveals nothing. The store keeps a check
value encrypted under the master key: opening it with a different master key, or without one,
fails at once with :class:`MasterKeyError` instead of producing unreadable data later.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from auditpipe.errors import AuditpipeError, ConfigError

if TYPE_CHECKING:
    from auditpipe.settings import Settings

Subject = tuple[str, str]  # (tenant, user); "" where the event has none
ANONYMOUS: Subject = ("", "")

_CHECK_PLAINTEXT = b"auditpipe key store master-key check v1"
_CHECK_AAD = b"auditpipe:master-check"


class KeyStoreError(AuditpipeError):
    """The key store cannot be opened or used (the message names the setting to fix)."""


class MasterKeyError(KeyStoreError, ConfigError):
    """The master key is missing, malformed, or not the one the store was created with."""


def subject_of(event: Mapping[str, Any]) -> Subject:
    """The event's ``(tenant, user)``, read as :class:`~auditpipe.privacy.Selector` reads them."""
    meta = event.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}

    def pick(name: str) -> str:
        value = event.get(name) or meta.get(name)
        return value if isinstance(value, str) else ""

    return pick("tenant"), pick("user")


@runtime_checkable
class KeyStore(Protocol):
    def get_or_create(self, subject: Subject) -> tuple[str, bytes]: ...

    def get(self, key_id: str) -> bytes | None: ...

    def delete_subject(self, subject: Subject) -> int: ...

    def key_ids(self, *, user: str | None = None, tenant: str | None = None) -> list[str]: ...

    def delete_where(self, *, user: str | None = None, tenant: str | None = None) -> int: ...

    def close(self) -> None: ...


def parse_master_key(env_name: str, env: Mapping[str, str] | None = None) -> bytes:
    """The 32-byte master key held (hex or base64) in environment variable ``env_name``."""
    env = os.environ if env is None else env
    raw = env.get(env_name, "").strip()
    where = f"[privacy] master_key_env = {env_name!r}"
    if not raw:
        raise MasterKeyError(
            f"{where}, but {env_name} is not set: set it to the key store's master key "
            "(32 bytes as 64 hex digits or base64, e.g. `openssl rand -hex 32`)"
        )
    key: bytes | None = None
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        try:
            key = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            key = None
    if key is None or len(key) != 32:
        raise MasterKeyError(
            f"{where}: {env_name} must hold 32 bytes as 64 hex digits or base64 "
            "(e.g. `openssl rand -hex 32`)"
        )
    return key


class _SqlKeyStore:
    """What both SQL stores share: key wrapping, the master-key check, the queries.

    Subclasses provide ``_execute(sql, params) -> rows`` (one statement, committed) and
    ``_placeholder``; the SQL is written with ``?`` and translated for psycopg.
    """

    where: str  # names the store in messages

    def __init__(self, master_key: bytes | None, master_env: str | None) -> None:
        self._master = master_key
        self._master_env = master_env
        self._lock = threading.Lock()

    # -- backend --------------------------------------------------------------------------------

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- wrapping ---------------------------------------------------------------------------------

    def _aead(self) -> Any:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        assert self._master is not None
        return AESGCM(self._master)

    def _wrap(self, key_id: str, key: bytes) -> tuple[bytes, bool]:
        if self._master is None:
            return key, False
        nonce = secrets.token_bytes(12)
        return nonce + self._aead().encrypt(nonce, key, key_id.encode()), True

    def _unwrap(self, key_id: str, stored: bytes, wrapped: Any) -> bytes:
        if not wrapped:
            if self._master is not None:
                raise MasterKeyError(
                    f"{self.where}: data key {key_id} is stored unwrapped but [privacy] "
                    "master_key_env is set"
                )
            return bytes(stored)
        if self._master is None:
            raise MasterKeyError(
                f"{self.where}: data keys are wrapped with a master key; set [privacy] "
                "master_key_env to the environment variable that holds it"
            )
        from cryptography.exceptions import InvalidTag

        stored = bytes(stored)
        try:
            return bytes(self._aead().decrypt(stored[:12], stored[12:], key_id.encode()))
        except InvalidTag:
            raise MasterKeyError(
                f"{self.where}: data key {key_id} does not unwrap with the master key in "
                f"{self._master_env}: wrong master key?"
            ) from None

    def _check_master(self) -> None:
        """Fail now if the master key (or its absence) does not fit what the store holds."""
        rows = self._execute("SELECT value FROM auditpipe_key_meta WHERE name = 'master_check'")
        env = self._master_env
        if self._master is None:
            if rows:
                raise MasterKeyError(
                    f"{self.where} is protected by a master key, but [privacy] master_key_env "
                    "is not set: set it to the name of the environment variable holding it"
                )
            return
        from cryptography.exceptions import InvalidTag

        if not rows:
            plain = self._execute("SELECT count(*) FROM auditpipe_keys")[0][0]
            if plain:
                raise MasterKeyError(
                    f"{self.where} holds {plain} data key(s) stored without a master key, and "
                    f"[privacy] master_key_env = {env!r} is now set: unset it, or start a new "
                    "key store (keys cannot be re-wrapped in place yet)"
                )
            nonce = secrets.token_bytes(12)
            check = nonce + self._aead().encrypt(nonce, _CHECK_PLAINTEXT, _CHECK_AAD)
            self._execute(
                "INSERT INTO auditpipe_key_meta (name, value) VALUES ('master_check', ?) "
                "ON CONFLICT (name) DO NOTHING",
                (check,),
            )
            rows = self._execute("SELECT value FROM auditpipe_key_meta WHERE name = 'master_check'")
        value = bytes(rows[0][0])
        try:
            self._aead().decrypt(value[:12], value[12:], _CHECK_AAD)
        except InvalidTag:
            raise MasterKeyError(
                f"{self.where}: the master key in {env} is not the one this key store was "
                "created with (its check value does not decrypt): wrong master key?"
            ) from None

    # -- the interface ------------------------------------------------------------------------

    def get_or_create(self, subject: Subject) -> tuple[str, bytes]:
        tenant, user = subject
        rows = self._execute(
            "SELECT key_id, data_key, wrapped FROM auditpipe_keys WHERE tenant = ? AND user_id = ?",
            (tenant, user),
        )
        if not rows:
            key_id = uuid.uuid4().hex
            stored, wrapped = self._wrap(key_id, secrets.token_bytes(32))
            # Two writers creating the same subject's key at once: the unique constraint keeps
            # the first, and both read it back.
            self._execute(
                "INSERT INTO auditpipe_keys (key_id, tenant, user_id, data_key, wrapped, "
                "created_ms) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, user_id) DO NOTHING",
                (key_id, tenant, user, stored, wrapped, time.time_ns() // 1_000_000),
            )
            rows = self._execute(
                "SELECT key_id, data_key, wrapped FROM auditpipe_keys "
                "WHERE tenant = ? AND user_id = ?",
                (tenant, user),
            )
        key_id, stored, wrapped = rows[0]
        return key_id, self._unwrap(key_id, stored, wrapped)

    def get(self, key_id: str) -> bytes | None:
        rows = self._execute(
            "SELECT data_key, wrapped FROM auditpipe_keys WHERE key_id = ?", (key_id,)
        )
        if not rows:
            return None
        return self._unwrap(key_id, rows[0][0], rows[0][1])

    def delete_subject(self, subject: Subject) -> int:
        rows = self._execute(
            "DELETE FROM auditpipe_keys WHERE tenant = ? AND user_id = ? RETURNING key_id",
            subject,
        )
        return len(rows)

    @staticmethod
    def _where(user: str | None, tenant: str | None) -> tuple[str, tuple[str, ...]]:
        if user is None and tenant is None:
            raise ValueError("key_ids/delete_where need a user or a tenant")
        conds, params = [], []
        if user is not None:
            conds.append("user_id = ?")
            params.append(user)
        if tenant is not None:
            conds.append("tenant = ?")
            params.append(tenant)
        return " AND ".join(conds), tuple(params)

    def key_ids(self, *, user: str | None = None, tenant: str | None = None) -> list[str]:
        cond, params = self._where(user, tenant)
        rows = self._execute(f"SELECT key_id FROM auditpipe_keys WHERE {cond}", params)
        return sorted(r[0] for r in rows)

    def delete_where(self, *, user: str | None = None, tenant: str | None = None) -> int:
        cond, params = self._where(user, tenant)
        rows = self._execute(f"DELETE FROM auditpipe_keys WHERE {cond} RETURNING key_id", params)
        return len(rows)


_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS auditpipe_keys (key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
    "user_id TEXT NOT NULL, data_key BLOB NOT NULL, wrapped INTEGER NOT NULL, "
    "created_ms INTEGER NOT NULL, UNIQUE (tenant, user_id))",
    "CREATE TABLE IF NOT EXISTS auditpipe_key_meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
)


class SQLiteKeyStore(_SqlKeyStore):
    """Keys in an SQLite file (created mode 0600; its directory 0700 when created)."""

    def __init__(
        self, path: str | Path, master_key: bytes | None = None, master_env: str | None = None
    ) -> None:
        super().__init__(master_key, master_env)
        self.path = Path(path)
        self.where = f"key store {self.path}"
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(self.path, 0o600)
            self._conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30
            )
            # a deleted key must not linger in the file's free pages: that would undo shredding
            self._conn.execute("PRAGMA secure_delete = ON")
            for statement in _SQLITE_SCHEMA:
                self._conn.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise KeyStoreError(
                f"{self.where}: cannot open ([privacy] key_store_path): {exc}"
            ) from exc
        self._check_master()

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise KeyStoreError(f"{self.where}: {exc}") from exc

    def close(self) -> None:
        self._conn.close()


class PostgresKeyStore(_SqlKeyStore):
    """Keys in the table ``SCHEMA.auditpipe_keys`` (and ``auditpipe_key_meta``), created
    idempotently at open."""

    def __init__(
        self,
        dsn: str,
        schema: str = "public",
        master_key: bytes | None = None,
        master_env: str | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        import psycopg

        super().__init__(master_key, master_env)
        self.where = f"key store (PostgreSQL, schema {schema})"
        self._release = release
        try:
            self._conn = psycopg.connect(dsn, autocommit=True, options=f"-c search_path={schema}")
            self._conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS auditpipe_keys (key_id TEXT PRIMARY KEY, "
                "tenant TEXT NOT NULL, user_id TEXT NOT NULL, data_key BYTEA NOT NULL, "
                "wrapped BOOLEAN NOT NULL, created_ms BIGINT NOT NULL, UNIQUE (tenant, user_id))"
            )
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS auditpipe_key_meta "
                "(name TEXT PRIMARY KEY, value BYTEA NOT NULL)"
            )
        except psycopg.Error as exc:
            self.close()
            raise KeyStoreError(
                f"{self.where}: cannot open ([privacy] key_store_dsn): {exc}"
            ) from exc
        self._check_master()

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with self._lock:
            try:
                cur = self._conn.execute(sql.replace("?", "%s"), params)
                return list(cur.fetchall()) if cur.description else []
            except psycopg.Error as exc:
                raise KeyStoreError(f"{self.where}: {exc}") from exc

    def close(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
        release, self._release = self._release, None
        if release is not None:
            release()


def open_key_store(settings: Settings, env: Mapping[str, str] | None = None) -> KeyStore:
    """The key store ``[privacy]`` configures (``key_store``, ``key_store_path`` /
    ``key_store_dsn``, ``master_key_env``), opened and its master key checked."""
    p = settings.privacy
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ConfigError(
            "encrypt_content / the key store need the cryptography package: "
            "pip install 'auditpipe[privacy]'"
        ) from None
    master = parse_master_key(p.master_key_env, env) if p.master_key_env else None
    if p.key_store == "sqlite":
        return SQLiteKeyStore(p.key_store_path, master, p.master_key_env)
    dsn = p.key_store_dsn
    release = None
    if not dsn:
        table = settings.sinks.get("postgres") or {}
        dsn = table.get("dsn")
        if not dsn:  # the embedded PostgreSQL, as the postgres sink uses without a dsn
            from auditpipe.sinks.postgres import PostgresConfig, acquire_dsn

            extra = {k: table[k] for k in ("embedded_data_dir",) if k in table}
            try:
                dsn, release = acquire_dsn(PostgresConfig(**extra))
            except ConfigError as exc:
                raise ConfigError(
                    f'[privacy] key_store = "postgres" needs key_store_dsn (or [sinks.postgres] '
                    f"dsn, or the embedded PostgreSQL): {exc}"
                ) from None
    return PostgresKeyStore(dsn, p.key_store_schema, master, p.master_key_env, release)
