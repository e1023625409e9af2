"""Worker runners (scale-out) on the web board, on each database: the Workers page (workers
and live leases, or a plain note on a single machine), "held by" and the gated commit on the
story page, and the holder badge on cards only while a live lease exists. Worker ids come
from the database: a hostile one is escaped everywhere."""

from __future__ import annotations

from service.workers import StoryLeases, Workers
from tests.api.conftest import READ_TOKEN, LiveServer
from tests.api.test_merge_queue_trust import to_gates
from tests.api.test_workers_api import HOSTILE as ODD_ID
from tests.api.test_workers_api import coding_story, some_workers
from tests.web.test_web_fragments import (  # noqa: F401 - serve is the fixture
    ESCAPED,
    HOSTILE,
    Node,
    Serve,
    dom,
    fragment,
    serve,
)

COMMIT = "ab" * 20


def cells(row: Node) -> dict[str, str]:
    return {td.attrs["data-col"]: td.text.strip() for td in row.all("td", data_col=True)}


def holder_tags(live: LiveServer, story_id: str, after: int) -> list[str]:
    card = fragment(live.client(READ_TOKEN), f"/ui/fragments/card/{story_id}", after=after)
    return [tag.text for tag in card.all("span", class_="holder-tag")]


def story_fields(live: LiveServer, story_id: str) -> Node:
    return fragment(live.client(READ_TOKEN), f"/ui/fragments/stories/{story_id}")


def test_the_workers_page_on_one_machine_and_with_workers(serve: Serve) -> None:  # noqa: F811
    live = serve()
    shell = dom(live.client().get("/ui/workers").text)
    shell.one("main", id="workers-page")
    shell.one("div", data_src="/ui/fragments/workers")
    assert shell.one("a", href="/ui/workers").text == "Workers"
    assert dom(live.client().get("/").text).one("a", href="/ui/workers")
    assert live.client().get("/ui/fragments/workers").status_code == 401

    empty = fragment(live.client(READ_TOKEN), "/ui/fragments/workers")
    assert "No worker runners" in empty.one("p", class_="empty").text
    assert empty.all("table") == []

    app = live.service.app
    sid = some_workers(app)
    Workers(app).heartbeat(HOSTILE, role="merger", capacity=1, held=0, merger=True, remote=None)
    StoryLeases(app, HOSTILE).claim("hostile-story")
    response = live.client(READ_TOKEN).get("/ui/fragments/workers")
    assert response.status_code == 200
    assert HOSTILE not in response.text and ESCAPED in response.text
    page = dom(response.text)
    table = page.one("table", id="workers")
    rows = {row.attrs["data-worker-id"]: row for row in table.all("tr", data_worker_id=True)}
    assert set(rows) == {"w-alive", "w-stale", "w-stopped", ODD_ID, HOSTILE}
    alive = cells(rows["w-alive"])
    assert alive["worker"] == "w-alive"
    assert (alive["role"], alive["capacity"], alive["held"], alive["merger"]) == (
        "all",
        "2",
        "1",
        "yes",
    )
    assert alive["heartbeat"].endswith("ago") and alive["state"] == "alive"
    assert rows["w-alive"].attrs["data-state"] == "alive"
    assert rows["w-stale"].attrs["data-state"] == "stale"
    assert rows["w-stopped"].attrs["data-state"] == "stopped"
    assert cells(rows[HOSTILE])["worker"] == HOSTILE  # shown as text, not markup
    page.one("p", data_role="stale-note")
    leases = {
        row.attrs["data-story-id"]: cells(row)
        for row in page.one("table", id="leases").all("tr", data_story_id=True)
    }
    assert leases[sid]["holder"] == "w-alive" and leases[sid]["generation"] == "1"
    assert leases["hostile-story"]["holder"] == HOSTILE
    assert set(leases) == {sid, "other-story", "hostile-story"}


def test_the_story_page_and_cards_show_the_holder(serve: Serve) -> None:  # noqa: F811
    live = serve()
    app = live.service.app
    sid = some_workers(app)
    position = app.max_position()

    held = story_fields(live, sid).one("dd", data_field="holder")
    assert held.attrs["data-live"] == "true"
    assert held.text.startswith("w-alive") and "generation 1" in held.text
    assert holder_tags(live, sid, position) == ["w-alive"]
    board = fragment(live.client(READ_TOKEN), "/ui/fragments/board")
    [card] = board.all("article", data_story_id=sid)
    assert [tag.text for tag in card.all("span", class_="holder-tag")] == ["w-alive"]

    # A story nobody holds has no badge and no holder line.
    free = coding_story(app, "Nobody holds this")
    position = app.max_position()
    assert holder_tags(live, free, position) == []
    assert story_fields(live, free).all("dd", data_field="holder") == []

    # Released (or expired): the page names the last holder from the log; no badge.
    StoryLeases(app, "w-alive").release(sid)
    position = app.transition(sid, "add_note", actor="user:t", reason="lease released").position
    last = story_fields(live, sid).one("dd", data_field="holder")
    assert last.attrs["data-live"] == "false" and "no live lease now" in last.text
    assert holder_tags(live, sid, position) == []

    # The commit the gates passed on, and a hostile worker's lease badge escaped.
    gated = to_gates(app, "Gated").sid
    app.transition(
        gated, "claim", actor="runner:w-alive", data={"worker": "w-alive", "generation": 1}
    )
    StoryLeases(app, HOSTILE).claim(gated)
    page = story_fields(live, gated)
    assert page.one("dd", data_field="holder").text.startswith(HOSTILE)
    position = app.transition(
        gated,
        "gates_passed",
        actor="runner:gates",
        data={"feature_branch": "story/gated", "commits_ahead": 1, "commit": COMMIT},
    ).position
    response = live.client(READ_TOKEN).get(f"/ui/fragments/stories/{gated}")
    assert HOSTILE not in response.text
    assert dom(response.text).one("dd", data_field="gated-commit").text == COMMIT
    card = live.client(READ_TOKEN).get(f"/ui/fragments/card/{gated}", params={"after": position})
    assert HOSTILE not in card.text and ESCAPED in card.text
