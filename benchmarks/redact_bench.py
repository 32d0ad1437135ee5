"""Cost per event of the redact step: this checkout against an earlier one, in the same run.

    .venv/bin/python benchmarks/redact_bench.py [--before REF] [--events N] [--rounds R]

Events (each built once, redacted N times per round):

- ``chat_clean``: a ~2 KB chat completion without personal data (most traffic);
- ``chat_pii``: the same with an email, a phone number, a card, an IPv4 address and a key;
- ``chat_headers``: clean content, request headers and a request body that carries headers
  (a cookie, an authorization header) and a JSON tool call;
- ``chat_16k``: a ~16 KB conversation with a few findings.

Per event and round: ``before`` (the redact step of ``REF``, default ``main``, loaded from
git into a private package), ``after`` (this checkout's ``auditpipe.redaction.step``), and two
baselines that bound the cost of merely visiting the event: ``copy`` (``dict(event)``) and
``orjson`` (``orjson.dumps(event)``). Rounds interleave the variants; the JSON printed has the
median microseconds per event of each, and the ratios after/before and after/orjson.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_bench import sample_event

ROOT = Path(__file__).resolve().parent.parent
_OLD_FILES = ("redact.py", "detectors.py", "base.py", "steps.py")


def load_before(ref: str) -> Callable[[dict[str, Any]], Any] | None:
    """The default redact step of ``ref`` (its processors/redact.py and what it imports)."""
    pkg = Path(tempfile.mkdtemp(prefix="redact-before-")) / "_redact_before"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in _OLD_FILES:
        try:
            text = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{ref}:processors/{name}"],
                capture_output=True, check=True, text=True,
            ).stdout  # fmt: skip
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"[redact_bench] no 'before' ({ref}:processors/{name}: {exc})", file=sys.stderr)
            return None
        (pkg / name).write_text(text)
    sys.path.insert(0, str(pkg.parent))
    module = importlib.import_module("_redact_before.redact")
    step: Callable[[dict[str, Any]], Any] = module.RedactStep()
    return step


def events() -> dict[str, dict[str, Any]]:
    clean = sample_event(2048)
    pii = sample_event(2048)
    pii["input"]["messages"][1]["content"] += (
        " Reach me at jane.doe@example.com or +1 415 555 2671; card 4111 1111 1111 1111,"
        " server 10.20.30.40. My key is sk-proj-Ab3dEf6hIj9kLmN0pQrStUvWxYz1234567890."
    )
    headers = sample_event(2048)
    headers["headers"] = {**headers["headers"], "x-forwarded-for": "203.0.113.9"}
    headers["input"]["tools_request"] = {
        "url": "https://api.example.com/v1/items",
        "headers": {"Cookie": "sid=4c8e2f1a9b7d; theme=dark", "Authorization": "Basic dXNlcjpw"},
    }
    call = {"name": "http_get", "arguments": '{"url": "https://x.test/a?b=1", "limit": 10}'}
    headers["input"]["messages"].append({"role": "assistant", "tool_calls": [{"function": call}]})
    big = sample_event(16384)
    big["input"]["messages"][1]["content"] += " mail ops@example.org from 192.168.10.20."
    return {"chat_clean": clean, "chat_pii": pii, "chat_headers": headers, "chat_16k": big}


def per_event_us(fn: Callable[[Any], Any], event: dict[str, Any], n: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        fn(event)
    return (time.perf_counter() - start) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="git ref of the 'before' step")
    parser.add_argument("--events", type=int, default=500, help="redactions per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    from auditpipe.redaction.step import RedactStep

    variants: dict[str, Callable[[Any], Any]] = {
        "copy": dict,
        "orjson": orjson.dumps,
        "after": RedactStep(),
    }
    before = load_before(args.before)
    if before is not None:
        variants["before"] = before
    samples = events()
    times: dict[str, dict[str, list[float]]] = {e: {v: [] for v in variants} for e in samples}
    for fn in variants.values():  # warm up (gate caches, compiled patterns)
        for event in samples.values():
            per_event_us(fn, event, 50)
    for _ in range(args.rounds):
        for name, event in samples.items():
            for variant, fn in variants.items():
                times[name][variant].append(per_event_us(fn, event, args.events))
    result: dict[str, Any] = {
        "before_ref": args.before if before is not None else None,
        "events": args.events,
        "rounds": args.rounds,
        "us_per_event_median": {},
    }
    for name, by_variant in times.items():
        med = {v: round(statistics.median(ts), 2) for v, ts in by_variant.items()}
        entry: dict[str, Any] = {**med, "bytes": len(orjson.dumps(samples[name]))}
        if "before" in med:
            entry["after_over_before"] = round(med["after"] / med["before"], 2)
        entry["after_over_orjson"] = round(med["after"] / med["orjson"], 2)
        result["us_per_event_median"][name] = entry
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
