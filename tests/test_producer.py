"""AuditProducer against the real embedded broker: flush on stop, never raising or blocking."""

from __future__ import annotations

from auditpipe.producer import AuditProducer
from auditpipe.schemas import decode, new_event

from auditpipe.settings import Settings

from .kafkautil import consume, run


class TestAuditProducer:
    def test_stop_flushes_everything_emitted(self, settings: Settings) -> None:
        """Events emitted just before stop() are all on the raw topic after it returns."""
        producer = AuditProducer(settings).start()
        events = [new_event(request_id=f"r{i}", model="m") for i in range(200)]
        for event in events:
            assert producer.emit(event) is True
        stats = producer.stop()
        assert stats["sent"] == 200 and stats["failed"] == 0 and stats["dropped"] == {}
        records = run(consume(settings.kafka.bootstrap or "", settings.kafka.raw_topic, 200))
        got = {decode(r.value)["request_id"] for r in records}
        assert got == {f"r{i}" for i in range(200)}
        assert {r.key for r in records} == {e["event_id"].encode() for e in events}

    def test_emit_never_raises_and_counts_drops(self, settings: Settings) -> None:
        """Before start, after stop, on a full queue and for an invalid event: counted drops."""
        small = settings.model_copy(
            update={"producer": settings.producer.model_copy(update={"queue_max_events": 3})}
        )
        producer = AuditProducer(small)
        assert producer.emit(new_event()) is False  # not started
        producer.start()
        bad = new_event()
        bad["status_code"] = "not a number"
        producer.emit(bad)
        producer.stop()
        assert producer.emit(new_event()) is False  # stopped
        stats = producer.stats()
        assert stats["dropped"]["not_running"] == 2
        assert stats["dropped"]["invalid_event"] == 1

    def test_queue_full_drops_instead_of_blocking(self, settings: Settings) -> None:
        """With the sender unable to reach Kafka, emit() returns at once and counts queue_full."""
        kafka = settings.kafka.model_copy(update={"bootstrap": "127.0.0.1:1"})
        producer_settings = settings.producer.model_copy(
            update={"queue_max_events": 10, "stop_timeout_secs": 0.5, "when_full": "drop_newest"}
        )
        unreachable = settings.model_copy(update={"kafka": kafka, "producer": producer_settings})
        producer = AuditProducer(unreachable).start()
        results = [producer.emit(new_event()) for _ in range(100)]
        stats = producer.stop()
        assert results.count(True) == 10 and stats["dropped"]["queue_full"] == 90
        assert stats["dropped"]["stopped_unsent"] == 10  # accounted for, not silently lost
