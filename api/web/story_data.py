"""What the story page shows: the story now or as of a position, the actions its reader may
take, the audit trail, the agent attempts, and the tail of an agent's log.

The story and its history are read from the event store (current to the last commit); the
attempts from the agent-runs projection. Functions here block: call them from a worker
thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.auth import Principal, may_transition
from api.routes_common import ApiState
from api.routes_stories import parse_as_of
from api.web.trust_data import merge_trust
from api.web.worker_data import story_holder
from domain.ids import is_epic_id
from domain.stages import AgentRole, Stage
from domain.story import Story
from service.gate_registry import GateRegistryService

LOG_TAIL_BYTES = 64 * 1024

# The transitions a person sends from the story page, in the order the buttons appear. The
# rest (coding, gates, merge, agent events) are the runners' and carry data only they have.
PERSON_ACTIONS: tuple[tuple[str, str], ...] = (
    ("start_coding", "Start coding"),
    ("unblock", "Unblock"),
    ("requeue_merge", "Requeue merge"),
    ("request_fixup", "Request fix-up"),
    ("demote", "Demote to backlog"),
    ("block", "Block"),
    ("archive", "Archive"),
    ("add_note", "Add note"),
)
_ALWAYS_ASK = frozenset({"block", "demote", "add_note"})

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


@dataclass(frozen=True)
class Action:
    event: str
    label: str
    needs_reason: bool


def actions_for(caller: Principal, story: Story) -> list[Action]:
    """The buttons ``caller`` gets: legal from the story's stage and allowed to the caller.

    A reader, or an agent token, gets none at all."""
    if not caller.at_least("write"):
        return []
    legal = set(story.legal_events)
    found = []
    for event, label in PERSON_ACTIONS:
        if event not in legal or not may_transition(caller, story.id, event):
            continue
        # Archiving a done story is tidying up; abandoning one needs a reason.
        needs = event in _ALWAYS_ASK or (event == "archive" and story.stage is not Stage.DONE)
        found.append(Action(event, label, needs))
    return found


@dataclass
class AgentLog:
    role: str | None
    attempt: int | None
    text: str
    live: bool
    truncated: bool

    @property
    def caption(self) -> str:
        if self.role is None:
            return "No agent has run for this story yet."
        state = "running, refreshed while it runs" if self.live else "ended"
        return f"{self.role} attempt {self.attempt} ({state})"


def _read_tail(path: Path, limit: int) -> tuple[str, bool] | None:
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            data = handle.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    truncated = size > limit
    text = data.decode("utf-8", "replace")
    if truncated and "\n" in text:
        text = text[text.index("\n") + 1 :]  # start on a whole line
    return _ANSI.sub("", text), truncated


def agent_log(
    state: ApiState,
    story: Story,
    runs: list[dict[str, Any]],
    role: AgentRole | None = None,
    attempt: int | None = None,
) -> AgentLog:
    """The tail of one attempt's log: the one asked for, else the running one, else the
    latest. The path is built from validated parts only, as ``GET .../log`` builds it."""
    running = story.running_agent
    if role is None or attempt is None:
        if running:
            role, attempt = AgentRole(running["role"]), int(running["attempt"])
        elif runs:
            role, attempt = AgentRole(runs[0]["role"]), int(runs[0]["attempt"])
        else:
            return AgentLog(None, None, "", False, False)
    live = (
        running is not None
        and running.get("role") == role.value
        and running.get("attempt") == attempt
    )
    path = state.service.project / ".storyline" / "logs" / story.id / f"{role.value}-{attempt}.log"
    found = _read_tail(path, LOG_TAIL_BYTES)
    if found is None:
        return AgentLog(role.value, attempt, "", live, False)
    text, truncated = found
    return AgentLog(role.value, attempt, text, live, truncated)


def _as_of_position(history: list[Any], position: int | None, moment: Any) -> int | None:
    """The log position of the last event the past state includes."""
    last = None
    for event in history:
        if position is not None and event.position > position:
            break
        if moment is not None and event.timestamp > moment:
            break
        last = event.position
    return last


def story_page(
    state: ApiState,
    story_id: str,
    caller: Principal,
    as_of: str | None,
) -> dict[str, Any]:
    """The story fragment's context. A malformed ``as_of`` is a 422 (as on the API); a
    moment before the story existed is a 404."""
    app = state.service.app
    parsed = parse_as_of(as_of) if as_of is not None else None
    head = app.max_position()
    story = app.get_story(story_id)
    history = app.history(story_id)
    shown = story
    as_of_position: int | None = None
    if parsed is not None:
        position, moment = parsed
        shown = app.get_story_as_of(story_id, position=position, at=moment)
        as_of_position = _as_of_position(history, position, moment)
        if as_of_position == history[-1].position:
            as_of_position = None  # the newest event: that is the story as it is now
    runs = state.read_models.agent_runs(story_id, 100)
    snapshot = shown.snapshot()
    quarantined = GateRegistryService(app).quarantined()
    return {
        "story": story.snapshot(),
        "shown": snapshot,
        "trust": merge_trust(snapshot, history, as_of_position, quarantined),
        "holder": story_holder(app, snapshot, as_of_position is not None),
        "target_branch": story.target_branch,
        "epic_link": bool(story.epic) and is_epic_id(story.epic or ""),
        "history": [event.as_json() for event in history],
        "first_position": history[0].position,
        "last_position": history[-1].position,
        "as_of": as_of,
        "as_of_position": as_of_position,
        "head": head,
        "actions": actions_for(caller, story),
        "runs": runs,
        "log": agent_log(state, story, runs),
    }


__all__ = ["PERSON_ACTIONS", "Action", "AgentLog", "actions_for", "agent_log", "story_page"]
