"""auditpipe.testing, the test support shipped with the package, including the sink contract as a
third party uses it: a sink in a package of its own (one file and one entry point)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from auditpipe.schemas import EventValidationError, decode, encode, to_json, validate

from auditpipe.settings import Settings
from auditpipe.testing import (
    consume,
    isolated_settings,
    make_event,
    make_events,
    wait_for,
    wait_until,
)


class TestEventFactory:
    def test_make_event_is_valid_and_survives_the_codec(self) -> None:
        """A made event validates against the schema and decodes to itself."""
        event = make_event()
        validate(event)
        assert decode(encode(event)) == event

    def test_overrides_replace_fields_and_ids_are_fresh(self) -> None:
        """Overrides win; two events never share an event_id or request_id."""
        a, b = make_event(model="gpt-x", status_code=500), make_event()
        assert a["model"] == "gpt-x" and a["status_code"] == 500
        assert a["event_id"] != b["event_id"] and a["request_id"] != b["request_id"]

    def test_an_unknown_field_is_refused_by_name(self) -> None:
        """A misspelt override raises, naming the field, instead of vanishing."""
        with pytest.raises(EventValidationError, match="modle"):
            make_event(modle="m")

    def test_make_events_sizes_and_numbers_them(self) -> None:
        """make_events(n, size) gives n events of about size bytes, request_id r0.. r(n-1)."""
        events = make_events(3, size=4000)
        assert [e["request_id"] for e in events] == ["r0", "r1", "r2"]
        assert all(3800 < len(to_json(e)) < 4200 for e in events)


class TestIsolatedSettings:
    def test_two_calls_share_no_topic_group_or_app_id(self) -> None:
        """Tests on one broker never see each other's records or consumer groups."""
        a, b = isolated_settings("h:9092"), isolated_settings("h:9092")
        names = lambda s: {  # noqa: E731
            s.kafka.raw_topic,
            s.kafka.events_topic,
            s.kafka.dlq_topic,
            s.runner.group_prefix,
            s.processors.app_id,
        }
        assert a.kafka.bootstrap == b.kafka.bootstrap == "h:9092"
        assert len(names(a)) == 5 and not names(a) & names(b)

    def test_embedded_shortens_group_sessions_only_when_asked(self) -> None:
        """The embedded broker needs short sessions; a real cluster keeps the defaults."""
        short, real = isolated_settings("h:1"), isolated_settings("h:1", embedded=False)
        assert short.runner.session_timeout_secs < real.runner.session_timeout_secs


class TestWaiting:
    def test_wait_until_returns_the_truthy_value(self) -> None:
        """The predicate's value is handed back, so a test can wait for and use a result."""
        calls = iter([None, 0, "found"])
        assert wait_until(lambda: next(calls), 5, "a value") == "found"

    def test_wait_until_fails_after_the_deadline_naming_what(self) -> None:
        """A condition that never holds fails after the timeout with what was awaited."""
        with pytest.raises(AssertionError, match=r"timed out after 0.1s waiting for the moon"):
            wait_until(lambda: False, 0.1, "the moon")

    def test_wait_for_fails_after_the_deadline_naming_what(self) -> None:
        """The async twin fails the same way, letting the loop run meanwhile."""
        with pytest.raises(AssertionError, match="waiting for the tide"):
            asyncio.run(wait_for(lambda: False, 0.1, "the tide"))

    def test_consume_names_the_topic_when_records_are_missing(self, settings: Settings) -> None:
        """consume() on a topic short of records fails naming it and the count it got."""
        topic = settings.kafka.dlq_topic
        with pytest.raises(AssertionError, match=rf"{topic}: got 0 record\(s\), expected 1"):
            asyncio.run(consume(settings.kafka.bootstrap or "", topic, 1, timeout_secs=1.0))


# A third party's sink: one module and one entry point, installed as a distribution on the path.
GOOD_SINK = '''
from pathlib import Path

from pydantic import Field

from auditpipe.schemas import to_json
from auditpipe.settings import StrictModel
from auditpipe.sinks import Batch, Sink


class AcmeConfig(StrictModel):
    directory: str = Field(description="each event becomes DIRECTORY/<event_id>.json")


class AcmeSink(Sink[AcmeConfig]):
    """One file per event, named by event_id: a redelivered event overwrites itself."""

    name = "acme"

    async def write(self, batch: Batch) -> None:
        root = Path(self.config.directory)
        root.mkdir(parents=True, exist_ok=True)
        for event in batch:
            (root / f"{event['event_id']}.json").write_bytes(to_json(event))
'''

# The same shape with two contract violations: unknown config keys are accepted, and every
# write appends (a redelivered batch is stored twice).
BAD_SINK = """
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from auditpipe.schemas import to_json_line
from auditpipe.sinks import Batch, Sink


class SloppyConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    directory: str = "."


class SloppySink(Sink[SloppyConfig]):
    name = "sloppy"

    async def write(self, batch: Batch) -> None:
        root = Path(self.config.directory)
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "events.jsonl", "ab") as f:
            f.writelines(to_json_line(e) for e in batch)
"""

CONTRACT_TESTS = """
import orjson
import pytest

from auditpipe.sinks import load_sink_class
from auditpipe.testing import SinkContract, kafka_bootstrap  # noqa: F401 (session fixture)


class TestAcme(SinkContract):
    sink_name = "acme"

    @pytest.fixture(autouse=True)
    def _store(self, tmp_path):
        self.root = tmp_path / "acme"

    def make_sink(self):
        return load_sink_class("acme").from_mapping({"directory": str(self.root)})

    def stored_ids(self):
        return [p.stem for p in self.root.glob("*.json")]


class TestSloppy(SinkContract):
    sink_name = "sloppy"

    @pytest.fixture(autouse=True)
    def _store(self, tmp_path):
        self.root = tmp_path / "sloppy"

    def make_sink(self):
        return load_sink_class("sloppy").from_mapping({"directory": str(self.root)})

    def stored_ids(self):
        lines = (self.root / "events.jsonl").read_bytes().splitlines()
        return [orjson.loads(line)["event_id"] for line in lines]
"""


def install_dist(site: Path, dist: str, source: str, entry_point: str) -> None:
    """Module ``dist``.py and a dist-info declaring ``entry_point`` in ``auditpipe.sinks``."""
    (site / f"{dist}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[auditpipe.sinks]\n{entry_point}\n")


class TestSinkContractForAThirdParty:
    def test_a_sink_in_its_own_package_runs_the_shipped_contract(
        self, tmp_path: Path, kafka_bootstrap: str
    ) -> None:
        """pytest, in a fresh process, runs SinkContract on sinks found by entry point: the
        conforming one passes every test, the sloppy one fails exactly the two it breaks."""
        site, project = tmp_path / "site", tmp_path / "project"
        site.mkdir()
        project.mkdir()
        install_dist(site, "acme_sink", GOOD_SINK, "acme = acme_sink:AcmeSink")
        install_dist(site, "sloppy_sink", BAD_SINK, "sloppy = sloppy_sink:SloppySink")
        (project / "test_contract.py").write_text(textwrap.dedent(CONTRACT_TESTS))
        report = tmp_path / "report.xml"
        env = {**os.environ, "PYTHONPATH": str(site), "AUDITPIPE_KAFKA_BOOTSTRAP": kafka_bootstrap}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"--junitxml={report}", f"--basetemp={tmp_path / 'tmp'}",
             "test_contract.py"],
            cwd=project, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert report.exists(), proc.stdout + proc.stderr
        outcome = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            outcome[f"{case.get('classname', '').rsplit('.', 1)[-1]}.{case.get('name')}"] = (
                "failed" if failed else "passed"
            )
        contract = [
            "test_entry_point_loads_the_sink_class",
            "test_config_rejects_an_unknown_key_naming_it",
            "test_stop_is_safe_without_start_and_twice",
            "test_a_redelivered_batch_is_stored_once",
            "test_runner_stores_every_event_and_commits",
        ]
        broken = {"test_config_rejects_an_unknown_key_naming_it",
                  "test_a_redelivered_batch_is_stored_once"}  # fmt: skip
        expected = {f"TestAcme.{t}": "passed" for t in contract}
        expected |= {f"TestSloppy.{t}": "failed" if t in broken else "passed" for t in contract}
        assert outcome == expected, proc.stdout[-4000:]
