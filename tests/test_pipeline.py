"""The processor's per-record logic on bytes, without Faust."""

from __future__ import annotations

from collections.abc import Sequence

from auditpipe.processors import Outcome, Step, process_record, record_step, validate_step
from auditpipe.schemas import decode, encode, new_event

from auditpipe.dlq import H_OFFSET, H_REASON, H_STAGE, H_TOPIC, headers_dict


def run(value: bytes | None, steps: Sequence[Step] = (validate_step,)) -> Outcome:
    return process_record(b"k", value, topic="raw", partition=1, offset=42, steps=steps)


class TestProcessRecord:
    def test_good_event_is_forwarded_with_its_step_recorded(self) -> None:
        event = new_event(request_id="r1", model="m")
        outcome = run(encode(event))
        assert outcome.kind == "forward"
        out = decode(outcome.value)
        assert out["request_id"] == "r1" and out["event_id"] == event["event_id"]
        assert [p["step"] for p in out["processing"]] == ["validate"]

    def test_garbage_is_dead_lettered_with_original_bytes_and_reason(self) -> None:
        outcome = run(b"\x00garbage")
        assert outcome.kind == "dead_letter" and outcome.value == b"\x00garbage"
        headers = headers_dict(outcome.headers)
        assert headers[H_STAGE] == "decode" and headers[H_REASON] == "unknown_schema"
        assert headers[H_TOPIC] == "raw" and headers[H_OFFSET] == "42"

    def test_failing_step_dead_letters_instead_of_forwarding(self) -> None:
        def explode(event):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

        outcome = run(encode(new_event()), steps=[validate_step, explode])
        assert outcome.kind == "dead_letter"
        headers = headers_dict(outcome.headers)
        assert (
            headers[H_STAGE] == "step:explode" and "boom" in headers["auditpipe.dlq.error_message"]
        )

    def test_step_returning_none_drops(self) -> None:
        outcome = run(encode(new_event()), steps=[lambda e: None])
        assert outcome.kind == "drop" and outcome.value is None

    def test_record_step_does_not_mutate_its_input(self) -> None:
        event = new_event()
        out = record_step(event, "s", "1", "did", {"n": 2})
        assert event["processing"] == [] and out["processing"][0]["counts"] == {"n": 2}
