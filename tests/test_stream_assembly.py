"""SSE parsing and stream assembly for the OpenAI stream shapes (pure functions)."""

from __future__ import annotations

import json

from auditpipe.producer._stream import assemble, parse_sse


def sse(*payloads: object, done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads)
    return out + (b"data: [DONE]\n\n" if done else b"")


class TestParse:
    def test_events_multiline_data_crlf_and_done(self) -> None:
        """data lines join with newlines; CRLF works; comments and event names are ignored."""
        raw = b': keep-alive\r\n\r\nevent: x\r\ndata: {"a":\r\ndata: 1}\r\n\r\ndata: [DONE]\r\n\r\n'
        assert parse_sse(raw) == ([{"a": 1}], True)

    def test_torn_last_event_is_still_parsed(self) -> None:
        """A stream cut after a complete data line but before the blank line keeps that chunk."""
        assert parse_sse(b'data: {"n": 1}\n\ndata: {"n": 2}') == ([{"n": 1}, {"n": 2}], False)


class TestAssemble:
    def test_text_completion_stream(self) -> None:
        """/v1/completions chunks become one text_completion with the joined text."""
        chunks, _ = parse_sse(sse(
            {"id": "c", "object": "text_completion", "model": "m",
             "choices": [{"index": 0, "text": "Hel", "finish_reason": None}]},
            {"id": "c", "object": "text_completion", "model": "m",
             "choices": [{"index": 0, "text": "lo", "finish_reason": "stop"}]},
        ))  # fmt: skip
        out = assemble(chunks)
        assert out["object"] == "text_completion" and out["model"] == "m"
        assert out["choices"] == [{"index": 0, "text": "Hello", "finish_reason": "stop",
                                   "logprobs": None}]  # fmt: skip

    def test_responses_stream_takes_the_final_response(self) -> None:
        """/v1/responses: the response.completed event's object is the output."""
        final = {"id": "resp_1", "object": "response", "status": "completed", "output": []}
        chunks, _ = parse_sse(sse(
            {"type": "response.created", "response": {**final, "status": "in_progress"}},
            {"type": "response.output_text.delta", "delta": "Hi"},
            {"type": "response.completed", "response": final},
            done=False,
        ))  # fmt: skip
        assert assemble(chunks) == final

    def test_responses_stream_cut_short_is_marked_incomplete(self) -> None:
        """Without a terminal event the partial text is kept and the status says incomplete."""
        chunks, _ = parse_sse(sse(
            {"type": "response.created", "response": {"id": "r", "status": "in_progress"}},
            {"type": "response.output_text.delta", "delta": "Hi "},
            {"type": "response.output_text.delta", "delta": "there"},
            done=False,
        ))  # fmt: skip
        out = assemble(chunks)
        assert out["status"] == "incomplete" and out["output_text"] == "Hi there"

    def test_chat_with_two_choices_and_parallel_tool_calls(self) -> None:
        """Per-choice assembly; tool calls ordered by their index, arguments concatenated."""

        def chunk(choices: list[dict[str, object]]) -> dict[str, object]:
            return {"id": "x", "object": "chat.completion.chunk", "model": "m", "choices": choices}

        chunks = [
            chunk([{"index": 0, "delta": {"role": "assistant", "tool_calls": [
                {"index": 1, "id": "b", "type": "function",
                 "function": {"name": "g", "arguments": ""}},
                {"index": 0, "id": "a", "type": "function",
                 "function": {"name": "f", "arguments": "{\"x\""}}]}}]),
            chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": ": 1}"}},
                {"index": 1, "function": {"arguments": "{}"}}]}},
                   {"index": 1, "delta": {"content": "plain"}, "finish_reason": "stop"}]),
            chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
        ]  # fmt: skip
        out = assemble(chunks)
        first, second = out["choices"]
        assert [(c["id"], c["function"]["name"], c["function"]["arguments"])
                for c in first["message"]["tool_calls"]] == [("a", "f", '{"x": 1}'),
                                                            ("b", "g", "{}")]  # fmt: skip
        assert first["finish_reason"] == "tool_calls" and first["message"]["content"] is None
        assert second["message"]["content"] == "plain" and second["finish_reason"] == "stop"
