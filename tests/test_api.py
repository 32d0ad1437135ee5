"""`auditpipe serve`: OpenAI's stored chat completions API, driven by the official openai client,
on a real PostgreSQL holding records captured from real openai-client traffic."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
from auditpipe.schemas import Event

from .apiutil import (
    NAMED_KEY,
    READ_KEY,
    RW_KEY,
    ApiServer,
    api_server,
    by_request,
    captured_events,
)
from .conftest import wait_until


@pytest.fixture(scope="module")
def captured() -> tuple[list[Event], dict[str, Any]]:
    return captured_events()


@pytest.fixture(scope="module")
def events(captured: tuple[list[Event], dict[str, Any]]) -> list[Event]:
    return captured[0]


@pytest.fixture(scope="module")
def got(captured: tuple[list[Event], dict[str, Any]]) -> dict[str, Any]:
    return captured[1]


@pytest.fixture(scope="module")
def shared(pg_dsn: str, events: list[Event]) -> Iterator[ApiServer]:
    """A server for the read-only tests (nothing here changes its records)."""
    with api_server(pg_dsn, events) as server:
        yield server


@pytest.fixture
def fresh(pg_dsn: str, events: list[Event]) -> Iterator[ApiServer]:
    """A server over a schema of this test's own (for updates and deletes)."""
    with api_server(pg_dsn, events) as server:
        yield server


def chat_ids(events: list[Event]) -> list[str]:
    """The completion ids of the stored chat completions in (time, event id) order."""
    chats = [
        e
        for e in events
        if e["endpoint"] == "/v1/chat/completions" and (e.get("status_code") or 0) < 400
    ]
    chats.sort(key=lambda e: (e["ts_ms"], e["event_id"]))
    return [e["output"]["id"] for e in chats]


class TestList:
    def test_auto_paging_walks_every_stored_completion_once_in_capture_order(
        self, shared: ApiServer, events: list[Event]
    ) -> None:
        """`for c in client.chat.completions.list(limit=7)` follows `after` across pages."""
        ids = [c.id for c in shared.client().chat.completions.list(limit=7)]
        assert ids == chat_ids(events)
        assert len(ids) == 45  # 40 plain, 3 streamed, pii, tool; no error, no embedding

    def test_desc_order_is_the_reverse(self, shared: ApiServer, events: list[Event]) -> None:
        ids = [c.id for c in shared.client().chat.completions.list(limit=9, order="desc")]
        assert ids == chat_ids(events)[::-1]

    def test_a_page_says_first_last_and_whether_more_follow(
        self, shared: ApiServer, events: list[Event]
    ) -> None:
        expected = chat_ids(events)
        headers = {"authorization": f"Bearer {RW_KEY}"}
        page = httpx.get(
            f"{shared.url}/v1/chat/completions", params={"limit": 5}, headers=headers
        ).json()
        assert page["object"] == "list" and page["has_more"] is True
        assert [c["id"] for c in page["data"]] == expected[:5]
        assert (page["first_id"], page["last_id"]) == (expected[0], expected[4])
        last = httpx.get(
            f"{shared.url}/v1/chat/completions",
            params={"limit": 5, "after": expected[-3]},
            headers=headers,
        ).json()
        assert [c["id"] for c in last["data"]] == expected[-2:] and last["has_more"] is False
        first = shared.client().chat.completions.list()
        assert len(first.data) == 20  # OpenAI's default page size

    def test_model_filter(self, shared: ApiServer, events: list[Event]) -> None:
        large = [c for c in shared.client().chat.completions.list(model="demo-echo-large", limit=3)]
        assert len(large) == 10 and {c.model for c in large} == {"demo-echo-large"}
        assert [c.id for c in large] == [
            i for i in chat_ids(events) if by_output(events)[i]["model"] == "demo-echo-large"
        ]

    def test_metadata_filter_with_one_and_two_pairs(self, shared: ApiServer) -> None:
        client = shared.client()
        team_a = list(client.chat.completions.list(metadata={"team": "a"}, limit=4))
        assert len(team_a) == 20 and all(c.metadata["team"] == "a" for c in team_a)
        both = list(client.chat.completions.list(metadata={"team": "a", "seq": "7"}))
        assert [c.metadata for c in both] == [{"team": "a", "seq": "7"}]
        none = client.chat.completions.list(metadata={"team": "a", "seq": "8"})
        assert none.data == [] and none.has_more is False
        large_a = list(
            client.chat.completions.list(model="demo-echo-large", metadata={"team": "b"})
        )
        assert len(large_a) == 10  # every 4th request is large, all with even seq (team b)

    @pytest.mark.parametrize(
        ("params", "param"),
        [
            ({"limit": 0}, "limit"),
            ({"limit": 101}, "limit"),
            ({"limit": "x"}, "limit"),
            ({"order": "sideways"}, "order"),
            ({"after": "chatcmpl-nope"}, "after"),
        ],
    )
    def test_bad_parameters_are_400s_in_openai_shape(
        self, shared: ApiServer, params: dict[str, Any], param: str
    ) -> None:
        with pytest.raises(openai.BadRequestError) as err:
            shared.client().chat.completions.list(**params)
        assert err.value.status_code == 400
        body = err.value.body
        assert isinstance(body, dict) and body["param"] == param and body["message"]
        assert body["type"] == "invalid_request_error" and "code" in body


def by_output(events: list[Event]) -> dict[str, Event]:
    return {
        e["output"]["id"]: e
        for e in events
        if isinstance(e.get("output"), dict) and "id" in e["output"]
    }


class TestRetrieve:
    def test_retrieve_gives_what_the_client_got_with_its_metadata(
        self, shared: ApiServer, got: dict[str, Any]
    ) -> None:
        original = got["plain-005"]
        stored = shared.client().chat.completions.retrieve(original.id)
        assert stored.id == original.id and stored.created == original.created
        assert stored.choices[0].message.content == original.choices[0].message.content
        assert stored.usage == original.usage and stored.model == original.model
        assert stored.metadata == {"team": "a", "seq": "5"}

    def test_streamed_completions_are_served_assembled(
        self, shared: ApiServer, got: dict[str, Any]
    ) -> None:
        client = shared.client()
        for rid in ("stream-usage", "stream-bare"):
            chunks = got[rid]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            stored = client.chat.completions.retrieve(chunks[0].id)
            assert stored.object == "chat.completion"
            assert stored.choices[0].message.content == text and text
            assert stored.choices[0].finish_reason == "stop"
        with_usage = client.chat.completions.retrieve(got["stream-usage"][0].id)
        assert with_usage.usage == got["stream-usage"][-1].usage
        tool = client.chat.completions.retrieve(got["stream-tool"][0].id)
        call = tool.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert call.function.name == "lookup" and tool.choices[0].finish_reason == "tool_calls"  # type: ignore[union-attr]

    def test_unknown_id_is_a_404(self, shared: ApiServer) -> None:
        with pytest.raises(openai.NotFoundError) as err:
            shared.client().chat.completions.retrieve("chatcmpl-does-not-exist")
        assert (
            isinstance(err.value.body, dict)
            and "chatcmpl-does-not-exist" in err.value.body["message"]
        )

    def test_a_record_can_also_be_fetched_by_its_event_id(
        self, shared: ApiServer, events: list[Event]
    ) -> None:
        event = by_request(events)["plain-001"]
        stored = shared.client().chat.completions.retrieve(event["event_id"])
        assert stored.id == event["output"]["id"]

    def test_reused_completion_ids_stay_unique_and_pageable(
        self, pg_dsn: str, events: list[Event]
    ) -> None:
        """A server that answers every request with the same id: the first record keeps it,
        the others are served under their event ids; paging walks each once."""
        clones = []
        for i, event in enumerate(e for e in events if e["request_id"].startswith("plain-")):
            clone = copy.deepcopy(event)
            clone["event_id"] = f"{event['event_id'][:-4]}{i:04d}"
            clone["output"]["id"] = "chatcmpl-same"
            clones.append(clone)
        without_id = copy.deepcopy(events[0])
        without_id["event_id"] = without_id["event_id"][:-4] + "ffff"
        del without_id["output"]["id"]
        with api_server(pg_dsn, [*clones, without_id]) as server:
            client = server.client()
            ids = [c.id for c in client.chat.completions.list(limit=6)]
            assert len(ids) == len(clones) + 1 == len(set(ids))
            assert ids.count("chatcmpl-same") == 1
            assert without_id["event_id"] in ids
            first = client.chat.completions.retrieve("chatcmpl-same")
            assert first.id == "chatcmpl-same"
            client.chat.completions.delete("chatcmpl-same")
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.retrieve("chatcmpl-same")  # no duplicate takes it over
            after = [c.id for c in client.chat.completions.list(limit=6)]
            assert after == [i for i in ids if i != "chatcmpl-same"]


class TestMessages:
    def test_messages_have_stable_ids_and_page(
        self, shared: ApiServer, got: dict[str, Any]
    ) -> None:
        cid = got["plain-003"].id
        client = shared.client()
        messages = list(client.chat.completions.messages.list(cid, limit=1))
        assert [m.id for m in messages] == [f"{cid}-0", f"{cid}-1"]
        assert [(m.role, m.content) for m in messages] == [
            ("system", "Be brief."),
            ("user", "Question 3?"),
        ]
        again = client.chat.completions.messages.list(cid, order="desc")
        assert [m.id for m in again.data] == [f"{cid}-1", f"{cid}-0"]
        assert again.has_more is False and again.first_id == f"{cid}-1"  # type: ignore[attr-defined]

    def test_messages_of_an_unknown_completion_are_a_404(self, shared: ApiServer) -> None:
        with pytest.raises(openai.NotFoundError):
            shared.client().chat.completions.messages.list("chatcmpl-nope")

    def test_redacted_content_is_what_is_served(
        self, shared: ApiServer, got: dict[str, Any]
    ) -> None:
        """Only what the sink stored: the redact step's output, not what the client sent."""
        (message,) = shared.client().chat.completions.messages.list(got["pii"].id).data
        assert "jane.doe@example.com" not in (message.content or "")
        assert "[REDACTED:EMAIL]" in (message.content or "")


class TestUpdate:
    def test_update_sets_metadata_filters_by_it_and_is_logged(
        self, fresh: ApiServer, got: dict[str, Any], pg_dsn: str
    ) -> None:
        cid = got["plain-010"].id
        client = openai.OpenAI(base_url=f"{fresh.url}/v1", api_key=NAMED_KEY, max_retries=0)
        updated = client.chat.completions.update(cid, metadata={"label": "good", "by": "me"})
        assert updated.id == cid and updated.metadata == {"label": "good", "by": "me"}
        assert client.chat.completions.retrieve(cid).metadata == {"label": "good", "by": "me"}
        assert [c.id for c in client.chat.completions.list(metadata={"label": "good"})] == [cid]
        assert list(client.chat.completions.list(metadata={"seq": "10"})) == []
        schema = fresh.schema  # type: ignore[attr-defined]
        with psycopg.connect(pg_dsn) as conn:
            change = conn.execute(
                f'SELECT action, completion_id, actor, before, after, event FROM "{schema}".'
                "api_changes"
            ).fetchall()
            captured = conn.execute(
                f"SELECT m.metadata->'metadata' FROM \"{schema}\".metadata m "
                f"JOIN \"{schema}\".responses r USING (id) WHERE r.raw_response->>'id' = %s",
                (cid,),
            ).fetchone()
        assert len(change) == 1
        action, completion_id, actor, before, after, event = change[0]
        assert (action, completion_id, actor) == ("update_metadata", cid, "alice")
        assert before == {"team": "b", "seq": "10"} and after == {"label": "good", "by": "me"}
        assert event["method"] == "POST" and event["metadata"]["actor"] == "alice"
        assert captured == ({"team": "b", "seq": "10"},)  # the record as captured stays

    @pytest.mark.parametrize(
        "metadata",
        [
            {f"k{i}": "v" for i in range(17)},
            {"k" * 65: "v"},
            {"k": "v" * 513},
            {"k": 1},
            ["k", "v"],
        ],
        ids=["17-pairs", "65-char-key", "513-char-value", "not-a-string", "not-an-object"],
    )
    def test_openai_metadata_limits_are_400s(
        self, shared: ApiServer, got: dict[str, Any], metadata: Any
    ) -> None:
        cid = got["plain-011"].id
        with pytest.raises(openai.BadRequestError) as err:
            shared.client().chat.completions.update(cid, metadata=metadata)
        assert isinstance(err.value.body, dict) and err.value.body["param"] == "metadata"
        assert shared.client().chat.completions.retrieve(cid).metadata == {"team": "a", "seq": "11"}

    def test_the_limits_themselves_are_accepted(
        self, fresh: ApiServer, got: dict[str, Any]
    ) -> None:
        metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
        updated = fresh.client().chat.completions.update(got["plain-012"].id, metadata=metadata)
        assert updated.metadata == metadata
        cleared = fresh.client().chat.completions.update(got["plain-012"].id, metadata=None)
        assert cleared.metadata == {}

    def test_other_fields_cannot_be_updated(self, shared: ApiServer, got: dict[str, Any]) -> None:
        with pytest.raises(openai.BadRequestError, match="Unrecognized request argument"):
            shared.client().chat.completions.update(
                got["plain-013"].id, metadata={}, extra_body={"model": "x"}
            )

    def test_a_read_only_key_cannot_update_or_delete(
        self, shared: ApiServer, got: dict[str, Any]
    ) -> None:
        reader = shared.client(READ_KEY)
        cid = got["plain-014"].id
        assert reader.chat.completions.retrieve(cid).id == cid
        with pytest.raises(openai.PermissionDeniedError):
            reader.chat.completions.update(cid, metadata={"x": "y"})
        with pytest.raises(openai.PermissionDeniedError):
            reader.chat.completions.delete(cid)
        assert shared.client().chat.completions.retrieve(cid).metadata == {"team": "b", "seq": "14"}


class TestDelete:
    def test_delete_then_404_everywhere_and_the_deletion_is_logged(
        self, fresh: ApiServer, got: dict[str, Any], events: list[Event], pg_dsn: str
    ) -> None:
        client = fresh.client()
        cid = got["plain-020"].id
        deleted = client.chat.completions.delete(cid)
        assert (deleted.id, deleted.deleted, deleted.object) == (
            cid,
            True,
            "chat.completion.deleted",
        )
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.retrieve(cid)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.messages.list(cid)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.delete(cid)
        ids = [c.id for c in client.chat.completions.list(limit=100)]
        assert cid not in ids and len(ids) == len(chat_ids(events)) - 1
        # a cursor naming the deleted completion still continues after it
        expected = chat_ids(events)
        after = client.chat.completions.list(after=cid, limit=3)
        position = expected.index(cid)
        assert [c.id for c in after.data] == expected[position + 1 : position + 4]
        schema = fresh.schema  # type: ignore[attr-defined]
        with psycopg.connect(pg_dsn) as conn:
            rows = conn.execute(
                f'SELECT action, completion_id, event_id, actor FROM "{schema}".api_changes'
            ).fetchall()
            left = conn.execute(
                f'SELECT count(*) FROM "{schema}".requests WHERE id = %s',
                (by_request(events)["plain-020"]["event_id"],),
            ).fetchone()
        assert rows == [
            (
                "delete",
                cid,
                by_request(events)["plain-020"]["event_id"],
                "key:" + __import__("hashlib").sha256(RW_KEY.encode()).hexdigest()[:12],
            )
        ]
        assert left == (0,)


class TestAuth:
    @pytest.mark.parametrize("key", [None, "sk-wrong"])
    def test_no_key_or_a_wrong_one_is_a_401(self, shared: ApiServer, key: str | None) -> None:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(f"{shared.url}/v1/chat/completions", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            shared.client("sk-wrong").chat.completions.list()

    def test_the_viewer_asks_for_basic_credentials(self, shared: ApiServer) -> None:
        response = httpx.get(f"{shared.url}/")
        assert response.status_code == 401 and "Basic" in response.headers["www-authenticate"]
        ok = httpx.get(f"{shared.url}/", auth=("anyone", READ_KEY))
        assert ok.status_code == 200 and "<table" in ok.text

    def test_health_needs_no_key(self, shared: ApiServer) -> None:
        assert httpx.get(f"{shared.url}/healthz").json() == {"status": "ok"}


def serve_cmd(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "auditpipe", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def url_of(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # log lines (INFO) may come before the banner
        seen.append(line)
        if line.startswith("auditpipe serve:"):
            match = re.search(r"http://127\.0\.0\.1:\d+", line)
            assert match, line
            return match.group(0)
    raise AssertionError("no banner: " + "".join(seen))


class TestServeCommand:
    def test_refuses_a_non_loopback_host_without_keys(self, tmp_path: Path) -> None:
        proc = serve_cmd("--host", "0.0.0.0", "--port", "0", cwd=tmp_path)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and "[serve] api_keys" in err

    def test_keys_from_the_environment_and_a_clean_sigterm(
        self, pg_dsn: str, tmp_path: Path
    ) -> None:
        config = tmp_path / "a.toml"
        config.write_text(f'[sinks.postgres]\ndsn = "{pg_dsn}"\nschema_name = "api_cli"\n')
        proc = serve_cmd(
            "--config", str(config), "--port", "0", env={"AUDITPIPE_SERVE_API_KEYS": "k-one, k-two"}
        )
        try:
            url = url_of(proc)
            assert httpx.get(f"{url}/v1/chat/completions").status_code == 401
            ok = httpx.get(f"{url}/v1/chat/completions", headers={"authorization": "Bearer k-two"})
            assert ok.status_code == 200 and ok.json()["data"] == []
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        assert proc.returncode == 0

    def test_an_unreachable_database_names_the_setting(self, tmp_path: Path) -> None:
        config = tmp_path / "a.toml"
        config.write_text(
            '[sinks.postgres]\ndsn = "postgresql://x@127.0.0.1:1/x"\nconnect_timeout_secs = 1\n'
        )
        proc = serve_cmd("--config", str(config), "--port", "0")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "sinks.postgres.dsn" in err

    def test_store_outage_while_serving_is_a_503(self, events: list[Event]) -> None:
        """The database goes away under a running server: OpenAI-shaped 503, then recovery."""
        from .apiutil import load, new_schema
        from .sinkfixtures import PgCluster

        cluster = PgCluster()
        cluster.start()
        try:
            schema = new_schema()
            load(cluster.dsn, schema, events[:3])
            with ApiServer(cluster.dsn, schema, api_keys=[RW_KEY]) as server:
                client = server.client()
                assert len(client.chat.completions.list().data) == 3
                cluster.stop()
                with pytest.raises(openai.InternalServerError) as err:
                    client.chat.completions.list()
                assert err.value.status_code == 503
                cluster.start()
                wait_until(lambda: _lists(client), 30, "the API to answer again")
        finally:
            cluster.destroy()


def _lists(client: openai.OpenAI) -> bool:
    try:
        return len(client.chat.completions.list().data) == 3
    except openai.APIError:
        return False
