"""Kafka client settings every part shares, and the pipeline's topics.

aiokafka speaks only InitProducerId v0, in which the request carries no producer id or epoch.
Tansu (the embedded broker) rejects that version with UnknownError, so an idempotent aiokafka
producer cannot start on it. :func:`install_init_producer_id_v3` teaches aiokafka the v3 form
of the same request (explicit ``producer_id=-1, producer_epoch=-1``, as Apache Kafka clients
send since 2.5). Version negotiation is unchanged: a broker that does not offer v3 still gets v0.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .errors import BrokerError, ConfigError
from .settings import KafkaSettings, ProducerSettings

_V3_INSTALLED = False


def install_init_producer_id_v3() -> None:
    """Register InitProducerId v3 with aiokafka's version negotiation (idempotent)."""
    global _V3_INSTALLED
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

    def build(self: Any, struct_class: Any) -> Any:
        if struct_class is InitProducerIdRequest_v3:
            return struct_class(self._transactional_id, self._transaction_timeout_ms, -1, -1, {})
        return build_v0(self, struct_class)

    request._CLASSES = (txn.InitProducerIdRequest_v0, InitProducerIdRequest_v3)
    request.build = build
    _V3_INSTALLED = True


def require_bootstrap(kafka: KafkaSettings) -> str:
    if not kafka.bootstrap:
        raise ConfigError(
            "kafka.bootstrap is not set: set AUDITPIPE_KAFKA_BOOTSTRAP=host:port (or [kafka] "
            "bootstrap in the settings file), or run the whole pipeline with `auditpipe dev`"
        )
    return kafka.bootstrap


def producer_kwargs(kafka: KafkaSettings, producer: ProducerSettings) -> dict[str, Any]:
    """AIOKafkaProducer arguments: acks=all, idempotence, compression, batching."""
    install_init_producer_id_v3()
    return {
        "bootstrap_servers": require_bootstrap(kafka),
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


async def ensure_topics(kafka: KafkaSettings, timeout_secs: float = 15.0) -> None:
    """Create the pipeline's topics if missing (existing ones are left alone)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(
        bootstrap_servers=require_bootstrap(kafka),
        client_id=f"{kafka.client_id}-admin",
        request_timeout_ms=int(timeout_secs * 1000),
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_secs)
        existing = set(await admin.list_topics())
        missing = [t for t in pipeline_topics(kafka) if t not in existing]
        if missing:
            new = [NewTopic(t, kafka.partitions, kafka.replication_factor) for t in missing]
            response = await admin.create_topics(new)
            for topic, code, *rest in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise BrokerError(f"could not create topic {topic}: error {code} {rest}")
    except (TimeoutError, KafkaError, OSError) as exc:
        raise BrokerError(
            f"Kafka at {kafka.bootstrap} did not answer ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        await admin.close()
