"""Kafka client settings every part shares, and the pipeline's topics.

aiokafka speaks only InitProducerId v0, in which the request carries no producer id or epoch.
Tansu (the embedded broker) rejects that version with UnknownError, so an idempotent aiokafka
producer cannot start on it. :func:`install_init_producer_id_v3` teaches aiokafka the v3 form
of the same request (explicit ``producer_id=-1, producer_epoch=-1``, as Apache Kafka clients
send since 2.5). Version negotiation is unchanged: a broker that does not offer v3 still gets v0.
It changes aiokafka for the whole process, so it is a setting (``[kafka] init_producer_id_v3``,
on by default for the embedded broker's sake) and :func:`uninstall_init_producer_id_v3` undoes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from dataclasses import dataclass
from typing import Any

from .errors import BrokerError, ConfigError
from .settings import KafkaSettings, ProducerSettings

_V3_INSTALLED = False
_V3_ORIGINAL: tuple[Any, Any] | None = None  # aiokafka's (_CLASSES, build), to put back


def install_init_producer_id_v3() -> None:
    """Register InitProducerId v3 with aiokafka's version negotiation (idempotent)."""
    global _V3_INSTALLED, _V3_ORIGINAL
    if _V3_INSTALLED:
        return
    from aiokafka.protocol import transaction as txn
    from aiokafka.protocol.api import RequestStruct, Response
    from aiokafka.protocol.types import CompactString, Int16, Int32, Int64, Schema, TaggedFields

    class InitProducerIdResponse_v3(Response):
        FLEXIBLE_VERSION = True
        API_KEY = 22
        API_VERSION = 3
        SCHEMA = Schema(
            ("throttle_time_ms", Int32),
            ("error_code", Int16),
            ("producer_id", Int64),
            ("producer_epoch", Int16),
            ("tags", TaggedFields),
        )

    class InitProducerIdRequest_v3(RequestStruct):
        FLEXIBLE_VERSION = True
        API_KEY = 22
        API_VERSION = 3
        RESPONSE_TYPE = InitProducerIdResponse_v3
        SCHEMA = Schema(
            ("transactional_id", CompactString("utf-8")),
            ("transaction_timeout_ms", Int32),
            ("producer_id", Int64),
            ("producer_epoch", Int16),
            ("tags", TaggedFields),
        )

    request = txn.InitProducerIdRequest
    build_v0 = request.build
    _V3_ORIGINAL = (request._CLASSES, build_v0)

    def build(self: Any, struct_class: Any) -> Any:
        if struct_class is InitProducerIdRequest_v3:
            return struct_class(self._transactional_id, self._transaction_timeout_ms, -1, -1, {})
        return build_v0(self, struct_class)

    request._CLASSES = (txn.InitProducerIdRequest_v0, InitProducerIdRequest_v3)
    request.build = build
    _V3_INSTALLED = True


def uninstall_init_producer_id_v3() -> None:
    """Put aiokafka's InitProducerId back as it was (producers created later use v0 only)."""
    global _V3_INSTALLED, _V3_ORIGINAL
    if not _V3_INSTALLED or _V3_ORIGINAL is None:
        return
    from aiokafka.protocol import transaction as txn

    txn.InitProducerIdRequest._CLASSES, txn.InitProducerIdRequest.build = _V3_ORIGINAL
    _V3_INSTALLED, _V3_ORIGINAL = False, None


# -- one client configuration for every Kafka client ------------------------------------------


def _read_secret_file(path: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"kafka.{key}: cannot read {path} ({exc.strerror})") from None
    if not value:
        raise ConfigError(f"kafka.{key}: {path} is empty")
    return value


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    """The TLS context of ``[kafka]`` (CA, client certificate, hostname check)."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=kafka.ssl_cafile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"kafka.ssl_cafile: {kafka.ssl_cafile} is not a PEM CA certificate file ({exc})"
        ) from None
    ctx.check_hostname = kafka.ssl_check_hostname
    if kafka.ssl_certfile:
        password = (
            _read_secret_file(kafka.ssl_key_password_file, "ssl_key_password_file")
            if kafka.ssl_key_password_file
            else None
        )
        try:
            ctx.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile, password=password)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"kafka.ssl_certfile / kafka.ssl_keyfile: cannot load {kafka.ssl_certfile} with "
                f"key {kafka.ssl_keyfile} ({exc}); check that the key matches the certificate"
                " and, for an encrypted key, kafka.ssl_key_password_file"
            ) from None
    return ctx


class FileTokenProvider:
    """OAUTHBEARER tokens read from a file at every authentication (so it can be refreshed).

    aiokafka asks at every connection's authentication. Registered as a virtual subclass of
    aiokafka's ``AbstractTokenProvider`` when first used (aiokafka is imported lazily here).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    async def token(self) -> str:
        return _read_secret_file(self.path, "sasl_oauth_token_file")

    def extensions(self) -> dict[str, str]:
        return {}


def client_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """The connection arguments of every aiokafka client auditpipe builds.

    ``bootstrap_servers`` and the ``[kafka]`` security keys as aiokafka names them. Secrets are
    read from their files here, when a client is built, and are never logged.
    """
    kwargs: dict[str, Any] = {
        "bootstrap_servers": require_bootstrap(kafka),
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = ssl_context(kafka)
    mech = kafka.sasl_mechanism
    if kafka.security_protocol.startswith("SASL_") and mech is not None:
        kwargs["sasl_mechanism"] = mech
        if mech == "OAUTHBEARER":
            assert kafka.sasl_oauth_token_file  # settings validation
            from aiokafka.abc import AbstractTokenProvider

            AbstractTokenProvider.register(FileTokenProvider)
            kwargs["sasl_oauth_token_provider"] = FileTokenProvider(kafka.sasl_oauth_token_file)
        else:
            kwargs["sasl_plain_username"] = kafka.sasl_username
            kwargs["sasl_plain_password"] = (
                kafka.sasl_password.get_secret_value()
                if kafka.sasl_password is not None
                else _read_secret_file(kafka.sasl_password_file or "", "sasl_password_file")
            )
    return kwargs


def faust_broker_options(kafka: KafkaSettings) -> dict[str, Any]:
    """``faust.App`` options for the same connection: ``broker`` URLs and ``broker_credentials``.

    Built from :func:`client_kwargs`, so the processors connect exactly as the other clients.
    """
    import faust

    kw = client_kwargs(kafka)
    options: dict[str, Any] = {
        "broker": ",".join(f"kafka://{b.strip()}" for b in kw["bootstrap_servers"].split(",")),
    }
    mech = kw.get("sasl_mechanism")
    credentials: Any = None
    if mech == "OAUTHBEARER":
        credentials = faust.OAuthCredentials(
            oauth_cb=kw["sasl_oauth_token_provider"], ssl_context=kw.get("ssl_context")
        )
    elif mech is not None:
        credentials = faust.SASLCredentials(
            username=kw["sasl_plain_username"],
            password=kw["sasl_plain_password"],
            ssl_context=kw.get("ssl_context"),
            mechanism=mech,
        )
    elif "ssl_context" in kw:
        credentials = faust.SSLCredentials(kw["ssl_context"])
    if credentials is not None:
        options["broker_credentials"] = credentials
    return options


_TLS_FAILURE_HINT = (
    "set kafka.ssl_cafile (AUDITPIPE_KAFKA_SSL_CAFILE) to the CA that signed the broker's "
    "certificate"
)


async def tls_problem(kafka: KafkaSettings, timeout_secs: float = 5.0) -> str | None:
    """Connect to the first bootstrap broker with ``[kafka]``'s TLS; say what fails, or None.

    aiokafka reports a failed handshake as "Unable to bootstrap"; this names the key instead.
    """
    if kafka.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    ctx = ssl_context(kafka)
    first = require_bootstrap(kafka).split(",")[0].strip()
    host, _, port = first.rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), ssl=ctx), timeout_secs
        )
    except ssl.SSLCertVerificationError as exc:
        what = (
            f"the CAs in kafka.ssl_cafile ({kafka.ssl_cafile})"
            if kafka.ssl_cafile
            else "the system CAs (kafka.ssl_cafile is not set)"
        )
        return (
            f"TLS to Kafka at {first} failed: its certificate is not trusted by {what}: "
            f"{exc.verify_message}; {_TLS_FAILURE_HINT}"
            + (
                " (or, for a certificate without this host name, kafka.ssl_check_hostname = false)"
                if "hostname" in str(exc).lower() or "ip address" in str(exc).lower()
                else ""
            )
        )
    except ssl.SSLError as exc:
        return (
            f"TLS to Kafka at {first} failed ({exc.reason or exc}): check kafka.security_protocol"
            " (is the listener TLS?), kafka.ssl_cafile and, if the broker requires client "
            "certificates, kafka.ssl_certfile / kafka.ssl_keyfile"
        )
    except (OSError, TimeoutError):
        return None  # not a TLS problem: the caller's own error says it
    try:
        # With TLS 1.3 a broker that requires a client certificate refuses it only after the
        # handshake: one request (ApiVersions v0) and the start of its answer show it.
        client_id = b"auditpipe-tls-check"
        body = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
        writer.write(struct.pack(">i", len(body)) + body)
        await asyncio.wait_for(writer.drain(), timeout_secs)
        await asyncio.wait_for(reader.readexactly(4), timeout_secs)
    except (ssl.SSLError, asyncio.IncompleteReadError, ConnectionError) as exc:
        # an alert (Apache Kafka: certificate required/unknown CA), or a close or reset right
        # after the handshake (proxies; every Kafka broker answers ApiVersions v0)
        why = (
            f"refused the TLS session ({exc.reason or exc})"
            if isinstance(exc, ssl.SSLError)
            else "closed the TLS connection after the handshake without answering"
        )
        fix = (
            "if it requires client certificates, set kafka.ssl_certfile and kafka.ssl_keyfile"
            if not kafka.ssl_certfile
            else f"check that kafka.ssl_certfile ({kafka.ssl_certfile}) is signed by a CA the "
            "broker trusts"
        )
        return f"Kafka at {first} {why}: {fix}"
    except OSError:  # TimeoutError included: a slow broker is not a TLS answer
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return None


async def sasl_problem(kafka: KafkaSettings, timeout_secs: float = 5.0) -> str | None:
    """Authenticate once to the first bootstrap broker with ``[kafka]``'s SASL; say what fails.

    aiokafka only logs the broker's reason (e.g. UnsupportedSaslMechanismError) and then
    reports "Unable to bootstrap"; this returns it with the keys to check.
    """
    if not kafka.security_protocol.startswith("SASL_"):
        return None
    from aiokafka.conn import create_conn
    from aiokafka.errors import KafkaConnectionError, KafkaError

    kw = client_kwargs(kafka)
    first = kw.pop("bootstrap_servers").split(",")[0].strip()
    host, _, port = first.rpartition(":")
    try:
        conn = await asyncio.wait_for(
            create_conn(host, int(port), request_timeout_ms=int(timeout_secs * 1000), **kw),
            timeout_secs,
        )
    except (KafkaConnectionError, OSError, TimeoutError, ssl.SSLError):
        return None  # unreachable or TLS: not a SASL answer
    except KafkaError as exc:
        return (
            f"SASL {kafka.sasl_mechanism} authentication with Kafka at {first} failed "
            f"({type(exc).__name__}: {exc}): check kafka.sasl_mechanism (one the broker "
            "enables), kafka.sasl_username and the password (kafka.sasl_password / "
            "sasl_password_file) or kafka.sasl_oauth_token_file"
        )
    conn.close()
    return None


async def connect_problem(kafka: KafkaSettings) -> str | None:
    """Why ``[kafka]``'s TLS or SASL settings do not connect to the first broker, or None."""
    return await tls_problem(kafka) or await sasl_problem(kafka)


async def start_client(client: Any, kafka: KafkaSettings) -> None:
    """``await client.start()``; a TLS or SASL failure raises BrokerError naming the keys."""
    try:
        await client.start()
    except Exception as exc:
        problem = await connect_problem(kafka)
        if problem:
            raise BrokerError(problem) from exc
        raise


async def preflight(kafka: KafkaSettings) -> None:
    """Check TLS and SASL against the first broker before a long-running command starts."""
    problem = await connect_problem(kafka)
    if problem:
        raise BrokerError(problem)


def require_bootstrap(kafka: KafkaSettings) -> str:
    if not kafka.bootstrap:
        raise ConfigError(
            "kafka.bootstrap is not set: set AUDITPIPE_KAFKA_BOOTSTRAP=host:port (or [kafka] "
            "bootstrap in the settings file), or run the whole pipeline with `auditpipe dev`"
        )
    return kafka.bootstrap


def producer_kwargs(kafka: KafkaSettings, producer: ProducerSettings) -> dict[str, Any]:
    """AIOKafkaProducer arguments: acks=all, idempotence, compression, batching."""
    if kafka.init_producer_id_v3:
        install_init_producer_id_v3()
    return {
        **client_kwargs(kafka),
        "client_id": kafka.client_id,
        "acks": "all",
        "enable_idempotence": producer.enable_idempotence,
        "compression_type": None if producer.compression == "none" else producer.compression,
        "linger_ms": producer.linger_ms,
        "max_batch_size": producer.max_batch_bytes,
        "request_timeout_ms": kafka.request_timeout_ms,
    }


def pipeline_topics(kafka: KafkaSettings) -> list[str]:
    return [kafka.raw_topic, kafka.events_topic, kafka.dlq_topic]


@dataclass(frozen=True)
class TopicSpec:
    """A topic of the pipeline as auditpipe creates it."""

    name: str
    role: str  # raw, events, dlq
    partitions: int
    replication_factor: int
    retention_secs: int

    @property
    def configs(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_secs * 1000)}


def topic_specs(kafka: KafkaSettings) -> list[TopicSpec]:
    """raw, events and dlq with ``[kafka]`` partitions and ``*_retention_secs``."""
    p, r = kafka.partitions, kafka.replication_factor
    return [
        TopicSpec(kafka.raw_topic, "raw", p, r, kafka.raw_retention_secs),
        TopicSpec(kafka.events_topic, "events", p, r, kafka.events_retention_secs),
        TopicSpec(kafka.dlq_topic, "dlq", p, r, kafka.dlq_retention_secs),
    ]


@contextlib.asynccontextmanager
async def admin_client(kafka: KafkaSettings, timeout_secs: float = 15.0) -> Any:
    """A started AIOKafkaAdminClient; connection failures raise BrokerError saying why."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(
        **client_kwargs(kafka),
        client_id=f"{kafka.client_id}-admin",
        request_timeout_ms=int(timeout_secs * 1000),
    )
    try:
        try:
            await asyncio.wait_for(start_client(admin, kafka), timeout_secs)
        except (TimeoutError, KafkaError, OSError) as exc:
            raise BrokerError(
                f"Kafka at {kafka.bootstrap} did not answer ({type(exc).__name__}: {exc})"
            ) from exc
        yield admin
    finally:
        await admin.close()


async def create_missing_topics(admin: Any, kafka: KafkaSettings) -> list[str]:
    """Create the pipeline's missing topics with their retention; return the created names."""
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    existing = set(await admin.list_topics())
    missing = [t for t in topic_specs(kafka) if t.name not in existing]
    if not missing:
        return []
    new = [
        NewTopic(t.name, t.partitions, t.replication_factor, topic_configs=t.configs)
        for t in missing
    ]
    response = await admin.create_topics(new)
    created = []
    for topic, code, *rest in response.topic_errors:
        if code not in (0, TopicAlreadyExistsError.errno):
            raise BrokerError(f"could not create topic {topic}: error {code} {rest}")
        if code == 0:
            created.append(topic)
    return created


async def ensure_topics(kafka: KafkaSettings, timeout_secs: float = 15.0) -> None:
    """Create the pipeline's topics if missing (existing ones are left alone)."""
    from aiokafka.errors import KafkaError

    async with admin_client(kafka, timeout_secs) as admin:
        try:
            await create_missing_topics(admin, kafka)
        except (TimeoutError, KafkaError, OSError) as exc:
            raise BrokerError(
                f"Kafka at {kafka.bootstrap} did not answer ({type(exc).__name__}: {exc})"
            ) from exc


@dataclass(frozen=True)
class TopicState:
    """A topic as the cluster reports it (``auditpipe topics``); ``partitions`` 0: missing."""

    name: str
    role: str  # raw, events, dlq, or "other" (a topic auditpipe does not create)
    partitions: int
    retention_ms: int | None  # None: the broker did not report it
    wanted_retention_ms: int | None  # what auditpipe creates it with (pipeline topics)

    @property
    def exists(self) -> bool:
        return self.partitions > 0


async def describe_topics(admin: Any, kafka: KafkaSettings) -> list[TopicState]:
    """The pipeline's topics (existing or not), then every other non-internal topic."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    existing = sorted(t for t in await admin.list_topics() if not t.startswith("__"))
    specs = topic_specs(kafka)
    names = [s.name for s in specs] + [t for t in existing if t not in pipeline_topics(kafka)]
    present = [n for n in names if n in existing]
    partitions: dict[str, int] = {}
    retention: dict[str, int] = {}
    if present:
        for topic in await admin.describe_topics(present):
            if topic["error_code"] == 0:
                partitions[topic["topic"]] = len(topic["partitions"])
        # every config of each topic: Tansu closes the connection when names are filtered
        resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in present]
        for response in await admin.describe_configs(resources):
            for error_code, _msg, _type, name, entries, *_ in response.resources:
                if error_code != 0:
                    continue
                for entry in entries:
                    if entry[0] == "retention.ms" and entry[1] is not None:
                        with contextlib.suppress(ValueError):
                            retention[name] = int(entry[1])
    by_name = {s.name: s for s in specs}
    return [
        TopicState(
            name=n,
            role=by_name[n].role if n in by_name else "other",
            partitions=partitions.get(n, 0),
            retention_ms=retention.get(n),
            wanted_retention_ms=by_name[n].retention_secs * 1000 if n in by_name else None,
        )
        for n in names
    ]
