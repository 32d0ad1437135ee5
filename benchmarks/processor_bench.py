"""Events/s through one processor worker (default chain) vs a raw aiokafka passthrough.

    .venv/bin/python benchmarks/processor_bench.py [--events N] [--rounds R]

Each round, on the same broker (the embedded one unless AUDITPIPE_KAFKA_BOOTSTRAP is set):

- ``passthrough``: a plain aiokafka consumer reads N pre-produced ~2 KB events from a topic and
  produces each to another topic (acks=all), no decoding: the ceiling for this broker.
- ``worker``: `auditpipe process` (enrich, redact, sample) reads the same N events from its
  raw topic and forwards them to its events topic.
- ``worker_step_process``: the same with ``step_processes = 1`` (steps in a second process).
- ``faust_bare``: a Faust agent that only consumes and acks the same N events (faust_bare.py):
  what Faust's per-event path costs before any work is done.
- ``chain_in_process``: the same steps called in a loop without Kafka (where the time goes).

Rates are measured from the first record out to the last one out, so group joins and process
start-up are not counted. Over the same window the CPU time (user + system, all threads) of the
worker process, of the passthrough (this process) and of the broker is read from /proc: CPU
microseconds per event barely move when other programs load the machine, and they bound what
one worker can reach (``cpu_bound_events_per_sec``: 1e6 / CPU us per event, i.e. the rate with
one core to itself). ``worker_step_process`` is the worker with ``step_processes = 1``: its CPU
counts the step process too, and ``worker_step_process_main`` is the worker's own process alone
(Faust, delivery, the hand-over), which bounds it once the steps have cores of their own.
Prints one JSON object: medians over the rounds and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auditpipe.processors import chain_for, process_record
from auditpipe.schemas import encode, new_event
from codec_bench import sample_event

from auditpipe.broker import kafka_bootstrap
from auditpipe.kafka import ensure_topics
from auditpipe.settings import load_settings

PARTITIONS = 3
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_secs(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads); 0 when unknown."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


class CpuWindow:
    """CPU seconds of some processes (with their children, e.g. step processes) between
    :meth:`start` and :meth:`stop`."""

    def __init__(self, alone: tuple[str, ...] = (), **pids: int | None) -> None:
        self.pids = pids
        self.alone = alone  # keys measured without their children
        self.family: dict[str, list[int]] = {}
        self.started: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _now(self, key: str) -> float:
        return sum(cpu_secs(p) for p in self.family[key])

    def start(self) -> None:
        self.family = {
            k: [p, *child_pids(p)]
            if p and k not in self.alone and p != os.getpid()
            else [p]
            if p
            else []
            for k, p in self.pids.items()
        }
        self.started = {k: self._now(k) for k in self.pids}

    def stop(self) -> None:
        self.used = {k: self._now(k) - self.started[k] for k in self.pids}

    def us_per_event(self, n: int) -> dict[str, float]:
        return {k: round(v / n * 1e6, 1) for k, v in self.used.items()}


def events(n: int) -> list[bytes]:
    base = sample_event()
    out = []
    for i in range(n):
        e = dict(base, event_id=new_event()["event_id"], request_id=f"bench-{i}")
        out.append(encode(e))
    return out


async def fill(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        futures = [await producer.send(topic, v) for v in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def consumer(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        max_poll_records=2000,
        fetch_max_bytes=16 << 20,
        max_partition_fetch_bytes=8 << 20,
    )


async def passthrough(bootstrap: str, src: str, dst: str, n: int, cpu: CpuWindow) -> float:
    from auditpipe.kafka import install_init_producer_id_v3

    install_init_producer_id_v3()
    c = consumer(bootstrap, src)
    p = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
        compression_type="gzip", max_batch_size=1 << 20,
    )  # fmt: skip
    await c.start()
    await p.start()
    try:
        done = 0
        first: float | None = None
        while done < n:
            batch = await c.getmany(timeout_ms=500)
            futures = []
            for msgs in batch.values():
                for m in msgs:
                    futures.append(await p.send(dst, m.value, key=m.key))
            if futures:
                if first is None:
                    first = time.perf_counter()
                    cpu.start()
                await asyncio.gather(*futures)
                done += len(futures)
        assert first is not None
        cpu.stop()
        return (n - 1) / (time.perf_counter() - first)
    finally:
        await c.stop()
        await p.stop()


async def drain(
    bootstrap: str, topic: str, n: int, timeout_secs: float, cpu: CpuWindow | None = None
) -> float:
    c = consumer(bootstrap, topic)
    await c.start()
    try:
        seen = 0
        first: float | None = None
        last = 0.0
        deadline = time.monotonic() + timeout_secs
        polling_since = time.perf_counter()
        while seen < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker forwarded only {seen}/{n} events in {timeout_secs}s")
            batch = await c.getmany(timeout_ms=500)
            got = sum(len(m) for m in batch.values())
            if got:
                now = time.perf_counter()
                if first is None:
                    first = now
                    if cpu:
                        cpu.start()
                last = now
                seen += got
        if cpu:
            cpu.stop()
        assert first is not None
        if last > first:
            return (n - 1) / (last - first)
        return n / (last - polling_since)  # all in one poll (tiny runs): count the wait too
    finally:
        await c.stop()


def worker_rate(
    bootstrap: str, values: list[bytes], tmp: Path, broker_pid: int | None, step_processes: int
) -> tuple[float, dict[str, float]]:
    run_id = uuid.uuid4().hex[:8]
    raw, out, dlq = f"bench-{run_id}.raw", f"bench-{run_id}.events", f"bench-{run_id}.dlq"
    config = tmp / f"{run_id}.toml"
    config.write_text(
        f'[kafka]\nbootstrap = "{bootstrap}"\nraw_topic = "{raw}"\nevents_topic = "{out}"\n'
        f'dlq_topic = "{dlq}"\npartitions = {PARTITIONS}\n'
        f'[processors]\napp_id = "bench-{run_id}"\ndata_dir = "{tmp / run_id}"\n'
        "session_timeout_secs = 3\nheartbeat_interval_secs = 0.5\n"
        f"step_processes = {step_processes}\n"
    )
    settings = load_settings(config, env={})
    asyncio.run(ensure_topics(settings.kafka))
    asyncio.run(fill(bootstrap, raw, values))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITPIPE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "auditpipe", "process", "--config", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    cpu = CpuWindow(
        alone=("worker_main",), worker=proc.pid, worker_main=proc.pid, broker=broker_pid
    )
    try:
        rate = asyncio.run(drain(bootstrap, out, len(values), timeout_secs=300, cpu=cpu))
        return rate, cpu.us_per_event(len(values) - 1)
    finally:
        proc.terminate()
        proc.wait(30)


def faust_bare_rate(bootstrap: str, values: list[bytes]) -> tuple[float, float]:
    """Rate and CPU us per event of a do-nothing Faust agent (see faust_bare.py)."""
    run_id = uuid.uuid4().hex[:8]
    settings = load_settings(env={})
    kafka = settings.kafka.model_copy(
        update={"bootstrap": bootstrap, "raw_topic": f"fb-{run_id}.src",
                "events_topic": f"fb-{run_id}.dst", "dlq_topic": f"fb-{run_id}.dlq",
                "partitions": PARTITIONS}
    )  # fmt: skip
    asyncio.run(ensure_topics(kafka))
    asyncio.run(fill(bootstrap, kafka.raw_topic, values))
    script = Path(__file__).resolve().parent / "faust_bare.py"
    out = subprocess.run(
        [sys.executable, str(script), bootstrap, kafka.raw_topic, str(len(values))],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["rate"], result["cpu_us_per_event"]


def passthrough_rate(
    bootstrap: str, values: list[bytes], broker_pid: int | None
) -> tuple[float, dict[str, float]]:
    run_id = uuid.uuid4().hex[:8]
    src, dst = f"pt-{run_id}.src", f"pt-{run_id}.dst"
    settings = load_settings(env={})
    kafka = settings.kafka.model_copy(
        update={"bootstrap": bootstrap, "raw_topic": src, "events_topic": dst,
                "dlq_topic": f"pt-{run_id}.dlq", "partitions": PARTITIONS}
    )  # fmt: skip
    asyncio.run(ensure_topics(kafka))
    asyncio.run(fill(bootstrap, src, values))
    cpu = CpuWindow(passthrough=os.getpid(), broker=broker_pid)
    rate = asyncio.run(passthrough(bootstrap, src, dst, len(values), cpu))
    return rate, cpu.us_per_event(len(values) - 1)


def chain_rate(values: list[bytes]) -> float:
    chain = chain_for({})
    started = time.perf_counter()
    for i, v in enumerate(values):
        process_record(None, v, topic="t", partition=0, offset=i, steps=chain)
    return len(values) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    values = events(args.events)
    rates: dict[str, list[float]] = {
        "passthrough": [], "faust_bare": [], "worker": [], "worker_step_process": [],
        "chain_in_process": [],
    }  # fmt: skip
    cpu: dict[str, list[float]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        kafka_bootstrap(os.environ.get("AUDITPIPE_KAFKA_BOOTSTRAP")) as (bootstrap, broker),
    ):
        broker_pid = broker.process.pid if broker and broker.process else None
        for _ in range(args.rounds):
            rate, used = passthrough_rate(bootstrap, values, broker_pid)
            rates["passthrough"].append(rate)
            cpu.setdefault("passthrough", []).append(used["passthrough"])
            cpu.setdefault("broker_during_passthrough", []).append(used["broker"])
            rate, cpu_us = faust_bare_rate(bootstrap, values)
            rates["faust_bare"].append(rate)
            cpu.setdefault("faust_bare", []).append(round(cpu_us, 1))
            for name, step_processes in (("worker", 0), ("worker_step_process", 1)):
                rate, used = worker_rate(bootstrap, values, Path(tmp), broker_pid, step_processes)
                rates[name].append(rate)
                cpu.setdefault(name, []).append(used["worker"])
                if step_processes:
                    cpu.setdefault(f"{name}_main", []).append(used["worker_main"])
                cpu.setdefault(f"broker_during_{name}", []).append(used["broker"])
            rate = chain_rate(values)
            rates["chain_in_process"].append(rate)
            cpu.setdefault("chain_in_process", []).append(round(1e6 / rate, 1))
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        json.dumps(
            {
                "benchmark": "processor_throughput",
                "events": args.events,
                "rounds": args.rounds,
                "event_avro_bytes": len(values[0]),
                "events_per_sec_median": {k: round(v) for k, v in med.items()},
                "events_per_sec_rounds": {k: [round(x) for x in v] for k, v in rates.items()},
                "worker_vs_passthrough": round(med["worker"] / med["passthrough"], 3),
                "worker_step_process_vs_worker": round(
                    med["worker_step_process"] / med["worker"], 3
                ),
                "worker_step_process_vs_passthrough": round(
                    med["worker_step_process"] / med["passthrough"], 3
                ),
                "worker_vs_chain_in_process": round(med["worker"] / med["chain_in_process"], 3),
                "cpu_us_per_event_median": cpu_med,
                "cpu_bound_events_per_sec": {
                    k: round(1e6 / cpu_med[k])
                    for k in (
                        "passthrough",
                        "faust_bare",
                        "worker",
                        "worker_step_process_main",
                        "chain_in_process",
                    )
                    if cpu_med[k]
                },
                "load_average_1m": round(os.getloadavg()[0], 2),
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
