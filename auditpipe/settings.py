"""Settings shared by every part: one TOML file, overridden by environment variables.

File layout (every table optional; unknown keys are rejected)::

    [kafka]      bootstrap, topics, partitions           -> KafkaSettings
    [producer]   queue, batching, compression             -> ProducerSettings
    [processors] Faust worker                             -> ProcessorSettings
    [runner]     sink runner batching                     -> RunnerSettings
    [source]     service / instance names put on events  -> SourceSettings
    [registry]   Confluent Schema Registry (optional)     -> RegistrySettings
    [proxy]      the auditing reverse proxy               -> ProxySettings
    [ingest]     audit JSONL from files / stdin           -> IngestSettings
    [receiver]   the KServe inference-logger receiver     -> ReceiverSettings
    [serve]      `auditpipe serve`: API keys, host, port  -> ServeSettings
    [privacy]    erasure and retention                    -> PrivacySettings
    [sinks.NAME] the settings of sink NAME (validated by that sink's own model)
    [pipeline]   processor steps and [pipeline.STEP] tables (validated by auditpipe.processors)

    [logging]    format, level (per-logger), utc          -> LoggingSettings
    [metrics]    host/port of /metrics                     -> MetricsSettings

Environment: ``AUDITPIPE_<TABLE>_<KEY>`` overrides ``[table] key``, nested tables joined the
same way (``AUDITPIPE_SINKS_POSTGRES_DSN``); see auditpipe/env.py for the whole rule.

Units: keys carry their unit in the name; durations are ``_secs`` (float seconds) for every new
key (a few older ones say ``_ms``), sizes ``_bytes``.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .models import StrictModel, validate_model

ENV_PREFIX = "AUDITPIPE_"


class KafkaSettings(StrictModel):
    bootstrap: str | None = Field(
        None, description="host:port[,host:port]; unset means the embedded broker (`auditpipe dev`)"
    )
    raw_topic: str = "auditpipe.raw"
    events_topic: str = "auditpipe.events"
    dlq_topic: str = "auditpipe.dlq"
    partitions: int = Field(3, ge=1, description="partitions of the topics auditpipe creates")
    replication_factor: int = Field(1, ge=1)
    client_id: str = "auditpipe"
    request_timeout_ms: int = Field(30_000, ge=1000)
    init_producer_id_v3: bool = Field(
        True,
        description="teach aiokafka (process-wide, when auditpipe creates a producer) the v3 form "
        "of InitProducerId, which the embedded broker needs for idempotent producers; brokers "
        "without v3 still get v0. false leaves aiokafka untouched "
        "(auditpipe.kafka.uninstall_init_producer_id_v3 undoes it)",
    )
    # -- retention of the topics auditpipe creates (`auditpipe topics --create`, `dev`) --------
    raw_retention_secs: int = Field(
        259_200,
        ge=1,
        description="retention.ms of raw_topic when auditpipe creates it (3 days): the raw topic"
        " is the only one with unredacted content, so keep it short",
    )
    events_retention_secs: int = Field(
        604_800, ge=1, description="retention.ms of events_topic when auditpipe creates it"
    )
    dlq_retention_secs: int = Field(
        604_800, ge=1, description="retention.ms of dlq_topic when auditpipe creates it"
    )
    # -- security: every Kafka client (hook, processors, sinks, DLQ, tools) --------------------
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="of every Kafka client (producer hook, processors, sinks, DLQ, tools);"
        " SSL and SASL_SSL use the ssl_* keys, SASL_* the sasl_* keys (docs/kafka.md)",
    )
    ssl_cafile: str | None = Field(
        None, description="PEM file of the CA(s) that signed the brokers' certificates"
    )
    ssl_certfile: str | None = Field(None, description="client certificate (PEM), for mTLS")
    ssl_keyfile: str | None = Field(None, description="the client certificate's private key")
    ssl_key_password_file: str | None = Field(
        None, description="file holding the password of an encrypted ssl_keyfile"
    )
    ssl_check_hostname: bool = Field(
        True, description="check that the broker's certificate names the host connected to"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = (
        Field(None, description="required with SASL_PLAINTEXT and SASL_SSL")
    )
    sasl_username: str | None = Field(None, description="PLAIN and SCRAM-SHA-256/512")
    sasl_password: SecretStr | None = Field(
        None, description="prefer AUDITPIPE_KAFKA_SASL_PASSWORD or sasl_password_file; never logged"
    )
    sasl_password_file: str | None = Field(
        None, description="file holding the SASL password (read when a client is built)"
    )
    sasl_oauth_token_file: str | None = Field(
        None,
        description="OAUTHBEARER: file holding the bearer token, read again at every"
        " authentication (a sidecar can refresh it)",
    )

    @model_validator(mode="after")
    def _security_combinations(self) -> KafkaSettings:
        problems = kafka_security_problems(self)
        if problems:
            raise ValueError("\n    ".join(problems))
        return self


_SSL_FILE_KEYS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_key_password_file")
_FILE_KEYS = (*_SSL_FILE_KEYS, "sasl_password_file", "sasl_oauth_token_file")


def kafka_security_problems(kafka: KafkaSettings) -> list[str]:
    """What is wrong with ``[kafka]``'s security keys, each naming the key and the fix."""
    proto = kafka.security_protocol
    tls, sasl = proto in ("SSL", "SASL_SSL"), proto.startswith("SASL_")
    problems = []
    for key in _SSL_FILE_KEYS:
        if getattr(kafka, key) and not tls:
            problems.append(
                f"kafka.{key} is set but kafka.security_protocol is {proto}: set "
                f'security_protocol = "SSL" (or "SASL_SSL") to use TLS, or remove {key}'
            )
    if kafka.ssl_certfile and not kafka.ssl_keyfile:
        problems.append(
            "kafka.ssl_certfile needs kafka.ssl_keyfile (the certificate's private key; name the"
            " same file when the PEM holds both)"
        )
    if kafka.ssl_keyfile and not kafka.ssl_certfile:
        problems.append("kafka.ssl_keyfile needs kafka.ssl_certfile (the client certificate)")
    if kafka.ssl_key_password_file and not kafka.ssl_keyfile:
        problems.append("kafka.ssl_key_password_file is set without kafka.ssl_keyfile")
    mech = kafka.sasl_mechanism
    if sasl and mech is None:
        problems.append(
            f"kafka.security_protocol = {proto!r} needs kafka.sasl_mechanism: set it to PLAIN, "
            'SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER (or security_protocol = "SSL" / '
            '"PLAINTEXT" for no SASL)'
        )
    sasl_keys = ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file",
                 "sasl_oauth_token_file")  # fmt: skip
    if not sasl:
        for key in sasl_keys:
            if getattr(kafka, key) is not None:
                problems.append(
                    f"kafka.{key} is set but kafka.security_protocol is {proto}: set "
                    f'security_protocol = "SASL_SSL" (or "SASL_PLAINTEXT"), or remove {key}'
                )
    if mech in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        if not kafka.sasl_username:
            problems.append(f"kafka.sasl_mechanism = {mech!r} needs kafka.sasl_username")
        if kafka.sasl_password is None and not kafka.sasl_password_file:
            problems.append(
                f"kafka.sasl_mechanism = {mech!r} needs a password: set "
                "AUDITPIPE_KAFKA_SASL_PASSWORD or kafka.sasl_password_file"
            )
        if kafka.sasl_password is not None and kafka.sasl_password_file:
            problems.append(
                "kafka.sasl_password and kafka.sasl_password_file are both set: keep one"
            )
        if kafka.sasl_oauth_token_file:
            problems.append(
                f"kafka.sasl_oauth_token_file is for OAUTHBEARER, not {mech}: remove it"
            )
    if mech == "OAUTHBEARER":
        if not kafka.sasl_oauth_token_file:
            problems.append(
                "kafka.sasl_mechanism = 'OAUTHBEARER' needs kafka.sasl_oauth_token_file (a file"
                " holding the bearer token)"
            )
        for key in ("sasl_username", "sasl_password", "sasl_password_file"):
            if getattr(kafka, key) is not None:
                problems.append(f"kafka.{key} is not used by OAUTHBEARER: remove it")
    for key in _FILE_KEYS:
        path = getattr(kafka, key)
        if path and not os.access(path, os.R_OK):
            why = "does not exist" if not os.path.exists(path) else "is not readable"
            problems.append(f"kafka.{key}: {path} {why}: name a readable file")
    return problems


DEFAULT_CAPTURE_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v2/models/{name}/infer",
    "/v2/models/{name}/versions/{version}/infer",
    "/v2/models/{name}/generate",
    "/v2/models/{name}/versions/{version}/generate",
)
DEFAULT_HEADER_ALLOWLIST = (
    "user-agent",
    "content-type",
    "x-request-id",
    "traceparent",
    "tracestate",
    "openai-organization",
    "openai-project",
    "x-tenant-id",  # the enrich step's default tenant and user sources
    "x-user-id",
)


class ProducerSettings(StrictModel):
    """``[producer]``: the hook inside inference servers (queue, transport, gating, spool).

    ``enabled`` is also set by ``AUDITPIPE_ENABLED=0/1``; ``transport = "stdout"`` also by
    ``DYN_AUDIT_STDOUT=1`` (Dynamo phase-1 compatibility). See README "The producer hook".
    """

    queue_max_events: int = Field(10_000, ge=1, description="bounded queue in front of the sender")
    linger_ms: int = Field(5, ge=0)
    max_batch_bytes: int = Field(1_048_576, ge=1024)
    compression: Literal["gzip", "none", "snappy", "lz4", "zstd"] = Field(
        "lz4",
        description="Kafka batch compression of the producer hook, the processors and the DLQ;"
        " lz4 costs the least CPU (gzip: about a third less producer throughput)",
    )
    enable_idempotence: bool = True
    stop_timeout_secs: float = Field(10.0, gt=0, description="how long stop() flushes at most")
    enabled: bool = Field(True, description="global switch; False captures nothing")
    transport: Literal["kafka", "stdout"] = Field(
        "kafka", description="kafka: Avro to kafka.raw_topic; stdout: one JSON line per event"
    )
    capture: Literal["store", "all"] = Field(
        "store",
        description='store: requests with "store": true or x-auditpipe-store: true; all: every one',
    )
    capture_paths: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CAPTURE_PATHS),
        description="request paths the middleware captures; {name} matches one path segment",
    )
    header_allowlist: list[str] = Field(
        default_factory=lambda: list(DEFAULT_HEADER_ALLOWLIST),
        description="request headers recorded on events (credentials never are)",
    )
    return_request_id: bool = Field(
        True, description="add x-request-id to responses of captured paths when the app did not"
    )
    max_payload_bytes: int = Field(
        262_144,
        ge=256,
        description="cap of input and of output (JSON bytes) on an event; the default keeps "
        "events under Kafka's default 1 MB message limit",
    )
    when_full: Literal["spool", "drop_newest", "block"] = Field(
        "spool", description="what happens when Kafka is unreachable or slower than traffic"
    )
    block_timeout_ms: int = Field(
        5, ge=0, description='when_full = "block": longest emit() waits for queue space'
    )
    spool_dir: str | None = Field(
        None, description="disk spool directory (default: <tmp>/auditpipe-spool/<raw_topic>)"
    )
    spool_max_bytes: int = Field(1_073_741_824, ge=4096, description="disk spool size limit")
    spool_segment_bytes: int = Field(16_777_216, ge=1024, description="size of one spool segment")
    spill_after_ms: int = Field(
        2000,
        ge=1,
        description="Kafka counts as unreachable (new events spool) once a send waits this long",
    )
    max_in_flight_events: int = Field(
        20_000, ge=1, description="sent but unacknowledged events before new ones spool"
    )
    redact: bool = Field(
        False,
        description="run the redact step ([pipeline.redact] settings) in the sender thread, so"
        " nothing unredacted leaves the process: stdout lines, spool segments and the raw topic",
    )

    @field_validator("capture_paths", "header_allowlist", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # environment overrides arrive as "a,b,c"
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("capture_paths")
    @classmethod
    def _paths_absolute(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/"):
                raise ValueError(f"capture_paths entry {path!r} must start with '/'")
        return value


class ProcessorSettings(StrictModel):
    app_id: str = "auditpipe-processors"
    session_timeout_secs: float = Field(
        10.0,
        gt=0,
        description="consumer-group session timeout; also bounds the first join on Tansu",
    )
    heartbeat_interval_secs: float = Field(1.0, gt=0)
    web_port: int | None = Field(None, description="Faust web server port; None disables it")
    data_dir: str | None = Field(None, description="Faust table state directory (default: temp)")
    step_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="processes that run the steps beside the worker's own (0: run them in the"
        " worker process); up to one per spare core raises a worker's throughput",
    )


class RunnerSettings(StrictModel):
    group_prefix: str = "auditpipe-sink-"
    max_events: int = Field(
        1000, ge=1, description="a partition's batch is written once it holds this many records"
    )
    max_wait_secs: float = Field(0.2, ge=0)
    session_timeout_secs: float = Field(10.0, gt=0)
    gc_gen0_threshold: int | None = Field(
        50_000,
        ge=1,
        description="process-wide: the cyclic GC's first-generation threshold while the runner "
        "runs (Python's default 700 made the GC re-walk buffered batches: a quarter of the "
        "runner's CPU); restored when it stops. Unset leaves the interpreter's setting alone",
    )
    max_bytes: int = Field(
        4_194_304, ge=1, description="a partition's batch is written once its records reach this"
    )
    heartbeat_interval_secs: float | None = Field(
        None, gt=0, description="default: a third of session_timeout_secs, at most 1 s"
    )
    backoff_initial_secs: float = Field(0.1, gt=0, description="first retry delay (jittered)")
    backoff_max_secs: float = Field(30.0, gt=0, description="retry delays double up to this")
    health_host: str = "127.0.0.1"
    health_port: int | None = Field(
        None, ge=0, le=65535, description="serve /healthz and /metrics here; 0 = any free port"
    )
    unhealthy_after_secs: float = Field(
        60.0, gt=0, description="/healthz answers 503 once a partition has failed this long"
    )
    reader_schema_id: int | None = Field(
        None,
        ge=1,
        description="decode every event into this schema id (e.g. 1 pins a v1 sink: fields "
        "added later are dropped); unset: the latest version",
    )

    @field_validator("reader_schema_id")
    @classmethod
    def _known_schema_id(cls, value: int | None) -> int | None:
        from auditpipe.schemas import known_schema_ids  # lazy: schemas imports this package

        if value is not None and value not in known_schema_ids():
            raise ValueError(f"unknown schema id {value} (known: {known_schema_ids()})")
        return value


class SourceSettings(StrictModel):
    service: str | None = None
    instance: str | None = Field(default_factory=socket.gethostname)


class RegistrySettings(StrictModel):
    url: str | None = Field(
        None,
        description="Confluent Schema Registry URL (`auditpipe schemas register`); unset: "
        "the embedded file registry, schemas/registry.json, is the only one",
    )
    subject: str = "auditpipe.AuditEvent"
    compatibility: Literal[
        "NONE",
        "BACKWARD",
        "BACKWARD_TRANSITIVE",
        "FORWARD",
        "FORWARD_TRANSITIVE",
        "FULL",
        "FULL_TRANSITIVE",
    ] = "FULL_TRANSITIVE"


class ProxySettings(StrictModel):
    """``[proxy]``: ``auditpipe proxy``, the auditing reverse proxy in front of any server.

    Capture follows ``[producer]`` (paths, gating, header allowlist, caps). See README
    "Attach to any inference server".
    """

    upstream: str | None = Field(
        None,
        description="base URL of the inference server, e.g. http://127.0.0.1:8000 (a path is a"
        " prefix: http://host/base + /v1/x -> http://host/base/v1/x); --upstream sets it",
    )
    host: str = Field("127.0.0.1", description="address the proxy listens on")
    port: int = Field(8080, ge=0, le=65535, description="port the proxy listens on (0: any)")
    connect_timeout_secs: float = Field(
        5.0, gt=0, description="establishing an upstream connection; past it the client gets 504"
    )
    read_timeout_secs: float = Field(
        600.0,
        gt=0,
        description="longest wait for the upstream's response headers or its next body chunk"
        " (a long generation before the first byte needs a long one); past it: 504",
    )
    pool_timeout_secs: float = Field(
        10.0, gt=0, description="waiting for a free upstream connection (at max_connections)"
    )
    max_connections: int = Field(
        1000, ge=1, description="upstream connections open at most (busy and idle)"
    )
    keepalive_expiry_secs: float = Field(
        30.0, gt=0, description="an idle upstream connection is closed after this long"
    )
    forwarded_headers: bool = Field(
        True,
        description="add X-Forwarded-For/-Proto/-Host for the upstream (the client's address)",
    )
    preserve_host: bool = Field(
        False, description="send the client's Host header upstream instead of the upstream's"
    )

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1]) < 1:
                raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value


class IngestSettings(StrictModel):
    """``[ingest]``: ``auditpipe ingest``, Dynamo-style audit JSONL from files or stdin."""

    state_file: str | None = Field(
        None,
        description="where the read positions of files are kept (default: "
        "$XDG_STATE_HOME/auditpipe/ingest-<hash of the paths>.json); --state sets it",
    )
    start_at: Literal["beginning", "end"] = Field(
        "beginning",
        description="where a file without a saved position is read from (end: like tail -F)",
    )
    poll_interval_secs: float = Field(
        0.25, gt=0, description="--follow: how often files are checked for new lines/rotation"
    )
    rotate_wait_secs: float = Field(
        5.0,
        ge=0,
        description="--follow: a rotated (renamed) file is still read this long after the new"
        " one appeared, for what the writer adds before it reopens",
    )
    batch_max_lines: int = Field(
        1000,
        ge=1,
        description="lines read, published and flushed before their position is saved (at most"
        " producer.queue_max_events)",
    )
    max_line_bytes: int = Field(
        16_777_216, ge=1024, description="a longer line is skipped (counted as too_long)"
    )
    on_malformed: Literal["skip", "dlq"] = Field(
        "skip",
        description="an audit record that cannot be read (broken JSON, wrong types): skip"
        " (counted) or send the line to kafka.dlq_topic with the reason",
    )
    on_other: Literal["skip", "dlq"] = Field(
        "skip",
        description="a line that is not an audit record (the server's other log lines): skip"
        " (counted) or send it to kafka.dlq_topic",
    )
    default_endpoint: str = Field(
        "/v1/chat/completions", description="endpoint of records that do not name one"
    )


class ReceiverSettings(StrictModel):
    """``[receiver]``: ``auditpipe receive``, the KServe inference-logger receiver."""

    host: str = Field("127.0.0.1", description="address the receiver listens on")
    port: int = Field(8081, ge=0, le=65535, description="port the receiver listens on (0: any)")
    pair_timeout_secs: float = Field(
        60.0,
        gt=0,
        description="a request whose response has not come after this long is recorded as"
        " incomplete (KServe logs responses of status 200 only); likewise a lone response",
    )
    max_pending: int = Field(
        10_000, ge=1, description="requests/responses waiting for their other half, at most"
    )
    max_pending_bytes: int = Field(
        268_435_456,
        ge=1024,
        description="their payload bytes, at most; beyond either limit the oldest is recorded"
        " unpaired at once (counted as evicted)",
    )
    max_body_bytes: int = Field(
        67_108_864, ge=1024, description="a larger CloudEvent is refused with 413"
    )
    capture: Literal["all", "store"] = Field(
        "all",
        description='all: every exchange the logger sends; store: only requests with "store": true',
    )


class ApiKey(StrictModel):
    """An API key with a name: the name (not the key) is what the change log records."""

    name: str = Field(min_length=1, max_length=64, description="who holds the key (logged)")
    key: str = Field(min_length=1, description="the bearer token")


class ServeSettings(StrictModel):
    """``[serve]``: ``auditpipe serve``, the stored-completions API and the web viewer."""

    host: str = Field("127.0.0.1", description="address to listen on; non-loopback needs api_keys")
    port: int = Field(8088, ge=0, le=65535, description="port to listen on (0: any free port)")
    api_keys: list[str | ApiKey] = Field(
        default_factory=list,
        description="bearer keys that may read, update and delete (a key, or {name, key}); "
        "AUDITPIPE_SERVE_API_KEYS=k1,k2; none: only loopback hosts, and no authentication",
    )
    read_api_keys: list[str | ApiKey] = Field(
        default_factory=list,
        description="bearer keys that may only read (list, retrieve, messages, the viewer)",
    )
    statement_timeout_secs: float = Field(
        30.0, gt=0, description="longest a query of the API or the viewer may run"
    )
    pool_max_size: int = Field(8, ge=1, description="database connections of the server")
    page_size: int = Field(50, ge=1, le=500, description="records per page in the web viewer")
    migrate: bool = Field(
        True,
        description="create or upgrade the tables at start (additive); false: require them",
    )

    @field_validator("api_keys", "read_api_keys", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # environment overrides arrive as "k1,k2"
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys", "read_api_keys")
    @classmethod
    def _no_empty_key(cls, value: list[str | ApiKey]) -> list[str | ApiKey]:
        if any(isinstance(k, str) and not k.strip() for k in value):
            raise ValueError("an API key is empty")
        return value


class PrivacySettings(StrictModel):
    """``[privacy]``: erasure and retention (``auditpipe erase``, ``auditpipe retention``)."""

    min_retention_days: float = Field(
        0,
        ge=0,
        description="erase refuses to delete records younger than this unless "
        "--override-retention --reason TEXT (183 for EU AI Act Art. 19 deployments)",
    )
    # crypto-shredding: the key store of the sinks with encrypt_content (auditpipe.privacy.keys)
    key_store: Literal["sqlite", "postgres"] = Field(
        "sqlite",
        description="where per-subject data keys are kept for [sinks.NAME] encrypt_content: "
        "sqlite (a file, for one machine and dev) or postgres (a table)",
    )
    key_store_path: str = Field(
        ".auditpipe/keys.sqlite", description="sqlite key store file (created with mode 0600)"
    )
    key_store_dsn: str | None = Field(
        None,
        description="postgres key store; default: [sinks.postgres] dsn, else the embedded "
        "PostgreSQL",
    )
    key_store_schema: str = Field(
        "public",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="postgres key store: schema of the auditpipe_keys table (created if missing)",
    )
    master_key_env: str | None = Field(
        None,
        description="name of an environment variable holding a 32-byte master key (hex or "
        "base64) that wraps every stored data key (AES-256-GCM); unset: keys stored unwrapped",
    )
    key_cache_secs: float = Field(
        60.0,
        ge=0,
        description="how long a sink keeps a subject's data key in memory (records written that "
        "long after the subject's erasure are sealed under the deleted key: unreadable)",
    )


class LoggingSettings(StrictModel):
    """``[logging]``: auditpipe's own log lines (see auditpipe/logs.py, docs/operations.md).

    ``AUDITPIPE_LOG`` and ``AUDITPIPE_LOG_FORMAT`` set ``level`` and ``format`` too.
    """

    format: Literal["text", "json"] = Field(
        "text", description="text: one readable line; json: one JSON object per line"
    )
    level: str | None = Field(
        None,
        description="a level and per-logger levels, e.g. 'info,auditpipe.sinks=debug,aiokafka=warn'"
        " (default: info for long-running commands, warning for the others)",
    )
    utc: bool = Field(True, description="timestamps in UTC (false: local time with its offset)")

    @field_validator("level")
    @classmethod
    def _level_spec(cls, value: str | None) -> str | None:
        if value is not None:
            from .logs import parse_level_spec

            try:
                parse_level_spec(value)
            except ValueError as exc:
                raise ValueError(f"{exc} (set by [logging] level or AUDITPIPE_LOG)") from None
        return value


class MetricsSettings(StrictModel):
    """``[metrics]``: where long-running commands serve ``/metrics`` (Prometheus)."""

    host: str = Field("127.0.0.1", description="address of the /metrics listener")
    port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="serve /metrics (and /healthz) on this port (0: any free port; unset: off,"
        " except where a command already serves /metrics: runner.health_port, the receiver's"
        " own port, processors.web_port)",
    )


class Settings(StrictModel):
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    producer: ProducerSettings = Field(default_factory=ProducerSettings)
    processors: ProcessorSettings = Field(default_factory=ProcessorSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    source: SourceSettings = Field(default_factory=SourceSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    receiver: ReceiverSettings = Field(default_factory=ReceiverSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    sinks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    pipeline: dict[str, Any] = Field(
        default_factory=dict, description="processor chain; validated by auditpipe.processors"
    )


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read ``path`` (TOML), apply ``AUDITPIPE_<TABLE>_<KEY>`` overrides, validate.

    Raises :class:`ConfigError` naming the file, key and what is allowed.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    origin = "settings"
    if path is not None:
        origin = str(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such settings file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    from .env import apply_env  # the one override rule (AUDITPIPE_<TABLE>_<KEY>), see there

    apply_env(data, _compat_env(env), origin, Settings)
    settings = validate_model(Settings, data, origin)
    validate_plugin_tables(settings, origin, "pipeline" in data)
    return settings


def validate_plugin_tables(settings: Settings, origin: str, pipeline: bool = True) -> None:
    """Every ``[sinks.NAME]`` table (run or not) and ``[pipeline]`` against their models.

    Only configs are validated: no sink or step is built, no driver (boto3, pymongo, psycopg)
    is imported, so a typo in a sink this process does not run is still an error naming the
    key.
    """
    if settings.sinks:
        from auditpipe.sinks.base import load_sink_class

        for name, table in sorted(settings.sinks.items()):
            cls = load_sink_class_for(name, load_sink_class)
            cls.check_mapping(table, origin)
    if pipeline:
        from auditpipe.steps import build_chain

        build_chain(settings.pipeline, origin, instantiate=False)


def load_sink_class_for(name: str, load: Any) -> Any:
    try:
        return load(name)
    except ConfigError as exc:
        raise ConfigError(f"sinks.{name}: {exc}") from None


def _compat_env(env: Mapping[str, str]) -> dict[str, str]:
    """``AUDITPIPE_ENABLED`` and Dynamo's ``DYN_AUDIT_STDOUT`` as ``[producer]`` overrides.

    Explicit ``AUDITPIPE_PRODUCER_ENABLED`` / ``_TRANSPORT`` win over them.
    """
    out = dict(env)
    if "AUDITPIPE_ENABLED" in env:
        out.pop("AUDITPIPE_ENABLED")
        out.setdefault("AUDITPIPE_PRODUCER_ENABLED", env["AUDITPIPE_ENABLED"])
    if env.get("DYN_AUDIT_STDOUT", "").strip().lower() in ("1", "true", "yes", "on"):
        out.setdefault("AUDITPIPE_PRODUCER_TRANSPORT", "stdout")
    for short, full in (("AUDITPIPE_LOG", "AUDITPIPE_LOGGING_LEVEL"),
                        ("AUDITPIPE_LOG_FORMAT", "AUDITPIPE_LOGGING_FORMAT")):  # fmt: skip
        if short in out:
            out.setdefault(full, out.pop(short))
    return out


def settings_path_from_env(env: Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if env is None else env
    value = env.get("AUDITPIPE_CONFIG")
    return Path(value) if value else None
