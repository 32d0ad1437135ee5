"""``auditpipe soak``: a short run with every fault kind on the embedded default (real broker,
processor and sink processes, the official openai client), and proof that the account detects
loss and duplicates (rows removed from / added to the store before the count)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from auditpipe.settings import Settings, load_settings
from auditpipe.soak import FileStore, SoakOptions, run_soak, settings_toml


def _soak_cli(*args: str, timeout: float = 240) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITPIPE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "auditpipe", "soak", "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return proc.returncode, summary, proc.stderr


def test_short_soak_with_every_fault_loses_nothing(tmp_path: Path) -> None:
    code, s, err = _soak_cli(
        "--seconds", "60", "--rate", "10", "--fault-every", "11", "--fault-secs", "6",
        "--faults", "all", "--seed", "17", "--workdir", str(tmp_path / "soak"),
    )  # fmt: skip
    assert s, f"no JSON summary; stderr tail: {err[-3000:]}"
    assert code == 0, f"soak failed: {json.dumps(s, indent=1)}\n{err[-3000:]}"
    assert s["lost"] == 0 and s["duplicates"] == 0 and s["unexpected"] == 0
    assert s["sent"] >= 500 and s["expected"] > 0
    # every expected event is delivered, dead-lettered or dropped with a reason
    accounted = s["delivered"] + s["dead_lettered"] + s["dropped"]
    assert accounted == s["expected"], s
    # the mix really had each kind, and the store=false ones are not expected
    assert set(s["kinds"]) == {"plain", "stream", "no_store", "error", "disconnect"}
    assert s["not_expected"] == s["kinds"]["no_store"]
    assert s["outcomes"].get("http_404") == s["kinds"]["error"]
    assert s["e2e_p50_ms"] is not None and s["e2e_p99_ms"] >= s["e2e_p50_ms"]
    faults = {f["kind"]: f for f in s["faults"]}
    assert set(faults) == {"broker", "processor", "sink", "store", "disk"}, s["faults"]
    for f in s["faults"]:
        assert f["observed"], f
        assert f["end_s"] > f["start_s"]
    assert faults["broker"]["connections_aborted"] + faults["broker"]["connections_refused"] > 0
    for kind in ("processor", "sink"):
        assert faults[kind]["exit_code"] == -9
        assert faults[kind]["new_pid"] != faults[kind]["old_pid"]
    assert faults["store"]["store_grew_bytes"] == 0
    assert faults["store"]["partitions_recovered"] > 0
    assert faults["disk"]["spool_writes_refused"] > 0
    assert s["dropped_reasons"].get("disk_full", 0) > 0
    # the broker fault made the producer spool and replay
    assert s["producer"]["replayed"] > 0
    # started once, restarted once after its kill -9, alive at the end
    assert s["children"] == {"processor": {"starts": 2, "alive": True},
                             "sink": {"starts": 2, "alive": True}}  # fmt: skip


def test_account_detects_lost_and_duplicated_rows(tmp_path: Path) -> None:
    """A store that loses 3 rows and duplicates 1: lost == 3, duplicates == 1, exit 1. One
    event the sink's own step fails on is dead-lettered: read back from the DLQ topic with its
    reason, and not counted as lost."""
    from auditpipe.soak import Soak

    tampered: dict[str, object] = {}
    picker = Soak(Settings(), SoakOptions(seed=3, workdir=str(tmp_path / "picker")))
    poison_seq = next(i for i in range(100) if picker._pick() == "plain")
    poison = f"soak-testrun1-{poison_seq:07d}"
    settings = Settings.model_validate(
        {"sinks": {"file": {"path": str(tmp_path / "events.jsonl"),
                            "steps": ["tests.failing_step:FailOn"],
                            "fail_on": {"request_id": poison}}}}
    )  # fmt: skip

    def tamper(store: FileStore) -> None:
        ids = sorted(store.count())
        assert len(ids) >= 5, ids
        tampered["removed"] = store.delete_rows(set(ids[:3]))
        line = next(
            line
            for line in store.path.read_bytes().splitlines(keepends=True)
            if ids[4].encode() in line
        )
        with open(store.path, "ab") as fh:
            fh.write(line)

    options = SoakOptions(
        seconds=6, rate=5, faults=[], drain_secs=60, seed=3, run_id="testrun1",
        workdir=str(tmp_path / "soak"), before_count=tamper,
    )  # fmt: skip
    code, s = asyncio.run(run_soak(settings, options))
    assert tampered["removed"] == 3
    assert s["dead_lettered"] == 1, s
    assert s["dead_letter_reasons"] == {"sink:file:step:fail_on/step_failed": 1}, s
    assert code == 1 and not s["ok"]
    assert s["lost"] == 3, s
    assert s["duplicates"] == 1, s
    assert len(s["missing_ids"]) == 3
    # located: each went through both topics and the sink group committed past it (so the loss
    # is the store's: here, the rows deleted behind the sink's back)
    for sid in s["missing_ids"]:
        where = s["missing_where"][sid]
        assert set(where) == {"auditpipe.raw", "auditpipe.events"}, where
        assert where["auditpipe.events"]["committed"] > where["auditpipe.events"]["offset"]


def test_bad_flags_name_the_flag() -> None:
    for args, needle in (
        (["--faults", "broker,meteor"], "--faults: unknown fault 'meteor'"),
        (["--sink", "s3", "--seconds", "1"], "--sink 's3'"),
        (["--rate", "0"], "--rate must be > 0"),
    ):
        code, s, err = _soak_cli(*args, timeout=60)
        assert code == 2 and not s, err
        assert needle in err, err


def test_children_settings_file_round_trips(tmp_path: Path) -> None:
    """The settings file the soak writes for its processor and sink loads to the same
    settings (nested tables, lists of tables, unicode)."""
    config = tmp_path / "in.toml"
    config.write_text(
        '[kafka]\nbootstrap = "127.0.0.1:1"\n[sinks.file]\npath = "/tmp/ä x.jsonl"\n'
        '[pipeline]\nsteps = ["enrich", "sample"]\n[pipeline.sample]\ndefault_rate = 0.5\n'
        '[[pipeline.sample.rules]]\nmodel = "gpt-*"\nrate = 1.0\n'
    )
    settings = load_settings(config, env={})
    out = tmp_path / "out.toml"
    out.write_text(settings_toml(settings))
    assert load_settings(out, env={}) == settings


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_expected_follows_a_configured_sample_step(rate: float, tmp_path: Path) -> None:
    """With sampling configured, events the sample step drops are not expected (errors and
    other keep_when events always are)."""
    from auditpipe.soak import Sent, Soak

    settings = Settings.model_validate(
        {"pipeline": {"steps": ["enrich", "sample"], "sample": {"default_rate": rate}}}
    )
    soak = Soak(settings, SoakOptions(workdir=str(tmp_path)))
    soak.sent = [
        Sent("a", "plain", True, "ok"),
        Sent("b", "error", True, "http_404"),
        Sent("c", "no_store", False, "ok"),
    ]
    assert soak._expected() == ({"a", "b"} if rate == 1.0 else {"b"})


def test_postgres_soak_store_fault_and_loss_detection() -> None:
    """The postgres sink on the embedded PostgreSQL (pgserver): the store fault stops the
    server and the sink recovers; 2 rows deleted before the count are reported lost, nothing
    else is. (The work directory is not under pytest's tmp_path: a concurrent pytest session
    resets that tree to mode 0700, which locks out the server's own user.)"""
    removed: list[int] = []
    workdir = tempfile.mkdtemp(prefix="auditpipe-soak-test-")

    def tamper(store: object) -> None:
        from auditpipe.soak import PostgresStore

        assert isinstance(store, PostgresStore)
        ids = sorted(store.count())
        removed.append(store.delete_rows(set(ids[:2])))

    options = SoakOptions(
        seconds=16, rate=5, sink="postgres", faults=["store", "sink"], fault_every=8,
        fault_secs=3, drain_secs=60, seed=5, workdir=workdir, before_count=tamper,
    )  # fmt: skip
    try:
        code, s = asyncio.run(run_soak(Settings(), options))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert removed == [2]
    assert code == 1 and s["lost"] == 2, s
    assert s["delivered"] == s["expected"] - 2 and s["duplicates"] == 0
    faults = {f["kind"]: f for f in s["faults"]}
    assert faults["store"]["observed"] and faults["store"]["server_stopped"], faults
    assert faults["store"]["partitions_recovered"] > 0
    assert faults["sink"]["observed"], faults
