"""``auditpipe dev``: the whole pipeline on one machine, driven by real OpenAI-client traffic.

Order of start: broker (embedded unless ``kafka.bootstrap`` is set) and topics, a processor
worker (a child process), the sink runner, the demo server with the producer hook, then
traffic. Event JSON lines go to stdout (stdout sink); progress and the summary go to stderr.
Shutdown runs in reverse and is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .broker import free_port, kafka_bootstrap, popen_child, tune_for_embedded_broker
from .kafka import ensure_topics
from .settings import Settings


@dataclass
class DevOptions:
    sink: str = "stdout"
    requests: int | None = None
    timeout_secs: float = 120.0
    concurrency: int = 4
    port: int | None = None
    rate_per_sec: float = 2.0
    config_path: str | None = None
    origin: str = "settings"


def progress(message: str) -> None:
    print(f"[auditpipe dev] {message}", file=sys.stderr, flush=True)


def _with_bootstrap(settings: Settings, bootstrap: str) -> Settings:
    kafka = settings.kafka.model_copy(update={"bootstrap": bootstrap})
    return settings.model_copy(update={"kafka": kafka})


def spawn_processor(
    bootstrap: str, config_path: str | None, settings: Settings
) -> subprocess.Popen[bytes]:
    proc = settings.processors
    env = {
        **os.environ,
        "AUDITPIPE_KAFKA_BOOTSTRAP": bootstrap,
        "AUDITPIPE_PROCESSORS_SESSION_TIMEOUT_SECS": str(proc.session_timeout_secs),
        "AUDITPIPE_PROCESSORS_HEARTBEAT_INTERVAL_SECS": str(proc.heartbeat_interval_secs),
    }
    cmd = [sys.executable, "-m", "auditpipe", "process", "--loglevel", "warning"]
    if config_path:
        cmd += ["--config", config_path]
    return popen_child(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr, env=env)


def stop_process(proc: subprocess.Popen[bytes], timeout_secs: float = 10.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_secs)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


DEV_FILE_PATH = ".auditpipe/events.jsonl"
DEV_BUCKET = "auditpipe-dev"


def dev_sink_defaults(
    settings: Settings, sink: str, stack: contextlib.ExitStack
) -> tuple[Settings, str | None]:
    """Settings a newcomer lacks, filled in for ``auditpipe dev`` only: the file sink writes
    ``./.auditpipe/events.jsonl``; the s3 sink gets an embedded moto S3 server (in memory,
    gone when dev exits) with the bucket ``auditpipe-dev``; the postgres sink needs nothing
    (no dsn: the embedded PostgreSQL). Settings given explicitly win. Returns the settings and
    a sentence saying where the events go."""
    table = dict(settings.sinks.get(sink) or {})
    where = None
    if sink == "file" and "path" not in table:
        table["path"] = DEV_FILE_PATH
        where = f"events go to {os.path.abspath(DEV_FILE_PATH)}"
    elif sink == "s3" and "bucket" not in table:
        from moto.server import ThreadedMotoServer

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        stack.callback(server.stop)
        keys = {"access_key_id": "dev", "secret_access_key": "dev", "region": "us-east-1"}
        table.update(bucket=DEV_BUCKET, endpoint_url=f"http://127.0.0.1:{port}", path_style=True,
                     **keys)  # fmt: skip
        import boto3

        boto3.client(
            "s3", endpoint_url=table["endpoint_url"], aws_access_key_id="dev",
            aws_secret_access_key="dev", region_name="us-east-1",
        ).create_bucket(Bucket=DEV_BUCKET)  # fmt: skip
        endpoint = table["endpoint_url"]
        where = f"events go to s3://{DEV_BUCKET} on an embedded moto server at {endpoint}"
    elif sink == "postgres" and not table.get("dsn"):
        from .embedded_pg import DEFAULT_DATA_DIR

        data_dir = table.get("embedded_data_dir", DEFAULT_DATA_DIR)
        where = (f"events go to the embedded PostgreSQL in {os.path.abspath(data_dir)}; "
                 "browse them with `auditpipe serve`")  # fmt: skip
    else:
        return settings, None
    return settings.model_copy(update={"sinks": {**settings.sinks, sink: table}}), where


async def run_dev(settings: Settings, options: DevOptions) -> int:
    with contextlib.ExitStack() as stack:
        settings, where = dev_sink_defaults(settings, options.sink, stack)
        return await _run_dev(settings, options, where)


async def _run_dev(settings: Settings, options: DevOptions, where: str | None) -> int:
    from auditpipe.sinks import Migratable, create_sink

    sink = create_sink(options.sink, settings.sinks, options.origin)  # fail fast on bad config
    started = time.monotonic()
    if isinstance(sink, Migratable):  # dev creates or upgrades the store's schema itself
        await sink.migrate()
        progress(f"sink {sink.name}: schema is up to date")
    if where:
        progress(where)
    with kafka_bootstrap(settings.kafka.bootstrap) as (bootstrap, broker):
        settings = _with_bootstrap(settings, bootstrap)
        if broker is not None:
            settings = tune_for_embedded_broker(settings)
        await ensure_topics(settings.kafka)
        where = "embedded broker" if broker else "Kafka"
        progress(f"{where} at {bootstrap}; topics ready ({time.monotonic() - started:.1f}s)")
        worker = spawn_processor(bootstrap, options.config_path, settings)
        try:
            return await _run_with_worker(settings, options, sink, worker, started)
        finally:
            code = stop_process(worker)
            if code not in (0, -signal.SIGTERM, None):
                progress(f"processor worker exited with code {code}")


async def _run_with_worker(
    settings: Settings,
    options: DevOptions,
    sink: Any,
    worker: subprocess.Popen[bytes],
    started: float,
) -> int:
    from auditpipe.producer import AuditProducer
    from auditpipe.sinks.runner import SinkRunner

    from .demo import serving_demo

    delivered: Counter[str] = Counter()

    def on_written(batch: Sequence[dict[str, Any]]) -> None:
        for event in batch:
            delivered[event["request_id"]] += 1

    runner = SinkRunner(sink, settings, on_written=on_written)
    runner_task = asyncio.create_task(runner.run(), name="sink-runner")
    producer = AuditProducer(settings).start()
    port = options.port or free_port()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with serving_demo(producer, "127.0.0.1", port) as port:
            progress(f"demo server on http://127.0.0.1:{port}/v1 with the audit hook; "
                     f"sink {sink.name}")  # fmt: skip
            sent = await _traffic(port, options, stop)
            if options.requests is None:
                return 130 if stop.is_set() else 0
            ok = await _wait_delivered(sent, delivered, options, worker, runner_task, stop)
            elapsed = time.monotonic() - started
            stats = producer.stats()
            missing = [rid for rid in sent if delivered[rid] == 0]
            progress(
                f"summary: sent={len(sent)} captured={stats['emitted']} "
                f"produced={stats['sent']} delivered={len(sent) - len(missing)} "
                f"duplicates={sum(delivered.values()) - len(delivered)} time={elapsed:.1f}s"
            )
            if ok:
                return 0
            progress(f"FAILED: {len(missing)} of {len(sent)} events did not reach the sink")
            progress(f"  producer: {stats}")
            progress(f"  sink runner: {runner.snapshot()}")
            if worker.poll() is not None:
                progress(f"  the processor worker exited with code {worker.returncode}")
            return 1
    finally:
        await producer.astop()
        runner.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner_task, 15)


async def _traffic(port: int, options: DevOptions, stop: asyncio.Event) -> list[str]:
    """Send requests with the official openai client; return the request ids that succeeded."""
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-demo-not-a-secret", max_retries=2
    )
    run_id = uuid.uuid4().hex[:8]
    sent: list[str] = []
    failures = 0
    sem = asyncio.Semaphore(max(1, options.concurrency))

    async def one(i: int) -> None:
        nonlocal failures
        rid = f"dev-{run_id}-{i:06d}"
        async with sem:
            try:
                await client.chat.completions.create(
                    model="demo-echo-1",
                    messages=[
                        {"role": "system", "content": "You are a demo."},
                        {"role": "user", "content": f"Hello number {i}, what is {i} + {i}?"},
                    ],
                    store=True,
                    metadata={"source": "auditpipe-dev", "run": run_id, "seq": str(i)},
                    extra_headers={"x-request-id": rid},
                )
                sent.append(rid)
            except openai.OpenAIError as exc:
                failures += 1
                progress(f"request {rid} failed: {exc}")

    try:
        if options.requests is not None:
            await asyncio.gather(*(one(i) for i in range(options.requests)))
            progress(f"sent {len(sent)} request(s), {failures} failed")
        else:
            progress(f"sending {options.rate_per_sec:g} request(s)/s until Ctrl-C")
            i = 0
            interval = 1.0 / max(options.rate_per_sec, 0.001)
            while not stop.is_set():
                await one(i)
                i += 1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
    finally:
        await client.close()
    return sent


async def _wait_delivered(
    sent: list[str],
    delivered: Counter[str],
    options: DevOptions,
    worker: subprocess.Popen[bytes],
    runner_task: asyncio.Task[None],
    stop: asyncio.Event,
) -> bool:
    deadline = time.monotonic() + options.timeout_secs
    last_report = 0.0
    while time.monotonic() < deadline and not stop.is_set():
        done = sum(1 for rid in sent if delivered[rid])
        if done == len(sent):
            return True
        if worker.poll() is not None or runner_task.done():
            if runner_task.done() and runner_task.exception():
                progress(f"sink runner failed: {runner_task.exception()!r}")
            return False
        now = time.monotonic()
        if now - last_report >= 2.0:
            progress(f"delivered {done}/{len(sent)}")
            last_report = now
        await asyncio.sleep(0.05)
    return False
