"""The embedded broker launcher: ready when started, no orphan when stopped or orphaned."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from auditpipe.broker import EmbeddedBroker, kafka_bootstrap

from .conftest import wait_until


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"  # a zombie is dead, only not reaped yet
    except FileNotFoundError:
        return False


class TestEmbeddedBroker:
    def test_start_accepts_connections_and_stop_reaps_the_process(self) -> None:
        broker = EmbeddedBroker()
        broker.start()
        assert broker.process is not None
        pid = broker.process.pid
        socket.create_connection(("127.0.0.1", broker.port or 0), timeout=2).close()
        broker.stop()
        assert not pid_alive(pid)
        broker.stop()  # safe twice

    def test_broker_dies_with_a_killed_parent(self) -> None:
        """kill -9 of the process that started the broker leaves no orphan broker."""
        code = (
            "import sys, time\n"
            "from auditpipe.broker import EmbeddedBroker\n"
            "b = EmbeddedBroker(); b.start()\n"
            "print(b.process.pid, flush=True)\n"
            "time.sleep(120)\n"
        )
        parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert parent.stdout is not None
        broker_pid = int(parent.stdout.readline())
        assert pid_alive(broker_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_until(lambda: not pid_alive(broker_pid), 10, "the orphaned broker to exit")

    def test_existing_bootstrap_starts_nothing(self) -> None:
        with kafka_bootstrap("kafka.example:9092") as (bootstrap, broker):
            assert bootstrap == "kafka.example:9092" and broker is None


class TestBrokerCommand:
    def test_auditpipe_broker_creates_the_topics_and_stops_on_sigterm(self) -> None:
        """`auditpipe broker` prints its address, has the pipeline's topics, exits on SIGTERM."""
        import asyncio

        from aiokafka.admin import AIOKafkaAdminClient

        proc = subprocess.Popen(
            [sys.executable, "-m", "auditpipe", "broker"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("AUDITPIPE_")},
        )
        try:
            assert proc.stdout is not None
            bootstrap = proc.stdout.readline().decode().strip()

            async def topics() -> list[str]:
                admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
                await admin.start()
                try:
                    return list(await admin.list_topics())
                finally:
                    await admin.close()

            names = asyncio.run(topics())
            assert {"auditpipe.raw", "auditpipe.events", "auditpipe.dlq"} <= set(names)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
