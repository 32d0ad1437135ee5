"""What ``encrypt_content`` costs a sink per event, with a same-run baseline.

    .venv/bin/python benchmarks/shred_bench.py [--events 20000] [--subjects 200] [--rounds 5]

Events of ~2 KB content (the chat shape of benchmarks/codec_bench.py's size) spread over
``--subjects`` (tenant, user) subjects, sealed by :class:`ContentCipher` over an SQLite key
store in a temporary directory (keys cached, as in a running sink: the first round creates
them), then rendered as the file sink's JSON line. Baseline in the same run: rendering the
same events unsealed (``to_json_line``, what the sink does anyway). Also: ``decrypt_event``
per event. Medians of ``--rounds``; prints JSON (ns per event and ratios).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_events(n: int, subjects: int) -> list[dict[str, Any]]:
    from auditpipe.schemas import new_event

    text = "lorem ipsum dolor sit amet " * 35  # ~950 bytes, twice per event
    out = []
    for i in range(n):
        s = i % subjects
        out.append(
            new_event(
                request_id=f"req-{i}", model="m", endpoint="/v1/chat/completions",
                status_code=200, user=f"user-{s}", tenant=f"tenant-{s % 7}",
                input={"model": "m", "messages": [{"role": "user", "content": text}]},
                output={"choices": [{"index": 0, "message": {"role": "assistant",
                                                             "content": text}}]},
            )
        )  # fmt: skip
    return out


def per_event_ns(fn: Any, events: list[dict[str, Any]], rounds: int) -> float:
    runs = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        fn(events)
        runs.append((time.perf_counter_ns() - started) / len(events))
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from auditpipe.schemas import to_json_line

    from auditpipe.privacy.envelope import ContentCipher, decrypt_event
    from auditpipe.privacy.keys import SQLiteKeyStore

    events = make_events(args.events, args.subjects)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteKeyStore(Path(tmp) / "keys.sqlite", b"\x07" * 32, "BENCH")
        cipher = ContentCipher(store, cache_secs=3600)
        cipher.encrypt_all(events[: args.subjects])  # keys created (and cached) first
        plain = per_event_ns(lambda es: [to_json_line(e) for e in es], events, args.rounds)
        sealed_ns = per_event_ns(
            lambda es: [to_json_line(e) for e in cipher.encrypt_all(es)], events, args.rounds
        )
        sealed = cipher.encrypt_all(events)
        keys: dict[str, bytes | None] = {}

        def lookup(key_id: str) -> bytes | None:
            if key_id not in keys:
                keys[key_id] = store.get(key_id)
            return keys[key_id]

        decrypt_ns = per_event_ns(
            lambda es: [decrypt_event(e, lookup) for e in es], sealed, args.rounds
        )
        size_plain = statistics.mean(len(to_json_line(e)) for e in events[:200])
        size_sealed = statistics.mean(len(to_json_line(e)) for e in sealed[:200])
        store.close()
    print(
        json.dumps(
            {
                "events": args.events,
                "subjects": args.subjects,
                "rounds": args.rounds,
                "ns_per_event_median": {
                    "json_line_plain": round(plain),
                    "seal_and_json_line": round(sealed_ns),
                    "decrypt_event": round(decrypt_ns),
                },
                "ratios": {"sealed_over_plain": round(sealed_ns / plain, 2)},
                "bytes_per_line": {
                    "plain": round(size_plain),
                    "sealed": round(size_sealed),
                    "ratio": round(size_sealed / size_plain, 2),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
