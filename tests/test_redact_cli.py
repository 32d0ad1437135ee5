"""`auditpipe redact`: the configured chain over a JSONL file, rejects with line numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "auditpipe", "redact", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


DYNAMO = {
    "log_type": "audit",
    "ts_ms": 1757115457130,
    "request_id": "req_123",
    "endpoint": "/v1/chat/completions",
    "model": "meta/llama3-8b-instruct",
    "store": True,
    "metadata": {"ticket": "SN-1234", "reporter": "ann@example.com"},
    "input": {
        "messages": [{"role": "user", "content": "my key is sk-proj-abcdefghijklmnopqrstuvwx1234"}]
    },
    "output": {"choices": [{"message": {"role": "assistant", "content": "Call +1 415 555 2671"}}]},
    "usage": {"prompt_tokens": 123, "completion_tokens": 456, "total_tokens": 579},
}


class TestRedactCli:
    def test_default_settings_redact_a_dynamo_file_line_for_line(self, tmp_path: Path) -> None:
        """With no config: strong redaction, one line out per line in, Dynamo fields kept."""
        src = tmp_path / "in.jsonl"
        src.write_bytes(
            b"\n".join(orjson.dumps({**DYNAMO, "request_id": f"r{i}"}) for i in range(5)) + b"\n"
        )
        out = tmp_path / "out.jsonl"
        result = run_cli(str(src), "-o", str(out))
        assert result.returncode == 0, result.stderr
        lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
        assert [x["request_id"] for x in lines] == [f"r{i}" for i in range(5)]
        text = out.read_text()
        assert "sk-proj" not in text and "ann@example.com" not in text and "555 2671" not in text
        assert lines[0]["ts_ms"] == DYNAMO["ts_ms"] and lines[0]["usage"] == DYNAMO["usage"]
        assert [p["step"] for p in lines[0]["processing"]] == ["enrich", "redact", "sample"]
        assert b"5 line(s): 5 written" in result.stderr

    def test_malformed_lines_go_to_rejects_with_line_numbers(self, tmp_path: Path) -> None:
        rejects = tmp_path / "rejects.jsonl"
        data = (
            orjson.dumps(DYNAMO)
            + b"\nnot json\n[1,2]\n"
            + orjson.dumps({**DYNAMO, "ts_ms": "x"})
            + b"\n"
        )
        result = run_cli("-", "--rejects", str(rejects), stdin=data)
        assert result.returncode == 3
        assert len(result.stdout.splitlines()) == 1
        bad = [orjson.loads(x) for x in rejects.read_bytes().splitlines()]
        assert [b["line"] for b in bad] == [2, 3, 4]
        assert bad[0]["text"] == "not json" and "not an audit record" in bad[0]["error"]

    def test_sampled_out_lines_are_not_written(self, tmp_path: Path) -> None:
        config = tmp_path / "c.toml"
        config.write_text(
            '[pipeline]\nsteps = ["sample"]\n'
            "[pipeline.sample]\ndefault_rate = 0.0\nkeep_when = []\n"
        )
        result = run_cli("--config", str(config), stdin=orjson.dumps(DYNAMO) + b"\n")
        assert result.returncode == 0 and result.stdout == b""
        assert b"1 sampled out" in result.stderr

    def test_bad_config_names_the_key_before_reading(self, tmp_path: Path) -> None:
        config = tmp_path / "c.toml"
        config.write_text('[pipeline.redact]\naction = "shred"\n')
        result = run_cli("--config", str(config), str(tmp_path / "missing.jsonl"))
        assert result.returncode == 2
        assert b"pipeline.redact.action" in result.stderr
