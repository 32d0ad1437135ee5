"""Crypto-shredding: per-subject data keys (SQLite file and PostgreSQL table, master key),
input/output sealed for sinks with encrypt_content (by the real sink runner on the embedded
broker), and `auditpipe erase --user` deleting the keys so that every copy, Object-Locked S3
objects on moto over HTTP and rotated gzip segments included, holds no readable content of
the subject while other subjects still decrypt."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import fastavro
import orjson
import psycopg
import pytest
from auditpipe.schemas import new_event
from auditpipe.sinks.file import FileSink
from auditpipe.sinks.mongodb import MongoSink
from auditpipe.sinks.postgres import PostgresSink

from auditpipe.cli import main
from auditpipe.errors import ConfigError
from auditpipe.privacy.envelope import (
    ERASED,
    ContentCipher,
    DecryptError,
    decrypt_event,
    encrypt_event,
    is_envelope,
)
from auditpipe.privacy.keys import (
    ANONYMOUS,
    KeyStoreError,
    MasterKeyError,
    PostgresKeyStore,
    SQLiteKeyStore,
    open_key_store,
    subject_of,
)
from auditpipe.privacy.selector import Selector
from auditpipe.settings import Settings, load_settings

from .erasefixtures import FileHarness, S3Harness, population
from .sinkfixtures import MotoS3
from .sinkutil import deliver

MASTER_ENV = "AUDITPIPE_TEST_MASTER_KEY"
MASTER = "11" * 32


def secrets_of(user: str, events: list[dict[str, Any]]) -> list[bytes]:
    return [
        e["input"]["messages"][0]["content"].encode()
        for e in events
        if Selector("user", user).matches(e)
    ]


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request: Any, tmp_path: Path, pg_dsn: str) -> Any:
    schema = f"k_{uuid.uuid4().hex[:8]}"
    opened: list[Any] = []

    def make(master: bytes | None = None) -> Any:
        if request.param == "sqlite":
            store: Any = SQLiteKeyStore(tmp_path / "ks" / "keys.sqlite", master, MASTER_ENV)
        else:
            store = PostgresKeyStore(pg_dsn, schema, master, MASTER_ENV)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


class TestKeyStores:
    def test_one_key_per_subject_shared_by_every_opener_and_deleted_by_user_or_tenant(
        self, store_factory: Any
    ) -> None:
        a, b = store_factory(), store_factory()  # two processes' views of one store
        kid, key = a.get_or_create(("acme", "alice"))
        assert len(key) == 32 and b.get_or_create(("acme", "alice")) == (kid, key)
        assert b.get(kid) == key and a.get("nope") is None
        other = a.get_or_create(("globex", "alice"))[0]
        bob = a.get_or_create(("acme", "bob"))[0]
        anon = a.get_or_create(ANONYMOUS)[0]
        assert a.key_ids(user="alice") == sorted([kid, other])
        assert a.delete_where(user="alice") == 2 and b.get(kid) is None and b.get(other) is None
        assert a.delete_where(tenant="acme") == 1 and a.get(bob) is None
        assert a.get(anon) is not None and a.delete_subject(ANONYMOUS) == 1
        assert a.delete_where(user="alice") == 0  # idempotent
        new_kid, new_key = a.get_or_create(("acme", "alice"))  # after erasure: a new key
        assert new_kid != kid and new_key != key

    def test_master_key_wraps_keys_and_a_wrong_or_missing_one_fails_clearly(
        self, store_factory: Any
    ) -> None:
        store = store_factory(bytes.fromhex(MASTER))
        kid, key = store.get_or_create(("t", "u"))
        raw = store._execute("SELECT data_key FROM auditpipe_keys WHERE key_id = ?", (kid,))
        assert key not in bytes(raw[0][0])  # stored wrapped, never in clear
        assert store_factory(bytes.fromhex(MASTER)).get(kid) == key
        with pytest.raises(MasterKeyError, match=f"master key in {MASTER_ENV}.*wrong master key"):
            store_factory(bytes.fromhex("22" * 32))
        with pytest.raises(MasterKeyError, match="master_key_env is not set"):
            store_factory(None)

    def test_a_store_created_without_master_key_refuses_one_later(self, store_factory: Any) -> None:
        store_factory().get_or_create(("t", "u"))
        with pytest.raises(MasterKeyError, match="stored without a master key"):
            store_factory(bytes.fromhex(MASTER))

    def test_sqlite_file_is_private_and_the_postgres_table_is_created_idempotently(
        self, tmp_path: Path, pg_dsn: str
    ) -> None:
        s = SQLiteKeyStore(tmp_path / "d" / "keys.sqlite")
        s.close()
        assert stat.S_IMODE(os.stat(tmp_path / "d" / "keys.sqlite").st_mode) == 0o600
        schema = f"k_{uuid.uuid4().hex[:8]}"
        for _ in range(2):
            PostgresKeyStore(pg_dsn, schema).close()
        with psycopg.connect(pg_dsn) as conn:
            n = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            ).fetchone()
        assert n is not None and n[0] == 2

    def test_a_deleted_key_leaves_no_bytes_in_the_sqlite_file(self, tmp_path: Path) -> None:
        """Without a master key the data key is stored as it is: deleting it must overwrite
        it (secure_delete, which some SQLite builds leave off), or free space in the file
        would still hold it. The same deletion with secure_delete off shows the hazard."""

        def deleted_keys_left(path: Path, secure: bool) -> int:
            store = SQLiteKeyStore(path)
            if not secure:
                store._execute("PRAGMA secure_delete = OFF")
            keys = [store.get_or_create(("t", f"u{i}"))[1] for i in range(50)]
            assert all(k in path.read_bytes() for k in keys)
            assert store.delete_where(user="u7") + store.delete_where(user="u8") == 2
            assert store._execute("PRAGMA secure_delete")[0][0] == int(secure)
            store.close()
            raw = path.read_bytes()
            assert all(k in raw for i, k in enumerate(keys) if i not in (7, 8))
            return sum(keys[i] in raw for i in (7, 8))

        assert deleted_keys_left(tmp_path / "plain.sqlite", secure=False) == 2
        assert deleted_keys_left(tmp_path / "keys.sqlite", secure=True) == 0

    def test_postgres_key_store_defaults_to_the_postgres_sinks_dsn(self, pg_dsn: str) -> None:
        schema = f"k_{uuid.uuid4().hex[:8]}"
        settings = Settings.model_validate({
            "privacy": {"key_store": "postgres", "key_store_schema": schema},
            "sinks": {"postgres": {"dsn": pg_dsn}},
        })  # fmt: skip
        store = open_key_store(settings)
        try:
            assert isinstance(store, PostgresKeyStore)
            kid, _ = store.get_or_create(("t", "u"))
        finally:
            store.close()
        with psycopg.connect(pg_dsn) as conn:
            row = conn.execute(f'SELECT key_id FROM "{schema}".auditpipe_keys').fetchone()  # type: ignore[arg-type]
        assert row == (kid,)


class TestEnvelope:
    def test_seals_only_input_and_output_and_restores_them(self, tmp_path: Path) -> None:
        store = SQLiteKeyStore(tmp_path / "k.sqlite")
        (event,) = population(1)
        sealed = ContentCipher(store).encrypt(event)
        assert is_envelope(sealed["input"]) and is_envelope(sealed["output"])
        assert {k: v for k, v in sealed.items() if k not in ("input", "output")} == {
            k: v for k, v in event.items() if k not in ("input", "output")
        }
        assert b"secret" not in orjson.dumps(sealed)
        assert decrypt_event(sealed, store) == event
        empty = new_event(user="u", input=None, output=None)
        assert ContentCipher(store).encrypt(empty) == empty  # null stays null

    def test_subject_is_tenant_and_user_as_the_selector_reads_them(self) -> None:
        assert subject_of({"user": "a", "tenant": "t"}) == ("t", "a")
        assert subject_of({"metadata": {"user": "a"}}) == ("", "a")
        assert subject_of({"metadata": {"team": "x"}}) == ANONYMOUS

    def test_a_missing_key_reads_as_erased_and_a_moved_envelope_fails(self, tmp_path: Path) -> None:
        store = SQLiteKeyStore(tmp_path / "k.sqlite")
        a, b = population(2)
        kid, key = store.get_or_create(("x", "y"))
        sealed = encrypt_event(a, kid, key)
        moved = {**b, "input": sealed["input"]}  # AAD is the event id
        with pytest.raises(DecryptError, match=b["event_id"]):
            decrypt_event(moved, store)
        store.delete_subject(("x", "y"))
        erased = decrypt_event(sealed, store)
        assert erased["input"] == ERASED and erased["output"] == ERASED
        assert erased["request_id"] == a["request_id"]


class TestConfig:
    def test_encrypt_content_on_a_store_that_deletes_is_refused_with_the_reason(self) -> None:
        for cls, table in ((PostgresSink, {"dsn": "postgresql://x"}),
                           (MongoSink, {"uri": "mongodb://x"})):  # fmt: skip
            with pytest.raises(ConfigError) as err:
                cls.from_mapping({**table, "encrypt_content": True}, "c.toml")
            msg = str(err.value)
            assert f"sinks.{cls.name}.encrypt_content" in msg and "archive sinks" in msg

    def test_bad_privacy_keys_name_the_key(self, tmp_path: Path) -> None:
        cfg = tmp_path / "c.toml"
        cfg.write_text('[privacy]\nkey_store = "vault"\n')
        with pytest.raises(ConfigError, match=r"privacy\.key_store"):
            load_settings(cfg)
        settings = Settings.model_validate(
            {"privacy": {"key_store_path": str(tmp_path / "k"), "master_key_env": MASTER_ENV}}
        )
        with pytest.raises(MasterKeyError, match=f"{MASTER_ENV} is not set"):
            open_key_store(settings, env={})
        with pytest.raises(MasterKeyError, match="32 bytes"):
            open_key_store(settings, env={MASTER_ENV: "abcd"})


class TestRunnerSeals:
    def test_the_sink_runner_writes_sealed_content_that_decrypts(
        self, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """File sink with encrypt_content under the real runner on the embedded broker."""
        monkeypatch.setenv(MASTER_ENV, MASTER)
        s = settings.model_copy(
            update={
                "privacy": settings.privacy.model_copy(
                    update={
                        "key_store_path": str(tmp_path / "keys.sqlite"),
                        "master_key_env": MASTER_ENV,
                    }
                )
            }
        )
        events = population(12)
        sink = FileSink.from_mapping(
            {"path": str(tmp_path / "out" / "a.jsonl"), "encrypt_content": True}
        )
        asyncio.run(deliver(sink, s, events))
        raw = (tmp_path / "out" / "a.jsonl").read_bytes()
        assert not any(secret in raw for u in ("alice", "bob", "carol")
                       for secret in secrets_of(u, events))  # fmt: skip
        store = open_key_store(s)
        try:
            back = {e["event_id"]: e for e in map(orjson.loads, raw.splitlines())}
            assert len(back) == 12
            for original in events:
                assert is_envelope(back[original["event_id"]]["input"])
                assert decrypt_event(back[original["event_id"]], store) == orjson.loads(
                    orjson.dumps(original)
                )
        finally:
            store.close()

    def test_a_key_store_that_fails_makes_the_write_retried_never_written_in_clear(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        from auditpipe.sinks.runner import SinkRunner

        from .sinkutil import fast, produce_events, run_until

        class Failing:
            """The real SQLite store, unavailable for its first three calls."""

            def __init__(self, real: SQLiteKeyStore) -> None:
                self.real, self.failures = real, 3

            def get_or_create(self, subject: Any) -> tuple[str, bytes]:
                if self.failures:
                    self.failures -= 1
                    raise KeyStoreError("key store unavailable (test)")
                return self.real.get_or_create(subject)

            def close(self) -> None:
                self.real.close()

        store = Failing(SQLiteKeyStore(tmp_path / "keys.sqlite"))
        s = fast(settings, backoff_initial_secs=0.05, backoff_max_secs=0.1)
        events = population(6)
        sink = FileSink.from_mapping(
            {"path": str(tmp_path / "out" / "a.jsonl"), "encrypt_content": True}
        )
        runner = SinkRunner(sink, s)
        runner.cipher = ContentCipher(store)  # type: ignore[arg-type]

        async def scenario() -> None:
            await produce_events(s, events)
            await run_until(runner, lambda: runner.stats.written >= 6, what="6 written")

        asyncio.run(scenario())
        assert runner.stats.retried >= 3 and store.failures == 0
        lines = (tmp_path / "out" / "a.jsonl").read_bytes().splitlines()
        assert len(lines) == 6 and all(is_envelope(orjson.loads(x)["input"]) for x in lines)

    def test_a_runner_with_a_wrong_master_key_refuses_to_start(
        self, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from auditpipe.sinks.runner import SinkRunner

        privacy = {"key_store_path": str(tmp_path / "keys.sqlite"), "master_key_env": MASTER_ENV}
        s = settings.model_copy(update={"privacy": settings.privacy.model_copy(update=privacy)})
        monkeypatch.setenv(MASTER_ENV, MASTER)
        open_key_store(s).close()  # the store now belongs to MASTER
        monkeypatch.setenv(MASTER_ENV, "44" * 32)
        sink = FileSink.from_mapping(
            {"path": str(tmp_path / "out" / "a.jsonl"), "encrypt_content": True}
        )
        with pytest.raises(MasterKeyError, match="wrong master key"):
            asyncio.run(SinkRunner(sink, s).run())
        assert not (tmp_path / "out" / "a.jsonl").exists()  # nothing written in clear


def _config(tmp_path: Path, harnesses: list[Any], kafka: str, extra: str = "") -> Path:
    lines = [
        f'[kafka]\nbootstrap = "{kafka}"\nevents_topic = "ev-{uuid.uuid4().hex[:8]}"',
        f'[privacy]\nkey_store_path = "{tmp_path / "keys.sqlite"}"\n'
        f'master_key_env = "{MASTER_ENV}"\n{extra}',
    ]
    for h in harnesses:
        lines.append(f"[sinks.{h.name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in h.config.items()]
    path = tmp_path / "c.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _erase(capsys: Any, cfg: Path, *argv: str) -> tuple[int, Any]:
    code = main(["erase", "--config", str(cfg), "--yes", "--json", *argv])
    out = capsys.readouterr().out
    return code, json.loads(out)


class TestShredding:
    @pytest.fixture(autouse=True)
    def _env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AUDITPIPE_ERASURE_HASH_KEY", "k")
        monkeypatch.setenv(MASTER_ENV, MASTER)

    def _load(self, tmp_path: Path, moto_s3: MotoS3, kafka: str, extra: str = "") -> Any:
        events = population(30)
        f = FileHarness(tmp_path, encrypt_content=True)
        locked = moto_s3.new_bucket(object_lock=True)
        s3 = S3Harness(moto_s3, locked, encrypt_content=True,
                       object_lock_mode="GOVERNANCE", object_lock_retention_days=7)  # fmt: skip
        cfg = _config(tmp_path, [f, s3], kafka, extra)
        settings = load_settings(cfg)
        cipher = ContentCipher(open_key_store(settings))
        sealed = cipher.encrypt_all(events)  # what the runner does before each write
        cipher.close()
        f.load(sealed)
        s3.load(sealed)
        return events, f, s3, cfg, settings

    def test_erasing_a_user_deletes_their_keys_and_shreds_every_copy(
        self, tmp_path: Path, moto_s3: MotoS3, kafka_bootstrap: str, capsys: Any
    ) -> None:
        events, f, s3, cfg, settings = self._load(tmp_path, moto_s3, kafka_bootstrap)
        assert len(f.files()) > 2 and any(p.name.endswith(".gz") for p in f.files())
        alice = secrets_of("alice", events)
        everyone = alice + secrets_of("bob", events)
        stored = f.raw_bytes() + s3.all_versions_bytes()
        assert everyone and not any(s in stored for s in everyone)  # sealed at rest already

        code, out = _erase(capsys, cfg, "--user", "alice")
        n = len(alice)
        assert code == 0, out
        receipts = {r["sink"]: r for r in out["receipts"]}
        assert (receipts["file"]["erased"], receipts["file"]["shredded"]) == (n, 0)
        assert (receipts["s3"]["erased"], receipts["s3"]["shredded"]) == (0, n)
        assert receipts["s3"]["skipped"] == {}
        assert out["keys"] == {"found": 2, "deleted": 2, "kept": None}  # alice in 2 tenants

        store = open_key_store(settings)
        try:
            kept = s3.snapshot()  # Object Lock: alice's records are still there, unreadable
            assert len(kept) == len(events)
            originals = {e["event_id"]: orjson.loads(orjson.dumps(e)) for e in events}
            for eid, line in kept.items():
                back = decrypt_event(orjson.loads(line), store)
                if Selector("user", "alice").matches(originals[eid]):
                    assert back["input"] == ERASED and back["output"] == ERASED
                else:
                    assert back == originals[eid]  # other subjects still decrypt
            for line in f.snapshot().values():
                assert decrypt_event(orjson.loads(line), store)["input"] != ERASED
        finally:
            store.close()
        # no key of alice's anywhere, and no plaintext of hers in any byte stored
        raw = f.raw_bytes() + s3.all_versions_bytes()
        assert not any(s in raw for s in alice)
        assert not (tmp_path / "keys.sqlite").read_bytes().count(b"alice")

        code, again = _erase(capsys, cfg, "--user", "alice")  # idempotent
        assert code == 0 and again["keys"]["deleted"] == 0
        assert {r["sink"]: r["shredded"] for r in again["receipts"]} == {"file": 0, "s3": n}

        # `auditpipe decrypt` reads the file sink's segments (gzip too) back
        assert main(["decrypt", "--config", str(cfg), *map(str, f.files())]) == 0
        lines = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert len(lines) == len(events) - n
        assert all(e == originals[e["event_id"]] for e in lines)

    def test_erasing_a_tenant_shreds_its_users_records_and_no_other_tenants(
        self, tmp_path: Path, moto_s3: MotoS3, kafka_bootstrap: str, capsys: Any
    ) -> None:
        events, _f, s3, cfg, settings = self._load(tmp_path, moto_s3, kafka_bootstrap)
        code, out = _erase(capsys, cfg, "--tenant", "acme")
        n = sum(Selector("tenant", "acme").matches(e) for e in events)
        assert code == 0 and out["keys"]["deleted"] == 3  # acme's alice, bob and carol
        assert next(r for r in out["receipts"] if r["sink"] == "s3")["shredded"] == n
        store = open_key_store(settings)
        try:
            tenants = {e["event_id"]: subject_of(e)[0] for e in events}
            for eid, line in s3.snapshot().items():
                back = decrypt_event(orjson.loads(line), store)
                assert (back["input"] == ERASED) == (tenants[eid] == "acme")
            assert store.key_ids(user="alice")  # alice's globex key stays
        finally:
            store.close()

    def test_dry_run_and_non_subject_selectors_keep_the_keys(
        self, tmp_path: Path, moto_s3: MotoS3, kafka_bootstrap: str, capsys: Any
    ) -> None:
        events, _f, _s3, cfg, settings = self._load(tmp_path, moto_s3, kafka_bootstrap)
        code, dry = _erase(capsys, cfg, "--user", "alice", "--dry-run")
        assert code == 0 and dry["keys"] == {"found": 2, "deleted": 0, "kept": None}
        main(["erase", "--config", str(cfg), "--user", "alice", "--dry-run"])
        assert "keys: 2 would be deleted" in capsys.readouterr().out

        rid = next(e["request_id"] for e in events if Selector("user", "bob").matches(e))
        code, out = _erase(capsys, cfg, "--request-id", rid)
        assert code == 4  # the locked copy stays readable: skipped, and the keys stay
        assert "--request-id selects records" in out["keys"]["kept"]
        s3r = next(r for r in out["receipts"] if r["sink"] == "s3")
        assert s3r["shredded"] == 0 and sum(s3r["skipped"].values()) == 1
        code, out = _erase(capsys, cfg, "--user", "bob", "--sink", "s3")
        assert code == 4 and "--sink restricts" in out["keys"]["kept"]
        code, out = _erase(capsys, cfg, "--user", "carol", "--since", "2026-11-20T09:00Z")
        assert code == 4 and "--since/--until" in out["keys"]["kept"]
        store = open_key_store(settings)
        try:
            assert store.key_ids(user="bob") and store.key_ids(user="alice")
            assert store.key_ids(user="carol")
        finally:
            store.close()

    def test_keys_of_records_younger_than_min_retention_are_kept(
        self, tmp_path: Path, moto_s3: MotoS3, kafka_bootstrap: str, capsys: Any
    ) -> None:
        _, _f, _s3, cfg, _ = self._load(
            tmp_path, moto_s3, kafka_bootstrap, "min_retention_days = 3650\n"
        )
        code, out = _erase(capsys, cfg, "--user", "alice")
        assert code == 4 and "min_retention_days" in out["keys"]["kept"]
        assert out["keys"]["deleted"] == 0
        assert all(r["shredded"] == 0 and r["erased"] == 0 for r in out["receipts"])

    def test_a_wrong_master_key_stops_the_erasure_before_anything_changes(
        self, tmp_path: Path, moto_s3: MotoS3, kafka_bootstrap: str, capsys: Any,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:  # fmt: skip
        _, f, _s3, cfg, _ = self._load(tmp_path, moto_s3, kafka_bootstrap)
        before = f.snapshot()
        monkeypatch.setenv(MASTER_ENV, "33" * 32)
        assert main(["erase", "--config", str(cfg), "--user", "alice", "--yes"]) == 2
        assert "wrong master key" in capsys.readouterr().err
        assert f.snapshot() == before


class TestAvroLayout:
    def test_sealed_content_in_avro_objects_decrypts_and_shreds(
        self, tmp_path: Path, moto_s3: MotoS3
    ) -> None:
        store = SQLiteKeyStore(tmp_path / "k.sqlite")
        events = population(10)
        h = S3Harness(moto_s3, format="avro", encrypt_content=True)
        h.load(ContentCipher(store).encrypt_all(events))
        bodies = [v for k, v in h.objects().items() if k.endswith(".avro")]
        records = [r for body in bodies for r in fastavro.reader(io.BytesIO(body))]
        assert len(records) == len(events)
        store.delete_where(user="alice")
        originals = {e["event_id"]: e for e in events}
        for rec in records:
            back = decrypt_event(rec, store)
            if Selector("user", "alice").matches(originals[rec["event_id"]]):
                assert back["input"] == ERASED
            else:
                assert back["input"] == originals[rec["event_id"]]["input"]
        assert not any(b"secret" in body for body in bodies)
        store.close()


def test_key_store_latency_stays_off_the_event_path(tmp_path: Path) -> None:
    """The cipher asks the store once per subject while cached (a write path concern)."""
    calls: list[Any] = []
    store = SQLiteKeyStore(tmp_path / "k.sqlite")
    real = store.get_or_create
    store.get_or_create = lambda s: calls.append(s) or real(s)  # type: ignore[method-assign]
    cipher = ContentCipher(store, cache_secs=3600)
    cipher.encrypt_all(population(30))
    assert sorted(set(calls)) == sorted(calls) and len(calls) == 6
    cipher.cache_secs = 0
    cipher.encrypt_all(population(3))
    assert len(calls) == 9
