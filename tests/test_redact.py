"""The redact step: detectors, look-alikes, actions, field rules, fail-closed, hostile input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from auditpipe.processors.base import build_chain
from auditpipe.processors.detectors import luhn_ok
from auditpipe.processors.redact import RedactConfig, RedactStep
from auditpipe.schemas import new_event

from auditpipe.errors import ConfigError

from .redaction_corpus import NEGATIVES, POSITIVES


def redact_text(text: str, step: RedactStep | None = None) -> str:
    step = step or RedactStep()
    out = step(new_event(input={"messages": [{"role": "user", "content": text}]}))
    return str(out["input"]["messages"][0]["content"])


class TestCorpus:
    def test_recall_and_precision_on_the_corpus(self) -> None:
        """Every labelled secret is removed (recall 1.0); no look-alike is touched."""
        step = RedactStep()
        missed = [(d, t) for d, t, secret in POSITIVES if secret in redact_text(t, step)]
        false_hits = [t for t in NEGATIVES if redact_text(t, step) != t]
        recall = 1 - len(missed) / len(POSITIVES)
        precision_negatives = 1 - len(false_hits) / len(NEGATIVES)
        print(f"redaction corpus: recall={recall:.3f} look-alikes kept={precision_negatives:.3f}")
        assert not missed, f"secrets that survived: {missed}"
        assert not false_hits, f"look-alikes that were redacted: {false_hits}"

    @pytest.mark.parametrize(("detector", "text", "secret"), POSITIVES)
    def test_each_positive_is_labelled_with_its_detector(
        self, detector: str, text: str, secret: str
    ) -> None:
        assert f"[REDACTED:{detector}]" in redact_text(text)


class TestActions:
    def test_hash_is_a_stable_pseudonym(self) -> None:
        step = RedactStep(RedactConfig(action="hash", hash_key="k1"))
        a = redact_text("mail bob@example.com", step)
        b = redact_text("again bob@example.com", step)
        c = redact_text("mail eve@example.com", step)
        token = a.split()[-1]
        assert token.startswith("[EMAIL:") and token in b and token not in c
        other_key = RedactStep(RedactConfig(action="hash", hash_key="k2"))
        assert token not in redact_text("mail bob@example.com", other_key)

    def test_hash_without_a_key_is_a_config_error(self) -> None:
        with pytest.raises(ConfigError, match="hash_key"):
            RedactStep(RedactConfig(action="hash", hash_key_env="AUDITPIPE_TEST_NO_SUCH_VAR"))

    def test_remove_and_truncate(self) -> None:
        assert (
            redact_text("a bob@example.com b", RedactStep(RedactConfig(action="remove"))) == "a  b"
        )
        out = redact_text("a bob@example.com", RedactStep(RedactConfig(action="truncate")))
        assert out == "a bob@…[TRUNCATED:EMAIL]"

    def test_custom_detector(self) -> None:
        step = RedactStep(RedactConfig(custom=[{"name": "employee", "pattern": r"EMP-\d{6}"}]))
        assert redact_text("badge EMP-123456", step) == "badge [REDACTED:EMPLOYEE]"

    def test_bad_custom_regex_names_the_key(self) -> None:
        with pytest.raises(ConfigError, match=r"pipeline\.redact\.custom\.0\.pattern"):
            build_chain(
                {"steps": ["redact"], "redact": {"custom": [{"name": "x", "pattern": "("}]}}
            )


class TestScope:
    def test_scans_output_metadata_and_headers_and_records_counts(self) -> None:
        event = new_event(
            input={"messages": [{"content": "I am bob@example.com"}]},
            output={"choices": [{"message": {"content": "Hi bob@example.com, SSN 123-45-6789"}}]},
            metadata={"contact": "eve@example.com"},
            headers={"x-forwarded-for": "203.0.113.7"},
        )
        out = RedactStep()(event)
        text = str(out)
        assert "example.com" not in text and "123-45-6789" not in text and "203.0.113.7" not in text
        entry = out["processing"][-1]
        assert entry["step"] == "redact" and entry["action"] == "redacted"
        assert entry["counts"] == {"email": 3, "us_ssn": 1, "ipv4": 1}
        assert "bob" not in str(entry)  # counts, never values
        assert event["metadata"]["contact"] == "eve@example.com"  # input not mutated

    def test_the_input_event_is_never_mutated_at_any_depth(self) -> None:
        """Containers are copied on write: a redacted string deep in a list of dicts changes
        the output only; subtrees without findings are shared and equal."""
        import copy

        event = new_event(
            input={"messages": [{"role": "user", "content": "call +1 415 555 0100"},
                                {"role": "user", "content": "nothing here"}]},
            output={"choices": [{"message": {"content": "ok", "tool_calls": []}}]},
            metadata={"k": "v"},
        )  # fmt: skip
        before = copy.deepcopy(event)
        out = RedactStep()(event)
        assert event == before
        assert "555 0100" not in str(out["input"])
        assert out["input"]["messages"][1] == before["input"]["messages"][1]
        assert out["output"] == before["output"]

    def test_field_rules_drop_keep_and_mask(self) -> None:
        cfg = RedactConfig(
            fields=[
                {"path": "input.user", "action": "drop"},
                {"path": "input.messages[*].name", "action": "mask"},
                {"path": "metadata.ticket_email", "action": "keep"},
            ]
        )
        event = new_event(
            input={"user": "u-42", "messages": [{"name": "Bob", "content": "x"}, {"content": "y"}]},
            metadata={"ticket_email": "support@example.com"},
        )
        out = RedactStep(cfg)(event)
        assert "user" not in out["input"] and event["input"]["user"] == "u-42"
        assert out["input"]["messages"][0]["name"] == "[REDACTED:FIELD]"
        assert out["metadata"]["ticket_email"] == "support@example.com"

    def test_clean_event_is_marked_clean(self) -> None:
        out = RedactStep()(new_event(input={"messages": [{"content": "hello world"}]}))
        assert out["processing"][-1]["action"] == "clean"


class TestHostileInput:
    def test_one_megabyte_hostile_strings_finish(self) -> None:
        """1 MB strings built to make regexes backtrack finish; a hang fails after 120 s."""
        code = (
            "from auditpipe.processors.redact import RedactStep\n"
            "from auditpipe.schemas import new_event\n"
            "step = RedactStep()\n"
            "for s in ['a'*1_000_000, 'eyJ'*333_333, 'a@'*500_000, '1 '*500_000, '1.'*500_000,"
            " ':a'*500_000, 'sk-'*333_333, '+1 '*333_333, 'password= '*100_000,"
            " '-----BEGIN PRIVATE KEY-----'*37_000, '4'*1_000_000, 'A'*1_000_000]:\n"
            "    step(new_event(input={'text': s}))\n"
            "print('ok')\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert not luhn_ok("0000000000000000")  # all one digit
