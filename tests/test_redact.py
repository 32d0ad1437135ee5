"""The redact step: detectors, look-alikes, actions, field rules, fail-closed, hostile input."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
from auditpipe.schemas import new_event

from auditpipe.errors import ConfigError
from auditpipe.redaction.detectors import CREDENTIAL_HEADERS, luhn_ok
from auditpipe.redaction.step import RedactConfig, RedactStep
from auditpipe.steps import build_chain

from .redaction_corpus import NEGATIVES, POSITIVES, redact_like_the_cli, score


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
            "from auditpipe.redaction.step import RedactStep\n"
            "from auditpipe.schemas import new_event\n"
            "step = RedactStep()\n"
            "for s in ['a'*1_000_000, 'eyJ'*333_333, 'a@'*500_000, '1 '*500_000, '1.'*500_000,"
            " ':a'*500_000, 'sk-'*333_333, '+1 '*333_333, 'password= '*100_000,"
            " '-----BEGIN PRIVATE KEY-----'*37_000, '4'*1_000_000, 'A'*1_000_000,"
            " '4111 '*200_000, '\\\\n'*500_000, 'Cookie: a=b; '*80_000, 'x_password= '*90_000,"
            " 'ab.'*333_333 + '@', 'key '*250_000, 'Bearer '*140_000, '1.1.1.'*160_000,"
            " 'a:'*500_000, '(415) '*160_000, 'http://a:'*110_000]:\n"
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


def redact_record(step: RedactStep | None = None, **fields: Any) -> dict[str, Any]:
    return (step or RedactStep())(new_event(**fields))


VALUES_BEFORE_CARDS = [
    "SSN 123-45-6789", "call +1 415 555 2671", "call 415-555-2671", "card 5555 5555 5555 4444",
    "card 378282246310005", "IBAN DE89370400440532013000", "mail jane@example.com",
    "[REDACTED:EMAIL]", "10.0.0.1",
]  # fmt: skip
#: (value, separator, card): every way to write a card right after a value, except digits
#: glued to digits (one number) and digit-dash-digit (one hyphenated number).
CARD_AFTER_VALUE = [
    (before, sep, card)
    for before in VALUES_BEFORE_CARDS
    for sep in (" ", "", ", ", "/", "\n", "-")
    for card in ("4111111111111111", "4111 1111 1111 1111", "6011-1111-1111-1117")
    if not (sep == "" and before[-1].isdigit()) and not (sep == "-" and not before[-1].isalpha())
]


class TestLeakClasses:
    """The three classes that leaked on held-back data, each in general."""

    @pytest.mark.parametrize(
        "headers",
        [
            {"cookie": "sessionid=4c8e2f1a9b7d"},
            {"Cookie": "theme=dark; sid=77aa88bb99cc"},
            {"COOKIE": "a=1"},
            {"set-cookie": "id=a3fWa; Max-Age=2592000"},
        ],
    )
    def test_a_cookie_header_in_a_record_never_passes(self, headers: dict[str, str]) -> None:
        """Whatever the cookie says (even 'theme=dark'), its whole value goes."""
        out = redact_record(headers=headers)
        (name,) = headers
        assert out["headers"][name] == "[REDACTED:CREDENTIAL_HEADER]"
        assert out["processing"][-1]["counts"]["credential_header"] == 1

    @pytest.mark.parametrize(
        "text",
        [
            "The server is at 10.0.0.12.",
            "Connect to 192.168.1.254. Then log in.",
            "ip 8.8.8.8.\\nNext line",  # JSON-escaped newline after the full stop
            "hosts: 10.0.0.1, 10.0.0.2 and 10.0.0.3.",
            "(from 172.16.0.9.)",
            "\u6765\u81ea10.1.2.3\u3002",  # CJK text around it
        ],
    )
    def test_ipv4_at_the_end_of_a_sentence(self, text: str) -> None:
        out = redact_text(text)
        assert "[REDACTED:IPV4]" in out
        assert not any(c.isdigit() for c in out.replace("[REDACTED:IPV4]", "")), out

    def test_an_oid_or_a_version_is_not_an_address(self) -> None:
        for text in ("OID 1.3.6.1.4.1.", "version 1.2.3.4.", "v10.0.0.1.", "1.2.3.4.5."):
            assert redact_text(text) == text

    @pytest.mark.parametrize(("before", "sep", "card"), CARD_AFTER_VALUE)
    def test_a_card_right_after_another_value(self, before: str, sep: str, card: str) -> None:
        out = redact_text(f"{before}{sep}{card} thanks")
        assert "[REDACTED:CREDIT_CARD]" in out
        left = re.sub(r"\[REDACTED:[A-Z0-9_]+\]", "", out)
        assert not any(c.isdigit() for c in left), f"{out!r} kept digits of the values"

    def test_a_grouped_serial_number_is_not_cut_into_a_card(self) -> None:
        for text in ("serial 9400 1000 0000 0000 0000 00", "ref 1234 5678 9012 3456 7890",
                     "order 4111 1111 1111 1112 has shipped"):  # fmt: skip
            assert redact_text(text) == text


class TestCredentialHeaders:
    @pytest.mark.parametrize("name", sorted(CREDENTIAL_HEADERS))
    def test_every_built_in_name_in_headers_metadata_and_bodies(self, name: str) -> None:
        variants = [name, name.upper(), name.title(), name.replace("-", "_"),
                    "HTTP_" + name.upper().replace("-", "_")]  # fmt: skip
        for key in variants:
            out = redact_record(
                headers={key: "v4lue-1"},
                metadata={key: "v4lue-2"},
                input={"messages": [], "request": {"headers": {key: "v4lue-3"}}},
                output={"headers": [[key, "v4lue-4"], ["accept", "*/*"]],
                        "har": [{"name": key, "value": "v4lue-5"}]},
            )  # fmt: skip
            assert "v4lue" not in str(out), (key, out)
            assert out["processing"][-1]["counts"]["credential_header"] == 5
            assert out["output"]["headers"][1] == ["accept", "*/*"]

    def test_configured_names_are_added_and_always_stripped(self) -> None:
        step = RedactStep(RedactConfig(credential_headers=["X-Session-Token"],
                                       scan_headers=False, scan_metadata=False))  # fmt: skip
        out = redact_record(
            step,
            headers={"x-session-token": "abc", "cookie": "s=1", "x-other": "jane@example.com"},
            input={"messages": [{"role": "user", "content": "X-Session-Token: s3ss10n-99x"}]},
        )
        assert out["headers"] == {
            "x-session-token": "[REDACTED:CREDENTIAL_HEADER]",
            "cookie": "[REDACTED:CREDENTIAL_HEADER]",
            "x-other": "jane@example.com",  # scan_headers off: the detectors do not run
        }
        assert "s3ss10n" not in str(out["input"])

    def test_bad_header_name_is_a_config_error_naming_the_key(self) -> None:
        with pytest.raises(ConfigError, match=r"pipeline\.redact\.credential_headers"):
            build_chain({"steps": ["redact"], "redact": {"credential_headers": ["bad name"]}})

    def test_cookie_strings_lose_their_values_but_keep_names_and_attributes(self) -> None:
        text = (
            "GET / HTTP/1.1\r\nCookie: sid=31d4d96e; theme=dark\r\n\r\n"
            'and {"Set-Cookie": "id=a3fWa; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/"}'
        )
        out = redact_text(text)
        assert "31d4d96e" not in out and "dark" not in out and "a3fWa" not in out
        assert "Cookie: sid=[REDACTED:CREDENTIAL_HEADER]; theme=[REDACTED:CREDENTIAL_HEADER]" in out
        assert "Expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/" in out

    def test_authorization_lines_in_text(self) -> None:
        out = redact_text(
            "curl -H 'Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l' -H 'x-api-key: k3y-0042'"
        )
        assert "YWxhZ" not in out and "k3y-0042" not in out
        assert redact_text("Authorization: required for this endpoint") == (
            "Authorization: required for this endpoint"
        )

    def test_actions_apply_to_credentials_found_by_name(self) -> None:
        step = RedactStep(RedactConfig(actions={"CREDENTIAL_HEADER": "hash"}, hash_key="k"))
        a = redact_record(step, headers={"cookie": "sid=1"})["headers"]["cookie"]
        b = redact_record(step, metadata={"Cookie": "sid=1"})["metadata"]["Cookie"]
        assert a == b and a.startswith("[CREDENTIAL_HEADER:")

    def test_a_keep_rule_wins(self) -> None:
        step = RedactStep(RedactConfig(fields=[{"path": "headers.cookie", "action": "keep"}]))
        assert redact_record(step, headers={"cookie": "a=1"})["headers"]["cookie"] == "a=1"

    def test_password_keys_in_structured_data(self) -> None:
        tool = {"username": "bob", "password": "pa55!", "DB_PASSWORD": 1234,
                "clientSecret": "xyz", "max_tokens": 5, "secret": True}  # fmt: skip
        out = redact_record(input={"tool": tool})
        tool = out["input"]["tool"]
        assert tool["username"] == "bob" and tool["max_tokens"] == 5 and tool["secret"] is True
        assert {tool["password"], tool["DB_PASSWORD"], tool["clientSecret"]} == {
            "[REDACTED:PASSWORD_ASSIGNMENT]"
        }


class TestPolicyVersion:
    def test_on_every_processing_entry_clean_or_redacted(self) -> None:
        step = RedactStep()
        clean = step(new_event(input={"messages": [{"content": "hello"}]}))["processing"][-1]
        mail = new_event(input={"messages": [{"content": "bob@example.com"}]})
        dirty = step(mail)["processing"][-1]
        assert clean["action"] == "clean" and dirty["action"] == "redacted"
        assert clean["policy_version"] == dirty["policy_version"] == step.policy_version
        assert step.policy_version.startswith("sha256:") and len(step.policy_version) == 23

    def test_stable_for_the_same_policy_and_independent_of_the_hmac_key(self) -> None:
        a = RedactStep(RedactConfig(action="hash", hash_key="one")).policy_version
        b = RedactStep(RedactConfig(action="hash", hash_key="two")).policy_version
        assert a == b
        code = ("from auditpipe.redaction.step import RedactStep\n"
                "print(RedactStep().policy_version)\n")  # fmt: skip
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.stdout.strip() == RedactStep().policy_version  # another process agrees

    @pytest.mark.parametrize(
        "change",
        [
            {"detectors": ["EMAIL"]},
            {"action": "remove"},
            {"actions": {"EMAIL": "truncate"}},
            {"custom": [{"name": "EMP", "pattern": r"EMP-\d+"}]},
            {"fields": [{"path": "input.user", "action": "drop"}]},
            {"credential_headers": ["x-session"]},
            {"scan_metadata": False},
            {"truncate_keep_chars": 2},
        ],
    )
    def test_changes_with_what_decides_the_redaction(self, change: dict[str, Any]) -> None:
        assert RedactStep(RedactConfig(**change)).policy_version != RedactStep().policy_version


class TestGrownCorpus:
    def test_recall_and_precision_through_auditpipe_redact(self) -> None:
        """The grown corpus (every kind in every context, look-alikes in the same contexts,
        credentials in structured places) through the chain of `auditpipe redact` with
        default settings: every secret goes, every look-alike stays."""
        import orjson

        report = score(redact_like_the_cli)
        print(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode())
        assert report.misses() == []
        assert report.recall == 1.0 and report.precision == 1.0


def test_user_tenant_and_error_messages_are_scanned() -> None:
    """enrich may set user/tenant from a header; providers echo input in error messages."""
    out = redact_record(
        user="ann@example.com",
        tenant="acme",
        error={"type": "invalid_request_error", "message": "bad card 4111111111111111"},
    )
    assert out["user"] == "[REDACTED:EMAIL]" and out["tenant"] == "acme"
    assert out["error"] == {
        "type": "invalid_request_error",
        "message": "bad card [REDACTED:CREDIT_CARD]",
    }


def test_redacting_a_redacted_record_changes_nothing() -> None:
    """The producer's redact step and then the processors' (or a sink's): the second pass
    finds nothing in markers and counts nothing, over every positive of the grown corpus."""
    import orjson
    from auditpipe.schemas import from_json

    from .redaction_corpus import positive_cases

    step = RedactStep()
    changed = []
    for case in positive_cases():
        once = step(from_json(orjson.dumps(case.record)))
        twice = step(once)
        if twice["processing"][-1]["counts"] or twice["input"] != once["input"]:
            changed.append((case.kind, case.context, twice["processing"][-1]["counts"]))
    assert changed == []
