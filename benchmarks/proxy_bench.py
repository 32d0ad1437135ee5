"""What `auditpipe proxy` adds: the same upstream, direct vs through the proxy, in one run.

    .venv/bin/python benchmarks/proxy_bench.py [--latency-requests N] [--throughput-requests N]
        [--concurrency K] [--rounds R] [--transport kafka|stdout] [--chunks C]

Three processes on this machine: a plain fast upstream (uvicorn, a fixed ~600-byte chat
completion or an SSE stream of ``--chunks`` chunks, no delay), ``auditpipe proxy`` in front of
it with capture on (every request says ``"store": true``; the Kafka transport into an embedded
broker by default, whose records are counted afterwards to show every exchange was captured),
and the load generator (aiohttp, one connection pool per target).

A second proxy with capture off (``AUDITPIPE_ENABLED=0``) shows what forwarding alone costs.
For non-streaming and streaming requests:

- ``latency``: requests one at a time; p50/p99/mean of the full request (streaming: until the
  last byte; ``ttfb`` until the first body byte), direct and proxied, and the added ms;
- ``throughput``: ``--concurrency`` requests in flight; requests/s direct and proxied, ratio.

Direct and proxied runs alternate, ``--rounds`` times; the JSON has every round and the
medians. The machine's cores are shared by all three processes (and the broker), so the
proxied throughput is bounded by the proxy's one Python process, not by the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

CHAT_BODY = {
    "model": "bench-model",
    "messages": [{"role": "user", "content": "Say something about foxes and dogs."}],
    "store": True,
}


# -- the upstream (run as a subprocess: python proxy_bench.py --serve-upstream PORT) -----------


def _upstream_app(chunks: int) -> Any:
    text = "The quick brown fox jumps over the lazy dog. " * 8
    answer = json.dumps(
        {
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 1,
            "model": "bench-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 80, "total_tokens": 88},
        }
    ).encode()  # fmt: skip
    sse = [
        b"data: " + json.dumps({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
            "model": "bench-model",
            "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}],
        }).encode() + b"\n\n"
        for i in range(chunks)
    ] + [b"data: [DONE]\n\n"]  # fmt: skip
    json_headers = [(b"content-type", b"application/json"),
                    (b"content-length", str(len(answer)).encode())]  # fmt: skip
    sse_headers = [(b"content-type", b"text/event-stream")]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        if b'"stream": true' in body:
            await send({"type": "http.response.start", "status": 200, "headers": sse_headers})
            for chunk in sse:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": json_headers})
            await send({"type": "http.response.body", "body": answer})

    return app


def serve_upstream(port: int, chunks: int) -> None:
    import uvicorn

    uvicorn.run(_upstream_app(chunks), host="127.0.0.1", port=port, log_level="warning",
                access_log=False, lifespan="off")  # fmt: skip


# -- the load generator -------------------------------------------------------------------------


async def _one(session: Any, url: str, body: bytes) -> tuple[float, float]:
    """(seconds to the first body byte, seconds to the last) of one request."""
    start = time.perf_counter()
    first = 0.0
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
        async for _ in r.content.iter_any():
            if not first:
                first = time.perf_counter()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    end = time.perf_counter()
    return (first or end) - start, end - start


async def run_load(url: str, body: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(min(50, requests)):  # warm-up: connections open, code paths hot
            await _one(session, url, body)
        queue = iter(range(requests))
        ttfb: list[float] = []
        total: list[float] = []

        async def worker() -> None:
            for _ in queue:
                t1, t2 = await _one(session, url, body)
                ttfb.append(t1)
                total.append(t2)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "requests": requests,
        "requests_per_sec": round(requests / elapsed, 1),
        "p50_ms": _pct(total, 50),
        "p99_ms": _pct(total, 99),
        "mean_ms": round(statistics.fmean(total) * 1000, 3),
        "ttfb_p50_ms": _pct(ttfb, 50),
        "ttfb_p99_ms": _pct(ttfb, 99),
    }


def _pct(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1000, 3)


# -- orchestration ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start listening")


async def _count_records(bootstrap: str, topic: str, timeout_secs: float = 60.0) -> dict[str, int]:
    """Records on ``topic`` and their distinct event ids, read back from the start."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        records, ids = 0, set()
        deadline = time.monotonic() + timeout_secs
        while time.monotonic() < deadline:
            positions = {tp: await consumer.position(tp) for tp in ends}
            if all(positions[tp] >= end for tp, end in ends.items()):
                break
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                records += len(msgs)
                ids.update(m.key for m in msgs)
        return {"records": records, "distinct_event_ids": len(ids)}
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-requests", type=int, default=400)
    parser.add_argument("--throughput-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=20, help="SSE chunks per streamed answer")
    parser.add_argument("--transport", choices=("kafka", "stdout"), default="kafka")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.chunks)
        return

    procs: list[subprocess.Popen[bytes]] = []
    broker = None
    try:
        up_port, proxy_port = _free_port(), _free_port()
        up = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(up_port),
                               "--chunks", str(args.chunks)])  # fmt: skip
        procs.append(up)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDITPIPE_", "DYN_"))}
        topic = f"bench-proxy-{uuid.uuid4().hex[:8]}.raw"
        if args.transport == "kafka":
            from auditpipe.broker import EmbeddedBroker
            from auditpipe.kafka import ensure_topics
            from auditpipe.settings import KafkaSettings

            broker = EmbeddedBroker()
            broker.start()
            kafka = KafkaSettings(bootstrap=broker.bootstrap, raw_topic=topic, partitions=3)
            asyncio.run(ensure_topics(kafka))
            env.update(AUDITPIPE_KAFKA_BOOTSTRAP=broker.bootstrap, AUDITPIPE_KAFKA_RAW_TOPIC=topic)
        else:
            env["AUDITPIPE_PRODUCER_TRANSPORT"] = "stdout"
        proxy = subprocess.Popen(
            [sys.executable, "-m", "auditpipe", "proxy", "--upstream",
             f"http://127.0.0.1:{up_port}", "--port", str(proxy_port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        procs.append(proxy)
        bare_port = _free_port()  # the same proxy with capture off: what forwarding costs alone
        bare = subprocess.Popen(
            [sys.executable, "-m", "auditpipe", "proxy", "--upstream",
             f"http://127.0.0.1:{up_port}", "--port", str(bare_port)],
            env={**env, "AUDITPIPE_ENABLED": "0"}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(bare)
        _wait_port(up_port, up, "upstream")
        _wait_port(proxy_port, proxy, "proxy")
        _wait_port(bare_port, bare, "proxy without capture")
        targets = {
            "direct": f"http://127.0.0.1:{up_port}/v1/chat/completions",
            "proxy": f"http://127.0.0.1:{proxy_port}/v1/chat/completions",
            "proxy_capture_off": f"http://127.0.0.1:{bare_port}/v1/chat/completions",
        }
        bodies = {
            "non_streaming": json.dumps(CHAT_BODY).encode(),
            "streaming": json.dumps({**CHAT_BODY, "stream": True}).encode(),
        }
        rounds: dict[str, list[dict[str, Any]]] = {}
        proxied = 0
        for r in range(args.rounds):
            for mode, body in bodies.items():
                for kind, requests, conc in (("latency", args.latency_requests, 1),
                                             ("throughput", args.throughput_requests,
                                              args.concurrency)):  # fmt: skip
                    order = list(targets) if r % 2 == 0 else list(reversed(targets))
                    for target in order:
                        print(f"[proxy_bench] round {r + 1}: {mode} {kind} {target}",
                              file=sys.stderr)  # fmt: skip
                        result = asyncio.run(run_load(targets[target], body, requests, conc))
                        rounds.setdefault(f"{mode}.{kind}.{target}", []).append(result)
                        if target == "proxy":
                            proxied += requests + min(50, requests)
        proxy.send_signal(signal.SIGTERM)
        _, err = proxy.communicate(timeout=60)
        out: dict[str, Any] = {
            "benchmark": "proxy",
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "transport": args.transport,
            "concurrency": args.concurrency,
            "sse_chunks": args.chunks,
            "rounds": rounds,
        }
        for mode in bodies:
            lat = {t: rounds[f"{mode}.latency.{t}"] for t in targets}
            thr = {t: rounds[f"{mode}.throughput.{t}"] for t in targets}

            def med(runs: list[dict[str, Any]], key: str) -> float:
                return round(statistics.median(x[key] for x in runs), 3)

            summary = {
                "latency_ms_median": {
                    t: {k: med(lat[t], k) for k in ("p50_ms", "p99_ms", "ttfb_p50_ms")}
                    for t in targets
                },
                "added_latency_ms": {
                    "p50": round(med(lat["proxy"], "p50_ms") - med(lat["direct"], "p50_ms"), 3),
                    "p99": round(med(lat["proxy"], "p99_ms") - med(lat["direct"], "p99_ms"), 3),
                },
                "added_latency_ms_capture_off": {
                    p: round(
                        med(lat["proxy_capture_off"], f"{p}_ms") - med(lat["direct"], f"{p}_ms"), 3
                    )
                    for p in ("p50", "p99")
                },
                "requests_per_sec_median": {t: med(thr[t], "requests_per_sec") for t in targets},
                f"p50_ms_at_concurrency_{args.concurrency}": {
                    t: med(thr[t], "p50_ms") for t in targets
                },
            }
            rps = summary["requests_per_sec_median"]
            summary["throughput_ratio_proxy_over_direct"] = round(rps["proxy"] / rps["direct"], 3)
            summary["throughput_ratio_capture_off_over_direct"] = round(
                rps["proxy_capture_off"] / rps["direct"], 3
            )
            out[mode] = summary
        if args.transport == "kafka" and broker is not None:
            captured = asyncio.run(_count_records(broker.bootstrap, topic))
            out["captured"] = {"proxied_requests": proxied, **captured}
        out["proxy_summary"] = err.decode(errors="replace").strip().splitlines()[-1:]
        print(json.dumps(out, indent=2))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
