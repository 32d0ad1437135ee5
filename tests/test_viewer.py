"""The web viewer in a real browser: Playwright driving Debian's chromium (executable_path).

Screenshots go to the test's tmp dir (and to ``$AUDITPIPE_TEST_ARTIFACTS`` when set).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from auditpipe.schemas import Event

from .apiutil import READ_KEY, ApiServer, api_server, by_request, captured_events

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return captured_events(plain=40)[0]


@pytest.fixture(scope="module")
def server(pg_dsn: str, events: list[Event]) -> Iterator[ApiServer]:
    with api_server(pg_dsn, events, page_size=10) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"{CHROMIUM} missing: run scripts/setup-system (chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    context = browser.new_context(
        http_credentials={"username": "auditor", "password": READ_KEY},
        viewport={"width": 1300, "height": 900},
    )
    pg = context.new_page()
    dialogs: list[str] = []
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    pg.dialogs = dialogs
    yield pg
    context.close()


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    artefacts = os.environ.get("AUDITPIPE_TEST_ARTIFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artefacts) / path.name)
    return path


def rows(page: Any) -> list[str]:
    return [t.strip() for t in page.locator("#records tbody tr").all_inner_texts()]


class TestList:
    def test_pages_newest_first_and_back(
        self, server: ApiServer, page: Any, tmp_path: Path
    ) -> None:
        page.goto(server.url + "/")
        first = rows(page)
        assert len(first) == 10
        times = [r.split("\t")[0] for r in first]
        assert times == sorted(times, reverse=True) and "/v1/embeddings" in first[0]
        assert screenshot(page, tmp_path, "viewer-list").stat().st_size > 10_000
        seen = list(first)
        for _ in range(4):
            page.get_by_role("link", name="Older →").click()
            seen += rows(page)
        assert len(seen) == 47 == len(set(seen))  # every record once: 46 chat, 1 embedding
        assert page.get_by_role("link", name="Older →").count() == 0
        page.get_by_role("link", name="← Newer").click()
        assert rows(page) == seen[30:40]

    def test_filters_narrow_the_list(self, server: ApiServer, page: Any) -> None:
        page.goto(server.url + "/")
        page.fill("input[name=model]", "demo-echo-large")
        page.click("button[type=submit]")
        large = rows(page)
        assert len(large) == 10 and all("demo-echo-large" in r for r in large)
        page.goto(server.url + "/")
        page.fill("input[name=q]", "Question 17?")
        page.click("button[type=submit]")
        assert len(rows(page)) == 1 and "Question 17?" in rows(page)[0]
        page.goto(server.url + "/")
        page.select_option("select[name=status]", "error")
        page.click("button[type=submit]")
        (error,) = rows(page)
        assert "404" in error and "no-such-model" in error
        page.goto(server.url + "/?metadata=team%3Da%2C+seq%3D9&since=1h")
        (one,) = rows(page)
        assert "seq=9" in one
        page.goto(server.url + "/?since=last+tuesday")
        assert "since:" in page.get_by_role("alert").inner_text()


class TestRecord:
    def test_untrusted_text_is_shown_literally_and_redactions_stand_out(
        self, server: ApiServer, page: Any, events: list[Event], tmp_path: Path
    ) -> None:
        pii = by_request(events)["pii"]
        page.goto(f"{server.url}/records/{pii['event_id']}")
        body = page.locator(".msg .body").first
        assert "<script>alert('x')</script>" in body.inner_text()  # as text, not markup
        assert page.dialogs == []
        marks = page.locator("mark.redacted")
        assert "[REDACTED:EMAIL]" in marks.all_inner_texts()
        mark_bg = marks.first.evaluate("e => getComputedStyle(e).backgroundColor")
        text_bg = body.evaluate("e => getComputedStyle(e).backgroundColor")
        assert mark_bg != text_bg
        lineage = page.locator("#lineage").inner_text()
        assert "redact" in lineage and "email: 2" in lineage  # the prompt and its echo
        assert "sha256:" in lineage  # the redaction policy that produced the record
        facts = page.locator("#facts").inner_text()
        for label in ("Latency", "Usage", "Cost", "Status"):
            assert label in facts
        assert "total_tokens" in facts and "$" in facts
        assert page.locator("#answer").inner_text().strip()
        screenshot(page, tmp_path, "viewer-record")

    def test_unknown_record_is_a_404_page(self, server: ApiServer, page: Any) -> None:
        response = page.goto(f"{server.url}/records/nope")
        assert response.status == 404 and "Not found" in page.inner_text("h1")
