"""Merge trust on the web board (issue 19, "shown to people"): the story page's "Merge
trust" section (lost hunks, declared drops, flaky gates, gate verdicts, also as of a past
position), the merge queue's columns and the board's quarantined-gates banner and card
marker, each on both databases, with gate output and hunk lines escaped."""

from __future__ import annotations

from service.gate_registry import GateRegistryService
from tests.api.conftest import ADMIN_TOKEN, READ_TOKEN, LiveServer
from tests.api.test_merge_queue_trust import (
    DROP,
    DROP_REASON,
    GATE,
    HOSTILE,
    LOST,
    TREE,
    _send,
    flaky_then_quarantined,
    lose_a_hunk_and_declare_one,
    to_gates,
    to_merge,
    trust_story,
)
from tests.web.test_web_fragments import (  # noqa: F401 - serve is the fixture
    ESCAPED,
    Node,
    Serve,
    column,
    fragment,
    serve,
)

LINE_ESCAPED = "def helper(): return &#39;&lt;script&gt;alert(1)&lt;/script&gt;&#39;"


def caught_up(live: LiveServer, position: int) -> None:
    assert live.read_models.wait_for(position, None, 20.0), "projections did not catch up"


def no_raw_script(live: LiveServer, url: str, **params: object) -> str:
    """The fragment's HTML, with every hostile text escaped."""
    response = live.client(READ_TOKEN).get(url, params=params)
    assert response.status_code == 200, response.text
    assert HOSTILE not in response.text
    assert "<script" not in response.text
    return response.text


def trust_section(page: Node) -> Node:
    return page.one("section", id="merge-trust")


def cells(row: Node) -> dict[str, str]:
    return {td.attrs["data-col"]: td.text.strip() for td in row.all("td", data_col=True)}


# --------------------------------------------------------------------------- story page


def test_the_story_page_shows_merge_trust_now_and_as_of_a_position(serve: Serve) -> None:  # noqa: F811
    live = serve()
    story = trust_story(live.service.app, f"Trusted {HOSTILE}")
    url = f"/ui/fragments/stories/{story.sid}"
    text = no_raw_script(live, url)
    assert ESCAPED in text
    assert LINE_ESCAPED in text
    page = fragment(live.client(READ_TOKEN), url)
    section = trust_section(page)

    [lost] = section.one("table", id="lost-hunks").all("tr", data_file=True)
    assert cells(lost) == {
        "file": LOST["file"],
        "side": "base",
        "hunk": LOST["hunk"],
        "lines": "\n".join(LOST["lines"]),
    }
    [drop] = section.one("table", id="declared-drops").all("tr", data_file=True)
    assert cells(drop) == {**DROP, "reason": DROP_REASON}

    [flaky] = section.one("ul", id="flaky-gates").all("li", data_gate=GATE)
    assert flaky.one(data_field="gate").text == GATE
    assert "quarantined now" in flaky.one(data_field="quarantined").text
    [detection] = flaky.all("li", data_position=str(story.at["flaky"]))
    assert "failed, then passed; quarantined" in detection.text
    assert TREE[:12] in detection.text and TREE[:13] not in detection.text

    rows = section.one("table", id="gate-verdicts").all("tr", data_position=True)
    assert [r.attrs["data-position"] for r in rows] == [
        str(story.at[k]) for k in ("failed", "rerun", "ignored")
    ]
    shown = [cells(r) for r in rows]
    assert [(c["gate"], c["tree"], c["phase"]) for c in shown] == [(GATE, TREE[:12], "gates")] * 3
    assert [(c["verdict"], c["rerun"], c["ignored"]) for c in shown] == [
        ("failed", "", ""),
        ("passed", "1", ""),
        ("failed", "", "ignored (quarantined)"),
    ]
    assert rows[0].one("pre").text == f"1 failed {HOSTILE}"
    assert rows[2].attrs["data-ignored"] == "true"

    # As of the position before the merge failed: verdicts and the flaky gate, no hunks.
    before = fragment(live.client(READ_TOKEN), url, as_of=story.at["passed"])
    section = trust_section(before)
    assert section.all("table", id="lost-hunks") == []
    assert section.all("table", id="declared-drops") == []
    section.one("ul", id="flaky-gates")
    assert len(section.one("table", id="gate-verdicts").all("tr", data_position=True)) == 3
    # ... before the rerun: one verdict, nothing flaky yet.
    first = trust_section(fragment(live.client(READ_TOKEN), url, as_of=story.at["failed"]))
    assert section.all("ul", id="flaky-gates") != []
    assert first.all("ul", id="flaky-gates") == []
    assert len(first.one("table", id="gate-verdicts").all("tr", data_position=True)) == 1
    # ... when it was created: nothing at all, and it says so.
    created = trust_section(fragment(live.client(READ_TOKEN), url, as_of=story.at["created"]))
    assert created.all("table") == [] and created.all("ul") == []
    assert "No lost or declared hunks" in created.one("p", class_="empty").text


def test_a_cleared_gate_is_flaky_on_the_story_but_no_longer_quarantined(serve: Serve) -> None:  # noqa: F811
    live = serve()
    app = live.service.app
    story = to_gates(app, "Flaky only")
    flaky_then_quarantined(app, story)
    url = f"/ui/fragments/stories/{story.sid}"
    flaky = trust_section(fragment(live.client(READ_TOKEN), url)).one("li", data_gate=GATE)
    flaky.one(data_field="quarantined")
    GateRegistryService(app).clear(actor="user:alice", gate=GATE, reason="fixed the test")
    flaky = trust_section(fragment(live.client(READ_TOKEN), url)).one("li", data_gate=GATE)
    assert flaky.all(data_field="quarantined") == []


# --------------------------------------------------------------------------- merge queue


def test_the_merge_queue_page_flags_lost_and_declared_hunks_and_flaky_gates(
    serve: Serve,  # noqa: F811
) -> None:
    live = serve()
    app = live.service.app
    plain = to_gates(app, "Plain story")
    to_merge(app, plain)
    story = trust_story(app)
    caught_up(live, story.last)
    url = "/ui/fragments/merge-queue"
    assert ESCAPED in no_raw_script(live, url)
    page = fragment(live.client(READ_TOKEN), url)
    table = page.one("table", id="merge-queue")
    rows = {r.attrs["data-story-id"]: r for r in table.all("tr", data_story_id=True)}
    assert list(rows) == [plain.sid, story.sid]

    quiet = rows[plain.sid]
    assert "data-hunks-lost" not in quiet.attrs and "data-flaky" not in quiet.attrs
    assert quiet.all(data_flag=True) == []

    flagged = rows[story.sid]
    assert flagged.attrs["data-hunks-lost"] == "true" and flagged.attrs["data-flaky"] == "true"
    [lost] = flagged.one("td", data_col="lost-hunks").all("li", data_flag="hunk-lost")
    assert lost.text == f"{LOST['file']} (base) {LOST['hunk']}"
    [drop] = flagged.one("td", data_col="declared-drops").all("li", data_flag="declared-drop")
    assert drop.text == f"{DROP['file']} (story) {DROP['hunk']}: {DROP_REASON}"
    [gate] = flagged.one("td", data_col="flaky-gates").all("li")
    assert (gate.attrs["data-flag"], gate.text) == ("quarantined", f"{GATE} (quarantined)")
    banner = page.one(data_role="quarantined-gates")
    assert [li.attrs["data-gate"] for li in banner.all("li")] == [GATE]

    GateRegistryService(app).clear(actor="user:alice", gate=GATE, reason="fixed the test")
    page = fragment(live.client(READ_TOKEN), url)
    assert page.all(data_role="quarantined-gates") == []
    row = page.one("tr", data_story_id=story.sid)
    assert row.one("td", data_col="flaky-gates").one("li").attrs["data-flag"] == "flaky"


# --------------------------------------------------------------------------- board


def test_the_board_shows_quarantined_gates_and_marks_cards_with_lost_hunks(
    serve: Serve,  # noqa: F811
) -> None:
    live = serve()
    app = live.service.app
    reader = live.client(READ_TOKEN)
    conflicted = to_gates(app, "Plain conflict")
    to_merge(app, conflicted)
    _send(app, conflicted, "merging", "start_merge")
    _send(app, conflicted, "conflict", "merge_failed", kind="conflict_detected", conflicts=["a"])
    caught_up(live, conflicted.last)
    board = fragment(reader, "/ui/fragments/board")
    board.one(data_role="gate-banner-slot")
    assert board.all(data_role="quarantined-gates") == []
    assert board.all(data_field="merge-trust") == []

    story = to_gates(app, "Lost a hunk")
    flaky_then_quarantined(app, story)
    to_merge(app, story)
    lose_a_hunk_and_declare_one(app, story)
    caught_up(live, story.last)
    assert ESCAPED in no_raw_script(live, "/ui/fragments/board")
    board = fragment(reader, "/ui/fragments/board")
    banner = board.one("aside", data_role="quarantined-gates")
    [gate] = banner.all("li", data_gate=True)
    assert gate.attrs["data-gate"] == GATE
    assert GATE in gate.text and f"found flaky in story {story.sid}" in gate.text
    gate.one("a", href=f"/ui/stories/{story.sid}")
    failures = column(board, "merge_failure")
    marked = failures.one("article", data_story_id=story.sid)
    assert marked.one(data_field="merge-trust").text == "hunks lost"
    assert failures.one("article", data_story_id=conflicted.sid).all(data_field="merge-trust") == []
    # The card fragment the live board fetches carries the marker too.
    card = fragment(reader, f"/ui/fragments/card/{story.sid}").one("article")
    card.one(data_field="merge-trust")

    # The banner alone, as the board re-reads it on a gate registry event.
    alone = fragment(reader, "/ui/fragments/quarantined-gates")
    alone.one(data_role="gate-banner-slot").one(data_role="quarantined-gates")
    assert ESCAPED in no_raw_script(live, "/ui/fragments/quarantined-gates")
    GateRegistryService(app).clear(actor="user:alice", gate=GATE, reason="fixed the test")
    alone = fragment(reader, "/ui/fragments/quarantined-gates")
    alone.one(data_role="gate-banner-slot")
    assert alone.all(data_role="quarantined-gates") == []
    assert fragment(reader, "/ui/fragments/board").all(data_role="quarantined-gates") == []


def test_the_banner_fragment_needs_a_token(serve: Serve) -> None:  # noqa: F811
    live = serve()
    refused = live.client().get("/ui/fragments/quarantined-gates")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert live.client(READ_TOKEN).get("/ui/fragments/quarantined-gates").status_code == 200
    assert live.client(ADMIN_TOKEN).get("/ui/fragments/quarantined-gates").status_code == 200
