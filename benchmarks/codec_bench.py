"""Encode/decode cost per ~2 KB AuditEvent: the Avro codec against orjson, in the same run.

    .venv/bin/python benchmarks/codec_bench.py [--events N] [--rounds R]

Every number is nanoseconds per event, the median over R rounds of N events each. Schemas are
parsed once and cached by the codec (no per-event parsing); the first round warms the caches
and is not counted. Output: one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import fastavro
import orjson
from auditpipe.schemas import decode, encode, latest_schema_id, new_event, schema_by_id, validate
from auditpipe.schemas.codec import _to_wire_record, decode_with_fastavro


def sample_event(target_bytes: int = 2048) -> dict[str, Any]:
    """A realistic chat completion whose JSON rendering is about ``target_bytes`` long."""
    event = new_event(
        request_id="req-7f3a9c1e",
        endpoint="/v1/chat/completions",
        method="POST",
        status_code=200,
        model="meta/llama3-8b-instruct",
        store=True,
        metadata={"ticket": "SN-1234", "team": "search"},
        headers={"user-agent": "openai-python/1.40", "x-request-id": "req-7f3a9c1e"},
        input={
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": ""},
            ],
            "temperature": 0.2,
        },
        output={
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "Sure."},
                }
            ]
        },
        usage={"prompt_tokens": 412, "completion_tokens": 38, "total_tokens": 450},
        latency_ms=812.5,
        ttft_ms=95.25,
        trace_id="425ef761ca5b44c795b4c912f1d84b39",
        span_id="6959a1b2d1ee41a5",
        source={"service": "inference", "instance": "pod-1"},
        tenant="acme",
        tags={"env": "prod", "region": "eu-west-1"},
        cost={
            "input_usd": 0.000412,
            "output_usd": 0.000076,
            "total_usd": 0.000488,
            "estimated": False,
        },
        processing=[
            {
                "step": "validate",
                "version": "1",
                "action": "validated",
                "ts_ms": 1757115457130,
                "counts": {},
                "policy_version": None,
            }
        ],
    )
    filler = "The quick brown fox jumps over the lazy dog. "
    while len(orjson.dumps(event)) < target_bytes:
        event["input"]["messages"][1]["content"] += filler
    return event


def measure(
    cases: dict[str, tuple[Callable[[Any], Any], list[Any]]], rounds: int
) -> dict[str, float]:
    """Median ns per item of each case. Cases are interleaved within every round, so that
    load from other processes on a shared machine hits all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds + 1):
        for name, (fn, items) in cases.items():
            t0 = time.perf_counter_ns()
            for item in items:
                fn(item)
            elapsed = time.perf_counter_ns() - t0
            if r:  # round 0 warms up
                samples[name].append(elapsed / len(items))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000, help="events per round (2000)")
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds (15)")
    args = parser.parse_args()

    event = sample_event()
    events = [dict(event, event_id=f"{i:08d}-{event['event_id'][9:]}") for i in range(args.events)]
    avro = [encode(e) for e in events]
    avro_v1 = [encode({k: v for k, v in e.items() if k in _v1_fields()}, 1) for e in events]
    js = [orjson.dumps(e) for e in events]
    assert decode(avro[0]) == events[0] and orjson.loads(js[0]) == events[0]

    schema = schema_by_id(latest_schema_id())
    records = [
        {**e, **{k: orjson.dumps(e[k]).decode() for k in ("input", "output")}} for e in events
    ]

    tagged = [_to_wire_record(e, latest_schema_id()) for e in events]

    def fastavro_write(record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, record)
        return buf.getvalue()

    assert fastavro_write(tagged[0]) == fastavro_write(records[0]) == avro[0][5:]
    results = measure(
        {
            "avro_encode": (encode, events),
            "orjson_encode": (orjson.dumps, events),
            "avro_decode": (decode, avro),
            "orjson_decode": (orjson.loads, js),
            "avro_decode_v1_into_v2": (decode, avro_v1),
            "avro_decode_v2_into_v1": (lambda d: decode(d, 1), avro),
            "fastavro_decode": (
                lambda d: decode_with_fastavro(d, latest_schema_id(), schema, latest_schema_id()),
                avro,
            ),
            "fastavro_write_plain_record": (fastavro_write, records),
            "fastavro_write_union_tagged": (fastavro_write, tagged),
            "validate": (validate, events),
        },
        args.rounds,
    )
    n = args.rounds
    out = {
        "benchmark": "codec_bench",
        "python": platform.python_version(),
        "fastavro": fastavro.__version__,
        "events_per_round": args.events,
        "rounds": n,
        "event_json_bytes": len(js[0]),
        "event_avro_bytes": len(avro[0]),
        "ns_per_event_median": {k: round(v) for k, v in results.items()},
        "ratios": {
            "encode_avro_over_orjson": round(results["avro_encode"] / results["orjson_encode"], 2),
            "decode_avro_over_orjson": round(results["avro_decode"] / results["orjson_decode"], 2),
            "decode_generated_over_fastavro": round(
                results["avro_decode"] / results["fastavro_decode"], 2
            ),
            "encode_generated_over_fastavro": round(
                results["avro_encode"] / results["fastavro_write_plain_record"], 2
            ),
            "size_avro_over_json": round(len(avro[0]) / len(js[0]), 3),
            "write_tagged_over_plain": round(
                results["fastavro_write_union_tagged"] / results["fastavro_write_plain_record"], 2
            ),
        },
    }
    print(json.dumps(out, indent=2))


def _v1_fields() -> frozenset[str]:
    return frozenset(f["name"] for f in schema_by_id(1)["fields"])


if __name__ == "__main__":
    main()
