"""auditpipe.retry: the one backoff and the one permanent-or-not rule."""

from __future__ import annotations

import aiokafka.errors as kafka_errors
import pytest
from auditpipe.sinks.base import PermanentSinkError, RetriableSinkError
from faust.exceptions import ProducerSendError

from auditpipe.retry import Backoff, is_permanent


def test_delays_double_up_to_the_cap_and_reset() -> None:
    b = Backoff(0.1, 1.0, jitter=0.0)
    assert [round(b.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.failures == 6
    b.reset()
    assert b.next() == pytest.approx(0.1)


def test_jitter_stays_within_its_band() -> None:
    low = Backoff(1.0, 1.0, jitter=0.5, rng=lambda: 0.0)
    high = Backoff(1.0, 1.0, jitter=0.5, rng=lambda: 0.999999)
    assert low.next() == pytest.approx(0.5)
    assert high.next() == pytest.approx(1.5, abs=1e-5)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="initial"):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError, match="cap"):
        Backoff(2.0, 1.0)


@pytest.mark.parametrize(
    ("exc", "permanent"),
    [
        (kafka_errors.MessageSizeTooLargeError(), True),
        (kafka_errors.InvalidTopicError(), True),
        (kafka_errors.KafkaConnectionError(), False),
        (kafka_errors.NotLeaderForPartitionError(), False),
        (kafka_errors.KafkaTimeoutError(), False),  # flagged not retriable, but the broker is away
        (kafka_errors.OutOfOrderSequenceNumber(), False),  # the producer's state, not the record's
        (PermanentSinkError("rejected"), True),
        (RetriableSinkError("away"), False),
        (ConnectionResetError(), False),
        (ValueError("unknown"), False),
    ],
)
def test_permanent_by_the_exceptions_own_flag(exc: BaseException, permanent: bool) -> None:
    assert is_permanent(exc) is permanent


def test_a_wrapped_error_is_judged_by_its_cause() -> None:
    def wrapped(inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except kafka_errors.KafkaError as e:
                raise ProducerSendError("Error while sending") from e
        except ProducerSendError as outer:
            return outer

    assert is_permanent(wrapped(kafka_errors.MessageSizeTooLargeError()))
    assert not is_permanent(wrapped(kafka_errors.KafkaConnectionError()))


def test_the_aiokafka_patch_is_reversible_and_follows_its_setting() -> None:
    """[kafka] init_producer_id_v3 = false leaves aiokafka untouched; uninstall undoes it."""
    from aiokafka.protocol import transaction as txn

    from auditpipe.kafka import producer_kwargs, uninstall_init_producer_id_v3
    from auditpipe.settings import KafkaSettings, ProducerSettings

    uninstall_init_producer_id_v3()
    stock = txn.InitProducerIdRequest._CLASSES
    assert [c.API_VERSION for c in stock] == [0]
    try:
        producer_kwargs(
            KafkaSettings(bootstrap="127.0.0.1:9", init_producer_id_v3=False), ProducerSettings()
        )
        assert txn.InitProducerIdRequest._CLASSES is stock
        producer_kwargs(KafkaSettings(bootstrap="127.0.0.1:9"), ProducerSettings())
        assert [c.API_VERSION for c in txn.InitProducerIdRequest._CLASSES] == [0, 3]
        uninstall_init_producer_id_v3()
        assert txn.InitProducerIdRequest._CLASSES is stock
    finally:
        producer_kwargs(
            KafkaSettings(bootstrap="127.0.0.1:9"), ProducerSettings()
        )  # as the rest of the suite expects
