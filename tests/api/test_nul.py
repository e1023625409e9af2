"""A NUL in text a client writes is a 422 naming the field, and nothing is written.

Names, descriptions, criteria, epics and reasons are text people read; ids, paths and
branches in event data are composed by runners. None of them may hold U+0000 (PostgreSQL
read models cannot store it, and it means nothing there). Machine output that must be kept
whole (gate output) is accepted: see tests/projections/test_nul.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.conftest import LiveServer, assert_error, new_story

CREATE = {"name": "n", "description": "d", "acceptance_criteria": ["a"]}


def _head(client: httpx.Client) -> int:
    head: int = client.get("/events?after=0").json()["head"]
    return head


@pytest.mark.parametrize(
    ("override", "loc"),
    [
        ({"name": "x\x00y"}, ["name"]),
        ({"description": "x\x00y"}, ["description"]),
        ({"acceptance_criteria": ["fine", "x\x00y"]}, ["acceptance_criteria", 1]),
        ({"epic": "x\x00y"}, ["epic"]),
        ({"reason": "x\x00y"}, ["reason"]),
    ],
)
def test_create_with_a_nul_names_the_field_and_writes_nothing(
    live: LiveServer, override: dict[str, Any], loc: list[Any]
) -> None:
    client = live.client()
    new_story(client)
    before = _head(client)
    response = client.post("/stories", json={**CREATE, **override})
    details = assert_error(response, 422, "validation_error")
    assert details[0]["loc"] == loc
    assert loc[0] in response.json()["error"]["message"]
    assert _head(client) == before


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"event": "start_coding", "reason": "go\x00"}, ["reason"]),
        ({"event": "block", "reason": "\x00"}, ["reason"]),
        (
            {"event": "worktree_ready", "data": {"path": "/tmp/x\x00", "branch": "b"}},
            ["data", "path"],
        ),
    ],
)
def test_transition_with_a_nul_names_the_field_and_writes_nothing(
    live: LiveServer, body: dict[str, Any], loc: list[Any]
) -> None:
    client = live.client()
    sid = new_story(client)["id"]
    if body["event"] == "worktree_ready":
        client.post(f"/stories/{sid}/transitions", json={"event": "start_coding"})
    before = _head(client)
    response = client.post(f"/stories/{sid}/transitions", json=body)
    details = assert_error(response, 422, "validation_error")
    assert details[0]["loc"] == loc
    assert ".".join(map(str, loc)) in response.json()["error"]["message"]
    assert _head(client) == before
    assert client.get(f"/stories/{sid}").json()["version"] == before
