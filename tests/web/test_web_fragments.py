"""The web board's server side on a real uvicorn server over each database: public shells
with no data, fragments behind the API's tokens and rendered for their caller (a reader gets
no buttons), everything hostile escaped, the board paged per column and filtered, the story
page as of a past position, live cards, the list pages, and the static files."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from domain.config import TokenConfig
from service.settings import Database
from tests.api.conftest import (
    ADMIN_TOKEN,
    READ_TOKEN,
    TOKENS,
    WRITE_TOKEN,
    LiveServer,
    make_service,
    start_server,
)

HOSTILE = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
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

# --------------------------------------------------------------------------- a small DOM

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def all(self, tag: str | None = None, **attrs: str | bool) -> list[Node]:
        """Descendants with ``tag`` whose attributes match: a string is the exact value
        (``data_stage="coding"`` for ``data-stage``), True only says it is present."""
        found = []
        for child in self.children:
            if isinstance(child, str):
                continue
            if child.matches(tag, attrs):
                found.append(child)
            found.extend(child.all(tag, **attrs))
        return found

    def one(self, tag: str | None = None, **attrs: str | bool) -> Node:
        found = self.all(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}> elements"
        return found[0]

    def matches(self, tag: str | None, attrs: dict[str, str | bool]) -> bool:
        if tag is not None and self.tag != tag:
            return False
        for key, wanted in attrs.items():
            name = key.rstrip("_").replace("_", "-")
            if name not in self.attrs:
                return False
            if wanted is not True and self.attrs[name] != wanted:
                return False
        return True


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self.stack) - 1, 0, -1):
            if self.stack[index].tag == tag:
                del self.stack[index:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def dom(html: str) -> Node:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root


# --------------------------------------------------------------------------- servers

Serve = Callable[..., LiveServer]


@pytest.fixture
def serve(database: Database, tmp_path: Path) -> Iterator[Serve]:
    """Servers over ``database`` with the projection runner; ``auth=True`` configures the
    admin, write and read tokens of ``tests.api.conftest``."""
    from projections import ProjectionRunner, ReadModels

    started: list[tuple[LiveServer, Any]] = []

    def start(auth: bool = True) -> LiveServer:
        service = make_service(database, tmp_path)
        read_models = ReadModels(database)
        tokens = [TokenConfig(**t) for t in TOKENS] if auth else []  # type: ignore[arg-type]
        live = start_server(
            service,
            read_models,
            tokens=tokens,
            components=[ProjectionRunner(database, service.app)],
        )
        started.append((live, read_models))
        return live

    yield start
    for live, read_models in reversed(started):
        try:
            live.stop()
        finally:
            read_models.close()
            live.service.close()


def create(client: httpx.Client, name: str = "Rate limit uploads", **fields: Any) -> dict[str, Any]:
    body = {"name": name, "acceptance_criteria": ["429 after 10 req/s"], **fields}
    response = client.post("/stories", json=body, params={"wait": "true"})
    assert response.status_code == 201, response.text
    assert response.headers["X-Storyline-Caught-Up"] == "true"
    story: dict[str, Any] = response.json()
    return story


def send(
    client: httpx.Client, story_id: str, event: str, *, reason: str | None = None, **data: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"event": event}
    if reason is not None:
        body["reason"] = reason
    if data:
        body["data"] = data
    response = client.post(f"/stories/{story_id}/transitions", json=body, params={"wait": "true"})
    assert response.status_code == 200, response.text
    assert response.headers["X-Storyline-Caught-Up"] == "true"
    story: dict[str, Any] = response.json()
    return story


def fragment(client: httpx.Client, url: str, **params: Any) -> Node:
    response = client.get(url, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"
    return dom(response.text)


def buttons(node: Node) -> set[str]:
    return {b.attrs["data-event"] for b in node.all("button", data_event=True)}


def column(board: Node, stage: str) -> Node:
    return board.one("section", class_="column", data_stage=stage)


def card_ids(col: Node) -> list[str]:
    return [c.attrs["data-story-id"] for c in col.all("article", data_story_id=True)]


def count(col: Node) -> int:
    return int(col.one(data_role="count").text.strip())


# --------------------------------------------------------------------------- shells


SHELLS = [
    ("/", "board"),
    ("/ui/stories/{id}", "story"),
    ("/ui/merge-queue", "merge-queue-page"),
    ("/ui/runs", "runs-page"),
    ("/ui/epics", "epics-page"),
    ("/ui/epics/epic-1", "epic"),
    ("/ui/metrics", "metrics-page"),
]


def test_shells_are_public_and_hold_no_story_data(serve: Serve) -> None:
    live = serve()
    admin = live.client(ADMIN_TOKEN)
    story = create(admin, "Secret launch plan", acceptance_criteria=["nobody sees this"])
    anonymous = live.client()
    for path, main_id in SHELLS:
        response = anonymous.get(path.format(id=story["id"]))
        assert response.status_code == 200, (path, response.text)
        assert response.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert "Secret launch plan" not in response.text
        assert "nobody sees this" not in response.text
        page = dom(response.text)
        page.one("main", id=main_id)
        page.one("script", src="/static/board.js")
        form = page.one("form", id="token-form")
        assert "hidden" in form.attrs
        form.one("input", name="token")
        form.one("button", type="submit")
        # Everything with data is fetched by the script, with the token.
        assert page.all("article") == []
        assert page.all("table") == []
    board = dom(anonymous.get("/").text)
    board.one("input", id="filter-text")
    board.one("select", id="filter-epic")
    story_page = dom(anonymous.get(f"/ui/stories/{story['id']}").text)
    story_page.one("main", id="story", data_story_id=story["id"])
    epic_page = dom(anonymous.get("/ui/epics/epic-1").text)
    epic_page.one("main", id="epic", data_epic_id="epic-1")


def test_a_hostile_id_in_a_shell_url_comes_back_escaped(serve: Serve) -> None:
    live = serve()
    response = live.client().get('/ui/stories/"><img src=x onerror=alert(1)>')
    assert response.status_code == 200
    assert "<img" not in response.text
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in response.text


def test_static_files_are_served(serve: Serve) -> None:
    live = serve()
    client = live.client()
    script = client.get("/static/board.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert "storyline-token" in script.text
    assert "Last-Event-ID" in script.text
    styles = client.get("/static/board.css")
    assert styles.status_code == 200
    assert styles.headers["content-type"].startswith("text/css")
    assert client.get("/static/nothing-here.js").status_code == 404


# --------------------------------------------------------------------------- auth


def test_fragments_need_a_token_when_tokens_are_configured(serve: Serve) -> None:
    live = serve()
    story = create(live.client(ADMIN_TOKEN))
    urls = [
        "/ui/fragments/board",
        "/ui/fragments/column/backlog",
        f"/ui/fragments/card/{story['id']}",
        f"/ui/fragments/stories/{story['id']}",
        f"/ui/fragments/stories/{story['id']}/log",
        "/ui/fragments/merge-queue",
        "/ui/fragments/runs",
        "/ui/fragments/epics",
        "/ui/fragments/epic-options",
        "/ui/fragments/metrics",
    ]
    anonymous = live.client()
    wrong = live.client("not-a-token-0123456789")
    reader = live.client(READ_TOKEN)
    for url in urls:
        refused = anonymous.get(url)
        assert refused.status_code == 401, (url, refused.text)
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "Rate limit uploads" not in refused.text
        assert wrong.get(url).status_code == 401, url
        answered = reader.get(url)
        assert answered.status_code == 200, (url, answered.text)
        assert answered.headers["content-type"].startswith("text/html")


def test_without_tokens_the_fragments_just_work_with_buttons(serve: Serve) -> None:
    live = serve(auth=False)
    client = live.client()
    story = create(client)
    page = fragment(client, f"/ui/fragments/stories/{story['id']}")
    # Loopback without tokens acts as user:local, an admin.
    assert buttons(page) == {"start_coding", "block", "archive", "add_note"}


def test_a_reader_gets_no_buttons_and_a_writer_only_the_legal_ones(serve: Serve) -> None:
    live = serve()
    admin, writer, reader = (live.client(t) for t in (ADMIN_TOKEN, WRITE_TOKEN, READ_TOKEN))
    story = create(admin)
    url = f"/ui/fragments/stories/{story['id']}"

    read_page = fragment(reader, url)
    assert read_page.all("button") == []
    assert read_page.all("input", name="reason") == []
    assert read_page.all("form", id="actions") == []
    # The reader still sees the story.
    assert read_page.one(data_field="stage").text == "backlog"

    # backlog: start_coding, block, archive and add_note are legal; block and archive
    # are operator transitions (admin only).
    assert buttons(fragment(writer, url)) == {"start_coding", "add_note"}
    admin_page = fragment(admin, url)
    assert buttons(admin_page) == {"start_coding", "block", "archive", "add_note"}
    admin_page.one("input", name="reason")
    actions = admin_page.one("form", id="actions")
    assert actions.attrs["data-expected-version"] == str(story["version"])
    needs = {b.attrs["data-event"] for b in admin_page.all("button", data_needs_reason="true")}
    assert needs == {"block", "archive", "add_note"}

    send(admin, story["id"], "block", reason="waiting for the vendor")
    assert buttons(fragment(admin, url)) == {"unblock", "demote", "archive", "add_note"}
    assert buttons(fragment(writer, url)) == {"add_note"}
    assert fragment(reader, url).all("button") == []

    send(admin, story["id"], "unblock")
    send(admin, story["id"], "start_coding")
    # coding: demote, block and add_note (the runners' events are never buttons).
    assert buttons(fragment(admin, url)) == {"demote", "block", "add_note"}
    assert buttons(fragment(writer, url)) == {"add_note"}


# --------------------------------------------------------------------------- escaping


def drive_to_failed_gates(client: httpx.Client, story_id: str, output: str) -> dict[str, Any]:
    send(client, story_id, "start_coding")
    send(client, story_id, "spawn_agent", agent="claude", runtime="claude-code")
    send(client, story_id, "agent_started", attempt=1, pid=4242)
    send(client, story_id, "agent_exited", attempt=1, outcome="completed", cost_usd=0.25)
    send(client, story_id, "start_gates", commits_ahead=1)
    return send(client, story_id, "gates_failed", output=output)


def test_hostile_names_reasons_and_output_come_back_escaped(serve: Serve, tmp_path: Path) -> None:
    live = serve()
    admin = live.client(ADMIN_TOKEN)
    reader = live.client(READ_TOKEN)
    story = create(
        admin,
        HOSTILE,
        description='<img src=x onerror="alert(2)">',
        acceptance_criteria=["<b>bold</b> & 'quoted'"],
        epic='"><svg onload=alert(3)>',
    )
    sid = story["id"]
    gate_output = "FAILED test_x </pre><script>alert(4)</script>"
    drive_to_failed_gates(admin, sid, gate_output)
    log = tmp_path / ".storyline" / "logs" / sid / "coder-1.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("agent says </pre><iframe src=//evil></iframe>\n")
    send(admin, sid, "block", reason="<a href=javascript:alert(5)>click</a>")
    send(admin, sid, "add_note", reason="</td></tr><script>alert(6)</script>")

    pages = {
        "board": reader.get("/ui/fragments/board").text,
        "column": reader.get("/ui/fragments/column/blocked").text,
        "card": reader.get(f"/ui/fragments/card/{sid}").text,
        "story": reader.get(f"/ui/fragments/stories/{sid}").text,
        "log": reader.get(f"/ui/fragments/stories/{sid}/log").text,
        "runs": reader.get("/ui/fragments/runs").text,
    }
    for name, text in pages.items():
        for raw in (
            HOSTILE,
            "<img",
            "<svg onload",
            "<b>bold",
            "<script>alert(4)",
            "<iframe",
            "<a href=javascript",
            "<script>alert(6)",
        ):
            assert raw not in text, (name, raw)
    assert ESCAPED in pages["card"]
    assert ESCAPED in pages["story"]

    story_page = dom(pages["story"])
    assert story_page.one("h1").text == HOSTILE
    assert story_page.one("pre", id="gate-output").text == gate_output
    assert "<iframe src=//evil></iframe>" in story_page.one("pre", id="agent-log").text
    assert [li.text for li in story_page.one("ul", id="criteria").all("li")] == [
        "<b>bold</b> & 'quoted'"
    ]
    reasons = [td.text for td in story_page.one("table", id="audit").all("td", data_col="reason")]
    assert "<a href=javascript:alert(5)>click</a>" in reasons
    assert "</td></tr><script>alert(6)</script>" in reasons
    assert story_page.one(data_field="blocked-reason").text == (
        "<a href=javascript:alert(5)>click</a>"
    )
    card = dom(pages["card"]).one("article", class_="card")
    assert card.one("a").text == HOSTILE
    assert card.one(data_field="epic").text == '"><svg onload=alert(3)>'
    # A free-text epic is not an epic id: shown, never linked.
    assert story_page.all("a", data_role="epic-link") == []


# --------------------------------------------------------------------------- the board


def test_the_board_has_every_stage_and_pages_each_column(serve: Serve) -> None:
    live = serve()
    admin = live.client(ADMIN_TOKEN)
    reader = live.client(READ_TOKEN)
    # Board order: priority descending, then id.
    made = [create(admin, f"story {n}", priority=n, id=f"s{n}") for n in range(1, 6)]
    coding = create(admin, "coding one", id="c1")
    send(admin, coding["id"], "start_coding")
    assert len(made) == 5

    board = fragment(reader, "/ui/fragments/board", limit=2)
    assert [s.attrs["data-stage"] for s in board.all("section", class_="column")] == STAGES
    for stage in STAGES:
        assert column(board, stage).one("h2").text == stage
    backlog = column(board, "backlog")
    assert card_ids(backlog) == ["s5", "s4"]
    assert count(backlog) == 5
    more = backlog.one("a", data_role="more")
    assert backlog.attrs["data-offset"] == "0"
    assert more.attrs["href"] == "/?stage=backlog&offset=2&limit=2"
    assert more.attrs["data-fragment"] == "/ui/fragments/column/backlog?offset=2&limit=2"
    assert card_ids(column(board, "coding")) == ["c1"]
    assert count(column(board, "coding")) == 1
    assert column(board, "coding").all("a", data_role="more") == []
    assert count(column(board, "done")) == 0
    first = backlog.one("article", data_story_id="s5")
    assert first.attrs["data-stage"] == "backlog"
    assert first.one("a", href="/ui/stories/s5").text == "story 5"
    assert first.one(data_field="priority").text == "5"
    columns = board.one("div", data_role="columns")
    assert int(columns.attrs["data-position"]) >= 1

    # The next page of one column; the others start at their first card.
    page = fragment(reader, "/ui/fragments/board", limit=2, offset=2, stage="backlog")
    assert card_ids(column(page, "backlog")) == ["s3", "s2"]
    assert column(page, "backlog").attrs["data-offset"] == "2"
    assert column(page, "coding").attrs["data-offset"] == "0"
    assert card_ids(column(page, "coding")) == ["c1"]
    last = fragment(reader, "/ui/fragments/board", limit=2, offset=4, stage="backlog")
    assert card_ids(column(last, "backlog")) == ["s1"]
    assert column(last, "backlog").all("a", data_role="more") == []

    # The script appends a column fragment's cards to the column.
    more_cards = fragment(reader, "/ui/fragments/column/backlog", limit=2, offset=2)
    section = more_cards.one("section", class_="column", data_stage="backlog")
    assert card_ids(section) == ["s3", "s2"]
    assert section.one("a", data_role="more").attrs["data-fragment"] == (
        "/ui/fragments/column/backlog?offset=4&limit=2"
    )
    # The default page is 50 cards per column.
    assert len(card_ids(column(fragment(reader, "/ui/fragments/board"), "backlog"))) == 5
    assert reader.get("/ui/fragments/board", params={"limit": 0}).status_code == 422
    assert reader.get("/ui/fragments/board", params={"stage": "nowhere"}).status_code == 422
    assert reader.get("/ui/fragments/board", params={"limt": 2}).status_code == 422


def test_the_board_filters_by_text_and_epic(serve: Serve) -> None:
    live = serve()
    admin = live.client(ADMIN_TOKEN)
    reader = live.client(READ_TOKEN)
    create(admin, "Rate limit Uploads", id="up-1", epic="payments")
    create(admin, "Resize uploads", id="up-2")
    create(admin, "Invoice emails", id="inv-1", epic="payments")
    started = create(admin, "Upload retries", id="up-3", epic="payments")
    send(admin, started["id"], "start_coding")

    by_text = fragment(reader, "/ui/fragments/board", text="UPLOAD")
    assert card_ids(column(by_text, "backlog")) == ["up-1", "up-2"]
    assert count(column(by_text, "backlog")) == 2
    assert card_ids(column(by_text, "coding")) == ["up-3"]

    by_id = fragment(reader, "/ui/fragments/board", text="inv-")
    assert card_ids(column(by_id, "backlog")) == ["inv-1"]

    by_epic = fragment(reader, "/ui/fragments/board", epic="payments")
    assert card_ids(column(by_epic, "backlog")) == ["inv-1", "up-1"]
    assert count(column(by_epic, "backlog")) == 2
    assert card_ids(column(by_epic, "coding")) == ["up-3"]
    options = by_epic.one("template", data_role="epic-options").all("option")
    assert [o.attrs["value"] for o in options] == ["payments"]

    both = fragment(reader, "/ui/fragments/board", text="upload", epic="payments", limit=1)
    backlog = column(both, "backlog")
    assert card_ids(backlog) == ["up-1"]
    assert count(backlog) == 1
    assert backlog.all("a", data_role="more") == []

    paged = fragment(reader, "/ui/fragments/board", epic="payments", limit=1)
    more = column(paged, "backlog").one("a", data_role="more")
    assert more.attrs["data-fragment"] == (
        "/ui/fragments/column/backlog?offset=1&limit=1&epic=payments"
    )
    rest = fragment(reader, "/ui/fragments/column/backlog", epic="payments", limit=1, offset=1)
    assert card_ids(rest.one("section", class_="column")) == ["up-1"]

    nothing = fragment(reader, "/ui/fragments/board", text="no such story")
    assert all(count(column(nothing, s)) == 0 for s in STAGES)
    assert nothing.all("article") == []


def test_a_card_fragment_reflects_the_current_stage(serve: Serve) -> None:
    live = serve()
    admin = live.client(ADMIN_TOKEN)
    reader = live.client(READ_TOKEN)
    story = create(admin, "Card story", epic="payments")
    sid = story["id"]
    card = fragment(reader, f"/ui/fragments/card/{sid}").one("article", class_="card")
    assert card.attrs["data-stage"] == "backlog"
    assert card.attrs["data-story-id"] == sid

    # What the script does on an event: ask for the card as of the event's position.
    moved = admin.post(f"/stories/{sid}/transitions", json={"event": "start_coding"})
    assert moved.status_code == 200, moved.text
    after = moved.json()["position"]
    card = fragment(reader, f"/ui/fragments/card/{sid}", after=after).one("article")
    assert card.attrs["data-stage"] == "coding"

    send(admin, sid, "block", reason="vendor outage")
    card = fragment(reader, f"/ui/fragments/card/{sid}").one("article")
    assert card.attrs["data-stage"] == "blocked"
    assert card.one(data_field="blocked-reason").text == "vendor outage"

    # The board's filters: a card they leave out is 204 (the script drops it).
    kept = reader.get(f"/ui/fragments/card/{sid}", params={"epic": "payments", "text": "card"})
    assert kept.status_code == 200
    left_out = reader.get(f"/ui/fragments/card/{sid}", params={"epic": "other"})
    assert left_out.status_code == 204
    assert left_out.content == b""
    assert reader.get("/ui/fragments/card/no-such-story").status_code == 404
    assert reader.get("/ui/fragments/card/bad%20id").status_code == 422


def test_cards_show_the_running_agent_cost_retries_and_queue_rank(serve: Serve) -> None:
    live = serve()
    admin = live.client(ADMIN_TOKEN)
    reader = live.client(READ_TOKEN)
    sid = create(admin, "Busy story")["id"]
    drive_to_failed_gates(admin, sid, "1 failed")
    send(admin, sid, "spawn_agent", agent="claude", runtime="claude-code")
    send(admin, sid, "agent_started", attempt=2, pid=4343)
    card = fragment(reader, f"/ui/fragments/card/{sid}").one("article")
    assert card.one(data_field="retries").text == "1"
    assert card.one(data_field="cost").text == "$0.25"
    agent = card.one(data_field="agent")
    assert agent.text.startswith("coder · ")
    assert agent.attrs["data-since"]

    queued = create(admin, "Queued story")["id"]
    send(admin, queued, "start_coding")
    send(admin, queued, "spawn_agent", agent="claude", runtime="claude-code")
    send(admin, queued, "agent_started", attempt=1, pid=4444)
    send(admin, queued, "agent_exited", attempt=1, outcome="completed")
    send(admin, queued, "start_gates", commits_ahead=1)
    send(admin, queued, "gates_passed", feature_branch="story/x", commits_ahead=1)
    card = fragment(reader, f"/ui/fragments/card/{queued}").one("article")
    assert card.attrs["data-stage"] == "merge"
    assert card.one(data_field="queue-rank").text == "#1"
    queue = fragment(reader, "/ui/fragments/merge-queue").one("table", id="merge-queue")
    rows = queue.all("tr", data_story_id=True)
    assert [r.attrs["data-story-id"] for r in rows] == [queued]


# --------------------------------------------------------------------------- story page


def test_the_story_fragment_shows_the_story_as_of_a_past_position(serve: Serve) -> None:
    live = serve()
    admin = live.client(ADMIN_TOKEN)
    reader = live.client(READ_TOKEN)
    story = create(admin, "Travel in time", acceptance_criteria=["one", "two"])
    sid = story["id"]
    created_at = story["position"]
    coding_at = send(admin, sid, "start_coding")["position"]
    blocked_at = send(admin, sid, "block", reason="needs a decision")["position"]
    url = f"/ui/fragments/stories/{sid}"

    now = fragment(reader, url)
    root = now.one("div", data_role="story-root")
    assert int(root.attrs["data-position"]) >= blocked_at
    assert now.one(data_field="stage").text == "blocked"
    assert now.one(data_field="version").text == "3"
    assert now.all(data_role="as-of-note") == []
    assert [li.text for li in now.one("ul", id="criteria").all("li")] == ["one", "two"]
    slider = now.one("input", id="as-of")
    assert slider.attrs["type"] == "range"
    assert slider.attrs["min"] == str(created_at)
    assert slider.attrs["max"] == str(blocked_at)
    assert slider.attrs["value"] == str(blocked_at)
    audit = now.one("table", id="audit")
    rows = audit.all("tr", data_position=True)
    assert [int(r.attrs["data-position"]) for r in rows] == [created_at, coding_at, blocked_at]
    last = rows[-1]
    assert last.one("td", data_col="actor").text == "user:alice"
    assert last.one("td", data_col="reason").text == "needs a decision"
    assert last.one("td", data_col="from").text == "coding"
    assert last.one("td", data_col="to").text == "blocked"
    assert last.one("td", data_col="position").text == str(blocked_at)
    assert last.one("td", data_col="time").one("time").attrs["datetime"]

    past = fragment(reader, url, as_of=str(created_at))
    assert past.one(data_field="stage").text == "backlog"
    assert past.one(data_field="version").text == "1"
    note = past.one(data_role="as-of-note")
    assert f"log position {created_at}" in note.text
    assert past.one("input", id="as-of").attrs["value"] == str(created_at)
    middle = fragment(reader, url, as_of=str(coding_at))
    assert middle.one(data_field="stage").text == "coding"
    # A position between two of the story's events: the state after the earlier one.
    between = fragment(reader, url, as_of=str(blocked_at - 1))
    assert between.one(data_field="stage").text == "coding"

    assert reader.get(url, params={"as_of": "yesterday"}).status_code == 422
    assert reader.get("/ui/fragments/stories/no-such-story").status_code == 404


def test_the_story_fragment_shows_attempts_gate_output_and_the_log_tail(
    serve: Serve, tmp_path: Path
) -> None:
    live = serve()
    admin = live.client(ADMIN_TOKEN)
    reader = live.client(READ_TOKEN)
    sid = create(admin, "Attempted story")["id"]
    drive_to_failed_gates(admin, sid, "E   assert 1 == 2")
    send(admin, sid, "spawn_agent", agent="claude", runtime="claude-code")
    send(admin, sid, "agent_started", attempt=2, pid=4545)
    logs = tmp_path / ".storyline" / "logs" / sid
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "coder-1.log").write_text("first attempt output\n")
    (logs / "coder-2.log").write_text("\x1b[32msecond\x1b[0m attempt running\n")

    page = fragment(reader, f"/ui/fragments/stories/{sid}")
    assert page.one("pre", id="gate-output").text == "E   assert 1 == 2"
    attempts = page.one("table", id="attempts").all("tr", data_attempt=True)
    assert [(r.attrs["data-role-name"], r.attrs["data-attempt"]) for r in attempts] == [
        ("coder", "2"),
        ("coder", "1"),
    ]
    assert attempts[1].one("td", data_col="outcome").text == "completed"
    assert attempts[1].one("td", data_col="cost").text == "$0.25"
    assert attempts[0].one("td", data_col="outcome").text == "running"
    log = page.one("pre", id="agent-log")
    # The running attempt's log, without terminal colour codes, and marked live.
    assert log.text == "second attempt running\n"
    assert log.attrs["data-live"] == "true"
    assert (log.attrs["data-log-role"], log.attrs["data-log-attempt"]) == ("coder", "2")

    earlier = fragment(reader, f"/ui/fragments/stories/{sid}/log", role="coder", attempt="1")
    pre = earlier.one("pre", id="agent-log")
    assert pre.text == "first attempt output\n"
    assert pre.attrs["data-live"] == "false"
    missing = fragment(reader, f"/ui/fragments/stories/{sid}/log", role="mergemaster", attempt=1)
    assert missing.one("pre", id="agent-log").text == ""
    only_role = reader.get(f"/ui/fragments/stories/{sid}/log", params={"role": "coder"})
    assert only_role.status_code == 422
    bad_role = reader.get(f"/ui/fragments/stories/{sid}/log", params={"role": "../x", "attempt": 1})
    assert bad_role.status_code == 422


# --------------------------------------------------------------------------- other pages


def test_runs_epics_and_metrics_fragments(serve: Serve) -> None:
    live = serve()
    admin = live.client(ADMIN_TOKEN)
    reader = live.client(READ_TOKEN)
    sid = create(admin, "Metered story")["id"]
    drive_to_failed_gates(admin, sid, "boom")

    runs = fragment(reader, "/ui/fragments/runs").one("table", id="runs")
    row = runs.one("tr", data_story_id=sid)
    assert row.one("td", data_col="outcome").text == "completed"
    assert row.one("a", href=f"/ui/stories/{sid}").text == sid

    epic = admin.post(
        "/epics",
        json={
            "name": "Pretty <printer>",
            "goal": "Print prettily.",
            "acceptance_criteria": ["it prints"],
        },
    )
    assert epic.status_code == 201, epic.text
    epic_id = epic.json()["id"]
    epics = fragment(reader, "/ui/fragments/epics").one("table", id="epics")
    epic_row = epics.one("tr", data_epic_id=epic_id)
    assert epic_row.one("td", data_col="name").text == "Pretty <printer>"
    assert epic_row.one("a", href=f"/ui/epics/{epic_id}").text == epic_id
    page = fragment(reader, f"/ui/fragments/epics/{epic_id}")
    assert page.one("h1").text == "Pretty <printer>"
    assert page.one(data_field="stage").text == epic.json()["stage"]
    page.one("table", id="epic-stories")
    assert reader.get("/ui/fragments/epics/epic-999").status_code == 404
    assert reader.get("/ui/fragments/epics/not-an-epic").status_code == 422

    # A story of the epic links to it.
    linked = create(admin, "Part of the epic", epic=epic_id)
    story_page = fragment(reader, f"/ui/fragments/stories/{linked['id']}")
    link = story_page.one("a", data_role="epic-link")
    assert link.attrs["href"] == f"/ui/epics/{epic_id}"
    board = fragment(reader, "/ui/fragments/board")
    values = [o.attrs["value"] for o in board.one("template").all("option")]
    assert values == [epic_id]
    # What the board re-reads when an epic event comes: the choices alone.
    options = fragment(reader, "/ui/fragments/epic-options", epic="chosen")
    choices = options.one("template", data_role="epic-options").all("option")
    assert [(o.attrs["value"], o.text) for o in choices] == [
        (epic_id, f"{epic_id} · Pretty <printer>"),
        ("chosen", "chosen"),
    ]

    metrics = fragment(reader, "/ui/fragments/metrics")
    charts = {svg.attrs["data-chart"] for svg in metrics.all("svg", data_chart=True)}
    assert charts == {"throughput", "dwell", "gate-failures", "cost", "review-scores"}
    gates = metrics.one("svg", data_chart="gate-failures")
    assert [t.text for t in gates.all("title")] != []
    assert any("100% of 1" in t.text for t in gates.all("title"))
    cost = metrics.one("svg", data_chart="cost")
    assert any("$0.25" in t.text for t in cost.all("title"))
