"""Hostile values at the HTTP boundary: refused with a 422 on both databases, never a 500,
and nothing committed (issue 12, items 4 to 6)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import quote

import httpx

from projections.read_models import encode_cursor
from service.settings import Database
from tests.api.conftest import LiveServer, ServerFactory, assert_error, new_story
from tests.integration.test_cli import run as run_cli


def head(client: httpx.Client) -> int:
    value: int = client.get("/events").json()["head"]
    return value


def test_a_story_id_with_a_line_break_or_nul_is_refused_and_nothing_is_committed(
    live: LiveServer,
) -> None:
    client = live.client()
    new_story(client, id="ok")
    for story_id in ("nlid\n", "nlid\r\n", "x\x00y", "a\u2028b"):
        refuse_story_id(client, story_id)
    assert head(client) == 1  # only "ok"


def refuse_story_id(client: httpx.Client, story_id: str) -> None:
    body = {"name": "n", "acceptance_criteria": ["a"], "id": story_id}
    assert_error(client.post("/stories", json=body), 422, "invalid_story_id")
    keyed = client.post("/stories", json=body, headers={"Idempotency-Key": repr(story_id)[1:-1]})
    assert_error(keyed, 422, "invalid_story_id")
    dependant = {"name": "n", "acceptance_criteria": ["a"], "depends_on": [story_id]}
    assert client.post("/stories", json=dependant).status_code in (404, 422)


def test_story_paths_with_a_line_break_or_nul_are_refused(live: LiveServer) -> None:
    client = live.client()
    new_story(client, id="nlid")
    for raw in ("nlid%0A", "x%00y", "nlid%0D%0A"):
        refuse_story_path(client, raw)
    assert head(client) == 1


def refuse_story_path(client: httpx.Client, raw: str) -> None:
    for path in (f"/stories/{raw}", f"/stories/{raw}/history", f"/stories/{raw}?as_of=1"):
        assert_error(client.get(path), 422, "invalid_story_id")
    assert_error(client.get(f"/agents/runs?story_id={raw}"), 422, "invalid_story_id")
    moved = client.post(f"/stories/{raw}/transitions", json={"event": "start_coding"})
    assert_error(moved, 422, "invalid_story_id")


# Latin-1 bytes whose characters are digits to str.isdigit() ("²", "¹³") but not to int().
def test_last_event_id_must_be_ascii_digits(live: LiveServer) -> None:
    client = live.client()
    for raw in (b"\xb2", b"\xb9\xb3", b"1\xb2", b"\xbd", b"1_0", b"+1", b"1.0", b"9" * 19):
        response = client.get("/events/stream", headers={"Last-Event-ID": raw})
        assert_error(response, 422, "invalid_last_event_id")


NOT_PLAIN_DIGITS = ["²", "¹³", "١٢", "1_0", "+1", "1.0", " 1", "1\n", "0x1"]


def test_integers_in_the_query_must_be_ascii_digits(live: LiveServer) -> None:
    client = live.client()
    new_story(client)
    for value in NOT_PLAIN_DIGITS:
        for path in ("/events", "/events/stream", "/stories/1/history"):
            response = client.get(path, params={"after": value})
            assert_error(response, 422, "validation_error")
        for path in ("/events", "/stories", "/stories/1/history", "/agents/runs", "/board"):
            assert_error(client.get(path, params={"limit": value}), 422, "validation_error")
        log = client.get(f"/stories/1/agents/coder/{quote(value)}/log")
        assert_error(log, 422, "validation_error")
        assert_error(
            client.get("/stories/1/agents/coder/1/log", params={"tail": value}),
            422,
            "validation_error",
        )


def test_plain_positions_still_work(live: LiveServer) -> None:
    client = live.client()
    new_story(client)
    assert client.get("/events", params={"after": "0", "limit": "10"}).json()["head"] == 1
    assert client.get("/stories/1/history", params={"after": "0"}).status_code == 200
    assert client.get("/stories/1", params={"as_of": "1"}).json()["version"] == 1


CRAFTED_CURSORS = [
    (2**63 - 1, "1"),
    (-(2**63), "1"),
    (2**31, "1"),
    (-(2**31) - 1, "1"),
    (1_000_001, "1"),
    (0, "x\x00y"),
    (0, "nlid\n"),
    (0, ""),
    (0, "é"),
    (0, "x" * 65),
]


def test_crafted_board_cursors_are_422_on_both_databases(live: LiveServer) -> None:
    client = live.client()
    new_story(client)
    for priority, story_id in CRAFTED_CURSORS:
        cursor = encode_cursor(priority, story_id)
        response = client.get("/stories", params={"cursor": cursor})
        assert_error(response, 422, "invalid_cursor")


def test_real_cursors_at_the_priority_bounds_still_page(serve_api: ServerFactory) -> None:
    live = serve_api(projections=True)
    client = live.client()
    for priority in (-1_000_000, 1_000_000, 0):
        body = {"name": "n", "acceptance_criteria": ["a"], "priority": priority}
        assert client.post("/stories", json=body, params={"wait": "true"}).status_code == 201
    ids: list[str] = []
    cursor = None
    while True:
        params: dict[str, object] = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = client.get("/stories", params=params)
        assert page.status_code == 200, page.text
        ids += [s["id"] for s in page.json()["stories"]]
        cursor = page.json()["next_cursor"]
        if not cursor:
            break
    assert ids == ["2", "3", "1"]


def test_cli_as_of_must_be_ascii_digits_or_a_time(tmp_path: Path, database: Database) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    run_cli(project, "init", db=database)
    run_cli(project, "story", "add", "n", "-c", "a", db=database)
    shown = run_cli(project, "story", "show", "1", "--as-of", "²", db=database, check=False)
    assert shown.returncode == 2, shown.stderr
    assert "Traceback" not in shown.stderr
    assert "--as-of" in shown.stderr


EDGE_TIMES = [
    "0001-01-01T00:00:00+23:59",
    "0001-01-01T00:00:00",
    "9999-12-31T23:59:59-23:59",
    "9999-12-31T23:59:59.999999",
    "2026-01-01T00:00:00.123456789+00:00",
    "99999999999999999",
    "999999999999999999",
]


def test_as_of_at_the_edges_of_time_and_position_is_never_a_500(live: LiveServer) -> None:
    client = live.client()
    new_story(client)
    for value in EDGE_TIMES:
        response = client.get("/stories/1", params={"as_of": value})
        assert response.status_code in (200, 404, 422), (value, response.text)
