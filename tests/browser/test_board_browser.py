"""The web board in a real headless Chromium against a real ``storyline serve``.

Written against the DOM contract of the board (issue 16): ``main#board`` with one
``section.column[data-stage]`` per stage, cards ``article.card[data-story-id][data-stage]``,
the story page ``main#story`` with ``button[data-event]``, ``input[name=reason]``,
``table#audit``, ``input#as-of``, and the token form ``form#token-form``.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.browser.conftest import (
    READ_TOKEN,
    WRITE_TOKEN,
    Browsing,
    Server,
    make_server,
    screenshot,
)

pytestmark = pytest.mark.slow

STAGES = [
    "backlog",
    "coding",
    "gates",
    "review",
    "merge",
    "merge_failure",
    "blocked",
    "done",
    "archived",
]
PIPELINE = ["backlog", "coding", "gates", "review", "merge", "done"]


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def card(page: Any, story_id: str, stage: str | None = None) -> Any:
    """The story's card; with ``stage``, only while it sits in that stage's column."""
    selector = f'article.card[data-story-id="{story_id}"]'
    if stage is not None:
        selector = f'section.column[data-stage="{stage}"] {selector}[data-stage="{stage}"]'
    return page.locator(selector)


def column_count(page: Any, stage: str) -> int:
    count = page.locator(f'section.column[data-stage="{stage}"] span[data-role="count"]')
    text = count.inner_text()
    found = re.search(r"\d[\d,]*", text)
    assert found, f"column {stage}: count {text!r} holds no number"
    return int(found.group().replace(",", ""))


def open_board(page: Any, server: Server) -> None:
    page.goto(f"{server.url}/")
    board = page.locator("main#board")
    expect(board).to_be_visible()
    columns = board.locator("section.column")
    expect(columns).to_have_count(len(STAGES))
    assert [c.get_attribute("data-stage") for c in columns.all()] == STAGES
    for stage in STAGES:
        heading = board.locator(f'section.column[data-stage="{stage}"] h2')
        expect(heading).to_contain_text(re.compile(stage.replace("_", "[ _]"), re.I))


def open_story(page: Any, server: Server, story_id: str) -> Any:
    page.goto(f"{server.url}/ui/stories/{story_id}")
    story = page.locator(f'main#story[data-story-id="{story_id}"]')
    expect(story.locator('[data-field="stage"]')).to_be_visible()
    return story


def act(page: Any, event: str, reason: str) -> None:
    """Send ``event`` with ``reason`` as a person would: a reason field on the page is
    filled before the button is pressed; one that the button brings up (a dialog) after,
    and then submitted with Enter."""
    field = page.locator('input[name="reason"]')
    button = page.locator(f'button[data-event="{event}"]')
    if field.count() == 1 and field.is_visible():
        field.fill(reason)
        button.click()
        return
    button.click()
    expect(field).to_be_visible()
    field.fill(reason)
    field.press("Enter")


# JS: remember every column the card of one story sits in, in order, from now on.
WATCH_STAGES = """(id) => {
  window.__stages = [];
  const look = () => {
    const card = document.querySelector(`article.card[data-story-id="${CSS.escape(id)}"]`);
    const column = card && card.closest("section.column");
    const stage = column ? column.dataset.stage : null;
    const seen = window.__stages;
    if (stage && seen[seen.length - 1] !== stage) seen.push(stage);
  };
  new MutationObserver(look).observe(document.body,
    {subtree: true, childList: true, attributes: true, attributeFilter: ["data-stage"]});
  look();
}"""


def test_a_story_moves_from_coding_to_done_on_an_open_board(
    served: Server, browsing: Browsing
) -> None:
    page = browsing.page()
    open_board(page, served)
    page.evaluate("window.__sameDocument = 'yes'")
    navigations = len(browsing.navigations)
    page.evaluate(WATCH_STAGES, "flow")
    done_before = column_count(page, "done")
    # Company for the card (and for the screenshot): stories that stay in the backlog.
    served.create("Parse the config file", "config", priority=2)
    served.create("Retry a flaky gate once", "flaky", priority=1)
    served.create("Document the merge queue", "docs")

    # Created after the page loaded: the card can only come from the live stream.
    served.create("Fix add on the board", "flow")
    expect(card(page, "flow", "backlog")).to_be_visible()
    served.transition("flow", "start_coding")
    coding = card(page, "flow", "coding")
    expect(coding).to_be_visible()
    link = coding.locator('a[href="/ui/stories/flow"]')
    expect(link).to_have_text("Fix add on the board")
    expect(coding.locator('[data-field="agent"]')).to_contain_text("coder")
    expect(card(page, "config", "backlog").locator('[data-field="priority"]')).to_have_text("2")
    screenshot(page, "board")

    expect(card(page, "flow", "done")).to_be_visible(timeout=120_000)
    assert served.story("flow")["stage"] == "done", served.log_tail()
    expect(card(page, "flow")).to_have_count(1)  # moved, not copied
    assert column_count(page, "done") == done_before + 1
    assert page.evaluate("window.__sameDocument") == "yes", "the page was reloaded"
    assert browsing.navigations[navigations:] == []
    stages = page.evaluate("window.__stages")
    assert stages[0] == "backlog" and "coding" in stages and stages[-1] == "done", stages
    assert [s for s in PIPELINE if s in stages] == stages, f"out of order: {stages}"
    assert browsing.dialogs == []


def test_block_with_a_reason_from_the_story_page(served: Server, browsing: Browsing) -> None:
    served.create("Block me", "blockme", ["first criterion", "second criterion"])
    page = browsing.page()
    story = open_story(page, served, "blockme")
    expect(story.locator('[data-field="stage"]')).to_have_text(re.compile(r"\s*backlog\s*"))
    expect(page.locator("ul#criteria li")).to_have_text(["first criterion", "second criterion"])
    events = [b.get_attribute("data-event") for b in page.locator("button[data-event]").all()]
    legal = served.story("blockme")["legal_events"]
    assert "block" in events and "start_coding" in events, events
    assert set(events) <= set(legal), f"illegal buttons: {set(events) - set(legal)}"
    assert "unblock" not in events

    reason = "waiting for the <design> review & sign-off"
    act(page, "block", reason)

    expect(story.locator('[data-field="stage"]')).to_have_text(re.compile(r"\s*blocked\s*"))
    api = served.story("blockme")
    assert api["stage"] == "blocked" and api["blocked_reason"] == reason, api
    [blocked] = [e for e in served.history("blockme") if e["type"] == "StoryBlocked"]
    assert blocked["reason"] == reason and blocked["actor"] == "user:local"

    row = page.locator(f'table#audit tr[data-position="{blocked["position"]}"]')
    expect(row).to_have_count(1)
    expect(row.locator('td[data-col="reason"]')).to_have_text(reason)
    expect(row.locator('td[data-col="from"]')).to_have_text(re.compile(r"\s*backlog\s*"))
    expect(row.locator('td[data-col="to"]')).to_have_text(re.compile(r"\s*blocked\s*"))
    expect(row.locator('td[data-col="actor"]')).to_have_text(re.compile(r"\s*user:local\s*"))
    expect(row.locator('td[data-col="position"]')).to_contain_text(str(blocked["position"]))
    # The buttons follow the new stage.
    expect(page.locator('button[data-event="unblock"]')).to_have_count(1)
    expect(page.locator('button[data-event="start_coding"]')).to_have_count(0)
    screenshot(page, "story")
    assert browsing.dialogs == []


def test_the_time_slider_shows_a_past_stage(served: Server, browsing: Browsing) -> None:
    served.create("Travel in time", "travel")
    served.transition("travel", "add_note", reason="a note on the way")
    served.transition("travel", "block", reason="parked")
    positions = [e["position"] for e in served.history("travel")]
    page = browsing.page()
    story = open_story(page, served, "travel")
    stage = story.locator('[data-field="stage"]')
    expect(stage).to_have_text(re.compile(r"\s*blocked\s*"))

    slider = page.locator('input#as-of[type="range"]')
    expect(slider).to_have_attribute("min", str(positions[0]))
    expect(slider).to_have_attribute("max", str(positions[-1]))
    slider.focus()
    slider.press("Home")  # the keyboard moves a range input (and fires input/change)
    expect(stage).to_have_text(re.compile(r"\s*backlog\s*"))
    expect(page.locator('[data-role="as-of-note"]')).to_contain_text(str(positions[0]))
    slider.press("End")
    expect(stage).to_have_text(re.compile(r"\s*blocked\s*"))
    assert served.story("travel")["stage"] == "blocked"  # looking back changes nothing


def test_a_stale_version_shows_the_conflict_and_the_new_state(
    served: Server, browsing: Browsing
) -> None:
    served.create("Raced", "raced")
    page = browsing.page()
    story = open_story(page, served, "raced")
    version = served.story("raced")["version"]
    expect(story.locator('[data-field="version"]')).to_contain_text(str(version))

    def someone_else_first(route: Any) -> None:
        # Another client moves the story while this click is on its way (a note would not
        # do: notes change nothing a guard reads, so the API lets a version past them).
        served.transition("raced", "block", reason="someone else was faster")
        route.continue_()

    page.route("**/stories/raced/transitions", someone_else_first)
    act(page, "block", "too late")

    conflict = page.locator('[data-role="conflict"]')
    expect(conflict).to_be_visible()
    expect(conflict).to_contain_text("someone changed this story, here is the new state")
    api = served.story("raced")
    assert api["stage"] == "blocked" and api["version"] == version + 1, api
    assert api["blocked_reason"] == "someone else was faster"  # the late block did nothing
    # Re-rendered: the new state, not the one the click was made on.
    expect(story.locator('[data-field="version"]')).to_contain_text(str(version + 1))
    expect(story.locator('[data-field="stage"]')).to_have_text(re.compile(r"\s*blocked\s*"))
    expect(page.locator("table#audit")).to_contain_text("someone else was faster")
    expect(page.locator("table#audit")).not_to_contain_text("too late")


def test_hostile_text_renders_as_text(served: Server, browsing: Browsing) -> None:
    name = "<script>alert(1)</script>"
    criterion = '<img src=x onerror="alert(2)">'
    reason = "</td><script>alert(3)</script><b onmouseover=alert(4)>bold</b>"
    served.create(name, "hostile", [criterion])
    served.transition("hostile", "block", reason=reason)
    page = browsing.page()
    open_board(page, served)
    hostile = card(page, "hostile", "blocked")
    expect(hostile.locator('a[href="/ui/stories/hostile"]')).to_have_text(name)
    blocked_reason = hostile.locator('[data-field="blocked-reason"]')
    if blocked_reason.count():
        expect(blocked_reason).to_contain_text("<script>alert(3)</script>")
    assert hostile.locator("script, img, [onmouseover]").count() == 0

    story = open_story(page, served, "hostile")
    expect(story).to_contain_text(name)
    expect(page.locator("ul#criteria li")).to_have_text([criterion])
    expect(page.locator("table#audit")).to_contain_text(reason)
    assert story.locator("script, img, [onmouseover], [onerror]").count() == 0
    # Give an injected handler every chance to fire before concluding none did.
    page.evaluate("() => new Promise(resolve => setTimeout(resolve, 300))")
    assert browsing.dialogs == []


def test_a_read_only_token_sees_no_buttons(served_with_tokens: Server, browsing: Browsing) -> None:
    server = served_with_tokens
    server.create("Guarded", "guarded")
    fragments: list[Any] = []
    page = browsing.page()
    page.on(
        "request",
        lambda request: fragments.append(request) if "/ui/fragments/" in request.url else None,
    )
    page.goto(f"{server.url}/ui/stories/guarded")
    form = page.locator("form#token-form")
    expect(form).to_be_visible()  # the fragment answered 401: the page asks for a token
    assert page.locator("button[data-event]").count() == 0
    form.locator('input[name="token"]').fill(READ_TOKEN)
    form.locator('input[name="token"]').press("Enter")

    story = page.locator('main#story[data-story-id="guarded"]')
    expect(story.locator('[data-field="stage"]')).to_have_text(re.compile(r"\s*backlog\s*"))
    expect(page.locator("button[data-event]")).to_have_count(0)
    assert page.evaluate("sessionStorage.getItem('storyline-token')") == READ_TOKEN
    assert browsing.context.cookies() == []
    sent = [request.all_headers().get("authorization") for request in fragments]
    assert f"Bearer {READ_TOKEN}" in sent, sent

    open_board(page, server)  # same tab: the token is kept for the session
    expect(card(page, "guarded", "backlog")).to_be_visible()
    expect(page.locator("form#token-form")).to_be_hidden()
    assert page.locator("button[data-event]").count() == 0

    # The same page for a writer has buttons (the person events; block and the other
    # operator events are for admins): the check above could fail.
    writer = browsing.context.new_page()
    writer.goto(f"{server.url}/ui/stories/guarded")
    writer.locator('form#token-form input[name="token"]').fill(WRITE_TOKEN)
    writer.locator('form#token-form input[name="token"]').press("Enter")
    expect(writer.locator('button[data-event="start_coding"]')).to_have_count(1)
    expect(writer.locator('button[data-event="add_note"]')).to_have_count(1)
    expect(writer.locator('button[data-event="block"]')).to_have_count(0)
    # And the API agrees about who may act.
    refused = httpx.post(
        f"{server.url}/stories/guarded/transitions",
        json={"event": "add_note", "reason": "no"},
        headers={"Authorization": f"Bearer {READ_TOKEN}"},
        timeout=30,
    )
    assert refused.status_code == 403


def test_a_dropped_stream_catches_up_with_last_event_id(
    chromium: Any, browsing: Browsing, tmp_path: Any
) -> None:
    from service.application import StorylineApplication

    server = make_server(tmp_path, runners=False)
    server.start()
    try:
        page = browsing.page()
        streams: list[Any] = []
        page.on(
            "request",
            lambda request: streams.append(request) if "/events/stream" in request.url else None,
        )
        open_board(page, server)
        navigations = len(browsing.navigations)
        server.create("Seen before the drop", "seen")
        expect(card(page, "seen", "backlog")).to_be_visible()
        [created] = server.history("seen")
        assert streams, "the board never opened /events/stream"

        server.stop()
        # While the server is down the log moves on.
        app = StorylineApplication(server.db)
        try:
            app.transition("seen", "start_coding", actor="user:test")
            app.create_story(
                story_id="missed",
                name="Created during the drop",
                description="",
                acceptance_criteria=["a"],
                depends_on=[],
                actor="user:test",
            )
        finally:
            app.close()
        server.start()

        expect(card(page, "seen", "coding")).to_be_visible(timeout=60_000)
        expect(card(page, "missed", "backlog")).to_be_visible()
        resumed = [request.all_headers().get("last-event-id") for request in streams[1:]]
        assert str(created["position"]) in resumed, (
            f"reconnects sent Last-Event-ID {resumed}, expected {created['position']}"
        )
        assert browsing.navigations[navigations:] == []
    finally:
        server.stop()


def test_the_workers_page_follows_the_registry(served: Server, browsing: Browsing) -> None:
    """Scale-out workers, as the registry and the lease table hold them, on the Workers
    page and as a holder badge on the card; the page follows changes without a reload."""
    from service.application import StorylineApplication
    from service.workers import StoryLeases, Workers

    served.create("Held by a worker", "held")
    app = StorylineApplication(served.db)
    try:
        registry = Workers(app)
        worker = "build-1:41:ab12"
        registry.heartbeat(
            worker,
            role="worker",
            capacity=2,
            held=1,
            merger=False,
            remote="file:///r.git",
            ttl_secs=600,
        )
        registry.heartbeat(
            "merge-1:7:cd34",
            role="merger",
            capacity=0,
            held=0,
            merger=True,
            remote=None,
            ttl_secs=600,
        )
        assert StoryLeases(app, worker, ttl_secs=600).claim("held") is not None

        page = browsing.page()
        page.goto(f"{served.url}/ui/workers")
        row = page.locator(f'table#workers tr[data-worker-id="{worker}"]')
        expect(row.locator('[data-col="state"]')).to_have_text("alive")
        expect(row.locator('[data-col="capacity"]')).to_have_text("2")
        merger = page.locator('table#workers tr[data-worker-id="merge-1:7:cd34"]')
        expect(merger.locator('[data-col="merger"]')).to_have_text("yes")
        lease = page.locator('table#leases tr[data-story-id="held"]')
        expect(lease.locator('[data-col="holder"]')).to_have_text(worker)
        screenshot(page, "workers")

        # The worker stops: the open page shows it on its own.
        page.evaluate("window.__sameDocument = 'yes'")
        StoryLeases(app, worker).release_all()
        registry.stopped(worker)
        expect(row.locator('[data-col="state"]')).to_have_text("stopped", timeout=20_000)
        expect(lease).to_have_count(0)
        assert page.evaluate("window.__sameDocument") == "yes", "the page was reloaded"

        # A live lease shows on the story's card as a holder badge.
        assert StoryLeases(app, "build-2:9:ef56", ttl_secs=600).claim("held") is not None
        open_board(page, served)
        badge = card(page, "held").locator('[data-field="holder"]')
        expect(badge).to_have_text("build-2:9:ef56")
    finally:
        app.close()
    assert browsing.errors == []
