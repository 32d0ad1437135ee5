"""The one ``[kafka]`` client table: TLS end to end, SASL settings, the errors that name keys.

TLS: the embedded broker (Tansu) does not speak TLS with aiokafka, so a TLS-terminating TCP
proxy (auditpipe/tcpproxy.py with an ``ssl_context``) sits in front of it and the broker advertises
the proxy's port; every byte the clients exchange with the broker crosses that TLS listener,
which requires a client certificate (mTLS). SASL: Tansu keeps no SCRAM users and offers no
PLAIN, so SASL is tested up to aiokafka's and Faust's client objects (the kwargs they were
built with), not against a live SASL listener.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from auditpipe.schemas import decode, encode, new_event
from auditpipe.sinks.runner import SinkRunner
from auditpipe.sinks.stdout import StdoutSink

from auditpipe.broker import EmbeddedBroker, free_port, tune_for_embedded_broker
from auditpipe.errors import BrokerError, ConfigError
from auditpipe.kafka import (
    FileTokenProvider,
    client_kwargs,
    ensure_topics,
    faust_broker_options,
    producer_kwargs,
)
from auditpipe.settings import KafkaSettings, Settings, load_settings
from auditpipe.tcpproxy import TcpProxy

from .tlsutil import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(pki: Pki) -> Iterator[tuple[str, TcpProxy]]:
    """An embedded broker reachable only through a TLS listener (mTLS) that it advertises."""
    broker_port, tls_port = free_port(), free_port()
    proxy = TcpProxy(broker_port, tls_port, ssl_context=pki.server_context()).start()
    broker = EmbeddedBroker(port=broker_port, advertised_port=tls_port)
    broker.start()
    try:
        yield f"127.0.0.1:{tls_port}", proxy
    finally:
        broker.stop()
        proxy.stop()


def tls_env(bootstrap: str, pki: Pki, cafile: Path | None = None) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {
        "AUDITPIPE_KAFKA_BOOTSTRAP": bootstrap,
        "AUDITPIPE_KAFKA_SECURITY_PROTOCOL": "SSL",
        "AUDITPIPE_KAFKA_SSL_CAFILE": str(cafile or pki.ca),
        "AUDITPIPE_KAFKA_SSL_CERTFILE": str(pki.client_cert),
        "AUDITPIPE_KAFKA_SSL_KEYFILE": str(pki.client_key),
        "AUDITPIPE_KAFKA_SSL_KEY_PASSWORD_FILE": str(pki.client_key_password),
        "AUDITPIPE_KAFKA_RAW_TOPIC": f"tls-{suffix}.raw",
        "AUDITPIPE_KAFKA_EVENTS_TOPIC": f"tls-{suffix}.events",
        "AUDITPIPE_KAFKA_DLQ_TOPIC": f"tls-{suffix}.dlq",
        "AUDITPIPE_KAFKA_PARTITIONS": "1",
        "AUDITPIPE_RUNNER_GROUP_PREFIX": f"tls-{suffix}-sink-",
    }


class TestTls:
    def test_round_trip_over_mtls_with_the_right_ca(
        self, tls_broker: tuple[str, TcpProxy], pki: Pki
    ) -> None:
        """Topics are created, the hook's producer kwargs send, the sink runner reads: all TLS."""
        bootstrap, proxy = tls_broker
        settings = tune_for_embedded_broker(load_settings(env=tls_env(bootstrap, pki)))
        kafka = settings.kafka
        evs = [new_event(request_id=f"tls-{i}", model="m") for i in range(5)]

        async def scenario() -> list[str]:
            await ensure_topics(kafka)  # the admin client over TLS
            producer = AIOKafkaProducer(**producer_kwargs(kafka, settings.producer))
            await producer.start()
            try:
                for e in evs:
                    await producer.send_and_wait(kafka.events_topic, encode(e))
            finally:
                await producer.stop()
            out = io.BytesIO()
            runner = SinkRunner(StdoutSink(stream=out), settings)
            task = asyncio.create_task(runner.run())
            deadline = asyncio.get_running_loop().time() + 30
            try:
                while runner.stats.received < len(evs):
                    if task.done():
                        task.result()
                    assert asyncio.get_running_loop().time() < deadline, "runner read nothing"
                    await asyncio.sleep(0.02)
            finally:
                runner.stop()
                await asyncio.wait_for(task, 15)
            return [orjson.loads(line)["request_id"] for line in out.getvalue().splitlines()]

        assert sorted(asyncio.run(scenario())) == sorted(e["request_id"] for e in evs)
        assert proxy.connections > 0  # the clients went through the TLS listener

    def test_wrong_ca_fails_naming_ssl_cafile(
        self, tls_broker: tuple[str, TcpProxy], pki: Pki
    ) -> None:
        """A CA that did not sign the broker's certificate: BrokerError naming kafka.ssl_cafile."""
        bootstrap, _ = tls_broker
        settings = load_settings(env=tls_env(bootstrap, pki, cafile=pki.wrong_ca))
        with pytest.raises(BrokerError) as err:
            asyncio.run(ensure_topics(settings.kafka, timeout_secs=10))
        assert "kafka.ssl_cafile" in str(err.value)
        assert "certificate verify failed" in str(err.value) or "not trusted" in str(err.value)

    def test_wrong_ca_stops_the_sink_runner_naming_ssl_cafile(
        self, tls_broker: tuple[str, TcpProxy], pki: Pki
    ) -> None:
        """The runner's clients (consumer, DLQ producer) raise the same error, not a retry loop."""
        bootstrap, _ = tls_broker
        settings = load_settings(env=tls_env(bootstrap, pki, cafile=pki.wrong_ca))
        runner = SinkRunner(StdoutSink(stream=io.BytesIO()), settings)
        with pytest.raises(BrokerError, match=r"kafka\.ssl_cafile"):
            asyncio.run(asyncio.wait_for(runner.run(), 30))

    def test_no_client_certificate_for_an_mtls_listener_names_ssl_certfile(
        self, tls_broker: tuple[str, TcpProxy], pki: Pki
    ) -> None:
        """The listener wants a client certificate and gets none: the error names the keys."""
        bootstrap, _ = tls_broker
        env = tls_env(bootstrap, pki)
        for key in ("CERTFILE", "KEYFILE", "KEY_PASSWORD_FILE"):
            del env[f"AUDITPIPE_KAFKA_SSL_{key}"]
        with pytest.raises(BrokerError) as err:
            asyncio.run(ensure_topics(load_settings(env=env).kafka, timeout_secs=10))
        assert "set kafka.ssl_certfile and kafka.ssl_keyfile" in str(err.value)

    def test_cli_topics_with_wrong_ca_exits_1_naming_the_key(
        self, tls_broker: tuple[str, TcpProxy], pki: Pki
    ) -> None:
        """`auditpipe topics` (and every command) prints the key to fix, not a traceback."""
        bootstrap, _ = tls_broker
        env = {**os.environ, **tls_env(bootstrap, pki, cafile=pki.wrong_ca)}
        p = subprocess.run([sys.executable, "-m", "auditpipe", "topics"], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert p.returncode == 1, p.stderr
        assert "kafka.ssl_cafile" in p.stderr and "Traceback" not in p.stderr

    def test_cli_topics_creates_over_tls(self, tls_broker: tuple[str, TcpProxy], pki: Pki) -> None:
        """With the right CA the same command creates and lists the topics."""
        bootstrap, _ = tls_broker
        env = {**os.environ, **tls_env(bootstrap, pki)}
        p = subprocess.run([sys.executable, "-m", "auditpipe", "topics", "--create"], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert env["AUDITPIPE_KAFKA_RAW_TOPIC"] in p.stdout and "created" in p.stdout

    def test_wrong_key_password_is_a_config_error_naming_the_keys(
        self, pki: Pki, tmp_path: Path
    ) -> None:
        """An encrypted key that its password file does not open fails before connecting."""
        bad = tmp_path / "bad.password"
        bad.write_text("not it\n")
        env = tls_env("127.0.0.1:9", pki)
        env["AUDITPIPE_KAFKA_SSL_KEY_PASSWORD_FILE"] = str(bad)
        with pytest.raises(ConfigError, match=r"kafka\.ssl_certfile / kafka\.ssl_keyfile"):
            client_kwargs(load_settings(env=env).kafka)

    def test_processor_worker_runs_over_mtls(
        self, tls_broker: tuple[str, TcpProxy], pki: Pki, tmp_path: Path
    ) -> None:
        """`auditpipe process` (Faust) with the TLS keys in its environment: raw -> events."""
        bootstrap, _ = tls_broker
        env = tls_env(bootstrap, pki)
        env.update(
            {
                "AUDITPIPE_PROCESSORS_APP_ID": f"tls-{uuid.uuid4().hex[:8]}-processors",
                "AUDITPIPE_PROCESSORS_DATA_DIR": str(tmp_path / "faust"),
                "AUDITPIPE_PROCESSORS_SESSION_TIMEOUT_SECS": "3",
                "AUDITPIPE_PROCESSORS_HEARTBEAT_INTERVAL_SECS": "0.5",
            }
        )
        settings = load_settings(env=env)
        kafka = settings.kafka
        evs = [new_event(request_id=f"w{i}", model="m") for i in range(10)]
        asyncio.run(ensure_topics(kafka))
        clean = {k: v for k, v in os.environ.items() if not k.startswith("AUDITPIPE_")}
        log = open(tmp_path / "worker.log", "wb")
        cmd = [sys.executable, "-m", "auditpipe", "process"]
        worker = subprocess.Popen(cmd, env={**clean, **env}, stdout=subprocess.DEVNULL, stderr=log)

        async def scenario() -> list[str]:
            producer = AIOKafkaProducer(**producer_kwargs(kafka, settings.producer))
            await producer.start()
            try:
                for e in evs:
                    await producer.send_and_wait(kafka.raw_topic, encode(e))
            finally:
                await producer.stop()
            consumer = AIOKafkaConsumer(
                kafka.events_topic, auto_offset_reset="earliest", **client_kwargs(kafka)
            )
            await consumer.start()
            got: list[str] = []
            deadline = asyncio.get_running_loop().time() + 90
            try:
                while len(got) < len(evs):
                    assert worker.poll() is None, (tmp_path / "worker.log").read_text()
                    assert asyncio.get_running_loop().time() < deadline, "nothing processed"
                    batch = await consumer.getmany(timeout_ms=200)
                    got += [decode(r.value)["request_id"] for rs in batch.values() for r in rs]
            finally:
                await consumer.stop()
            return got

        try:
            assert sorted(asyncio.run(scenario())) == sorted(e["request_id"] for e in evs)
        finally:
            worker.terminate()
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            log.close()

    def test_producer_hook_sends_over_mtls(
        self, tls_broker: tuple[str, TcpProxy], pki: Pki, tmp_path: Path
    ) -> None:
        """AuditProducer (the middleware's, the proxy's) with the TLS keys: events on raw."""
        from auditpipe.producer import AuditProducer

        bootstrap, _ = tls_broker
        env = tls_env(bootstrap, pki)
        env["AUDITPIPE_PRODUCER_SPOOL_DIR"] = str(tmp_path / "spool")
        settings = load_settings(env=env)
        kafka = settings.kafka
        asyncio.run(ensure_topics(kafka))
        producer = AuditProducer(settings).start()
        for i in range(20):
            assert producer.emit(new_event(request_id=f"h{i}", model="m"))
        stats = producer.stop()
        assert stats["sent"] == 20, stats

        async def read() -> list[str]:
            consumer = AIOKafkaConsumer(
                kafka.raw_topic, auto_offset_reset="earliest", **client_kwargs(kafka)
            )
            await consumer.start()
            got: list[str] = []
            deadline = asyncio.get_running_loop().time() + 30
            try:
                while len(got) < 20 and asyncio.get_running_loop().time() < deadline:
                    batch = await consumer.getmany(timeout_ms=200)
                    got += [decode(r.value)["request_id"] for rs in batch.values() for r in rs]
            finally:
                await consumer.stop()
            return got

        assert sorted(asyncio.run(read())) == sorted(f"h{i}" for i in range(20))

    def test_producer_hook_with_wrong_ca_logs_the_key_and_spools(
        self,
        tls_broker: tuple[str, TcpProxy],
        pki: Pki,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """The hook never raises into the app: it warns naming kafka.ssl_cafile and spools."""
        from auditpipe.producer import AuditProducer

        from .conftest import wait_until

        bootstrap, _ = tls_broker
        env = tls_env(bootstrap, pki, cafile=pki.wrong_ca)
        env["AUDITPIPE_PRODUCER_SPOOL_DIR"] = str(tmp_path / "spool")
        env["AUDITPIPE_PRODUCER_STOP_TIMEOUT_SECS"] = "0.5"
        caplog.set_level("WARNING", logger="auditpipe.producer")
        producer = AuditProducer(load_settings(env=env)).start()
        try:
            assert producer.emit(new_event(request_id="x", model="m"))
            wait_until(
                lambda: any("kafka.ssl_cafile" in r.getMessage() for r in caplog.records),
                30,
                "the producer's warning naming kafka.ssl_cafile",
            )
        finally:
            stats = producer.stop()
        assert stats["sent"] == 0

    def test_a_cafile_that_is_not_pem_names_the_key(self, pki: Pki, tmp_path: Path) -> None:
        """A readable file that holds no certificate: ConfigError naming kafka.ssl_cafile."""
        junk = tmp_path / "ca.pem"
        junk.write_text("not a certificate\n")
        env = tls_env("127.0.0.1:9093", pki, cafile=junk)
        with pytest.raises(ConfigError, match=r"kafka\.ssl_cafile: .* is not a PEM CA"):
            client_kwargs(load_settings(env=env).kafka)

    def test_ssl_check_hostname_reaches_the_context(self, pki: Pki) -> None:
        """ssl_check_hostname (default true) is the context's check_hostname; CA required."""
        env = tls_env("127.0.0.1:9093", pki)
        ctx = client_kwargs(load_settings(env=env).kafka)["ssl_context"]
        assert ctx.check_hostname is True and ctx.verify_mode.name == "CERT_REQUIRED"
        env["AUDITPIPE_KAFKA_SSL_CHECK_HOSTNAME"] = "false"
        ctx = client_kwargs(load_settings(env=env).kafka)["ssl_context"]
        assert ctx.check_hostname is False and ctx.verify_mode.name == "CERT_REQUIRED"

    def test_faust_app_gets_the_same_tls_context(self, pki: Pki) -> None:
        """The processors' Faust app is built with SSL credentials from the same table."""
        from auditpipe.processors.app import create_app
        from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

        settings = load_settings(env=tls_env("127.0.0.1:9093", pki))
        app = create_app(settings)
        auth = credentials_to_aiokafka_auth(app.conf.broker_credentials)
        assert auth["security_protocol"] == "SSL"
        assert auth["ssl_context"].verify_mode.name == "CERT_REQUIRED"
        assert [str(u) for u in app.conf.broker] == ["kafka://127.0.0.1:9093"]


def sasl_settings(tmp_path: Path, **kafka: Any) -> KafkaSettings:
    env = {"AUDITPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:9092"}
    env.update({f"AUDITPIPE_KAFKA_{k.upper()}": str(v) for k, v in kafka.items()})
    return load_settings(env=env).kafka


class TestSasl:
    @pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
    def test_password_mechanisms_reach_every_aiokafka_client(
        self, tmp_path: Path, mechanism: str
    ) -> None:
        """Producer, consumer and admin client are built with the mechanism and credentials."""
        kafka = sasl_settings(tmp_path, security_protocol="SASL_PLAINTEXT",
                              sasl_mechanism=mechanism, sasl_username="audit",
                              sasl_password="s3cret")  # fmt: skip

        async def build() -> list[Any]:
            p = AIOKafkaProducer(**producer_kwargs(kafka, Settings().producer))
            c = AIOKafkaConsumer(**client_kwargs(kafka))
            a = AIOKafkaAdminClient(**client_kwargs(kafka))
            clients = [p.client, c._client, a._client]
            await p.stop()
            await c.stop()
            await a.close()
            return clients

        for client in asyncio.run(build()):
            assert client._security_protocol == "SASL_PLAINTEXT"
            assert client._sasl_mechanism == mechanism
            assert client._sasl_plain_username == "audit"
            assert client._sasl_plain_password == "s3cret"

    def test_password_file_and_sasl_ssl_for_faust(self, tmp_path: Path, pki: Pki) -> None:
        """SASL_SSL + SCRAM: Faust gets SASLCredentials with the password file and TLS."""
        from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

        pw = tmp_path / "pw"
        pw.write_text("from-a-file\n")
        kafka = sasl_settings(tmp_path, security_protocol="SASL_SSL", ssl_cafile=pki.ca,
                              sasl_mechanism="SCRAM-SHA-512", sasl_username="audit",
                              sasl_password_file=pw)  # fmt: skip
        auth = credentials_to_aiokafka_auth(faust_broker_options(kafka)["broker_credentials"])
        assert auth["security_protocol"] == "SASL_SSL"
        assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
        assert auth["sasl_plain_password"] == "from-a-file"
        assert auth["ssl_context"] is not None

    def test_oauthbearer_reads_the_token_file_at_each_authentication(self, tmp_path: Path) -> None:
        """OAUTHBEARER: a token provider over the file; a refreshed file gives the new token."""
        token = tmp_path / "token"
        token.write_text("tok-1\n")
        kafka = sasl_settings(
            tmp_path,
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="OAUTHBEARER",
            sasl_oauth_token_file=token,
        )
        provider = client_kwargs(kafka)["sasl_oauth_token_provider"]
        assert isinstance(provider, FileTokenProvider)
        assert asyncio.run(provider.token()) == "tok-1"
        token.write_text("tok-2\n")
        assert asyncio.run(provider.token()) == "tok-2"

        async def build() -> Any:
            c = AIOKafkaConsumer(**client_kwargs(kafka))
            client = c._client
            await c.stop()
            return client

        assert isinstance(asyncio.run(build())._sasl_oauth_token_provider, FileTokenProvider)

    def test_oauthbearer_against_the_embedded_broker_fails_cleanly(
        self, kafka_bootstrap: str, tmp_path: Path
    ) -> None:
        """aiokafka accepts the provider at connect time; Tansu's refusal is a BrokerError."""
        token = tmp_path / "token"
        token.write_text("tok\n")
        kafka = sasl_settings(tmp_path, bootstrap=kafka_bootstrap,
                              security_protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
                              sasl_oauth_token_file=token)  # fmt: skip
        with pytest.raises(BrokerError) as err:
            asyncio.run(ensure_topics(kafka, timeout_secs=10))
        assert "AbstractTokenProvider" not in str(err.value)
        assert "SASL OAUTHBEARER authentication" in str(err.value)

    def test_scram_against_the_embedded_broker_fails_cleanly(
        self, kafka_bootstrap: str, tmp_path: Path
    ) -> None:
        """Tansu has no SCRAM users: the admin client fails with BrokerError, not a hang."""
        kafka = sasl_settings(tmp_path, bootstrap=kafka_bootstrap,
                              security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                              sasl_username="nobody", sasl_password="wrong")  # fmt: skip
        with pytest.raises(BrokerError) as err:
            asyncio.run(ensure_topics(kafka, timeout_secs=10))
        assert "SASL SCRAM-SHA-256 authentication" in str(err.value)
        assert "kafka.sasl_mechanism" in str(err.value) and "wrong" not in str(err.value)


SECRET = "hunter2-do-not-print"


class TestValidation:
    @pytest.mark.parametrize(
        ("env", "expected"),
        [
            ({"SECURITY_PROTOCOL": "SASL_SSL"}, "needs kafka.sasl_mechanism"),
            ({"SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "needs kafka.sasl_mechanism"),
            ({"SECURITY_PROTOCOL": "TLS"}, "security_protocol"),
            ({"SECURITY_PROTOCOL": "SSL", "SSL_CERTFILE": "{ca}"}, "needs kafka.ssl_keyfile"),
            ({"SECURITY_PROTOCOL": "SSL", "SSL_KEYFILE": "{ca}"}, "needs kafka.ssl_certfile"),
            ({"SECURITY_PROTOCOL": "SSL", "SSL_CAFILE": "/no/such/ca.pem"},
             "kafka.ssl_cafile: /no/such/ca.pem does not exist"),
            ({"SSL_CAFILE": "{ca}"}, 'set security_protocol = "SSL"'),
            ({"SASL_MECHANISM": "PLAIN"}, 'set security_protocol = "SASL_SSL"'),
            ({"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "SCRAM-SHA-512",
              "SASL_PASSWORD": SECRET}, "needs kafka.sasl_username"),
            ({"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "PLAIN", "SASL_USERNAME": "u"},
             "AUDITPIPE_KAFKA_SASL_PASSWORD or kafka.sasl_password_file"),
            ({"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "PLAIN", "SASL_USERNAME": "u",
              "SASL_PASSWORD": SECRET, "SASL_PASSWORD_FILE": "{ca}"}, "keep one"),
            ({"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "OAUTHBEARER"},
             "needs kafka.sasl_oauth_token_file"),
            ({"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "GSSAPI"}, "sasl_mechanism"),
            ({"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "SCRAM-SHA-256",
              "SASL_USERNAME": "u", "SASL_PASSWORD_FILE": "/no/pw"},
             "kafka.sasl_password_file: /no/pw does not exist"),
            ({"RAW_RETENTION_SECS": "0"}, "kafka.raw_retention_secs"),
        ],
    )  # fmt: skip
    def test_bad_combination_names_the_key_and_the_fix(
        self, env: dict[str, str], expected: str, pki: Pki
    ) -> None:
        """Each bad combination is a ConfigError at load naming the key; secrets never shown."""
        full = {f"AUDITPIPE_KAFKA_{k}": v.format(ca=pki.ca) for k, v in env.items()}
        with pytest.raises(ConfigError) as err:
            load_settings(env=full)
        assert expected in str(err.value)
        assert SECRET not in str(err.value)

    def test_password_is_never_in_repr_or_dump(self) -> None:
        """SecretStr: repr, str and model_dump (the default) hide the password."""
        kafka = load_settings(env={"AUDITPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                                   "AUDITPIPE_KAFKA_SASL_MECHANISM": "PLAIN",
                                   "AUDITPIPE_KAFKA_SASL_USERNAME": "u",
                                   "AUDITPIPE_KAFKA_SASL_PASSWORD": SECRET}).kafka  # fmt: skip
        assert SECRET not in repr(kafka) and SECRET not in str(kafka)
        assert SECRET not in str(kafka.model_dump())

    def test_cli_reports_bad_security_settings_with_exit_2(self) -> None:
        """`auditpipe topics` with SASL_SSL and no mechanism: exit 2, the key named."""
        env = {**os.environ, "AUDITPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:9",
               "AUDITPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
               "AUDITPIPE_KAFKA_SASL_PASSWORD": SECRET}  # fmt: skip
        p = subprocess.run([sys.executable, "-m", "auditpipe", "topics"], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert p.returncode == 2
        assert "kafka.sasl_mechanism" in p.stderr and SECRET not in p.stderr
