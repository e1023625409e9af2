"""An in-memory index of every story's stage and dependencies, fed from the log.

The runners need "which backlog stories depend on X" and "which stories sit in stage S"
without loading every aggregate; the index answers from decoded log entries (no pydantic),
and is rebuilt from position 0 at start-up (about a second per million events).

Epics share the log. Their events never enter the story index (nothing would step an
"epic-3" story); instead the index notes which epics may need a look, for the epic runner:
an epic whose own event was folded in, or one of whose stories changed stage. It takes them
with :meth:`StoryIndex.take_epics` (level-triggered, like the stories: a note says only
*which* epics to look at).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from service.application import StorylineApplication
from service.events_log import LoggedEvent, is_epic_originator, is_story_originator


@dataclass
class IndexedStory:
    story_id: str
    stage: str
    depends_on: tuple[str, ...]
    entered_stage_position: int
    merge_failure_kind: str | None = None
    final: bool = False
    merging: bool = False
    epic: str | None = None


@dataclass
class StoryIndex:
    stories: dict[str, IndexedStory] = field(default_factory=dict)
    dependants: dict[str, set[str]] = field(default_factory=dict)
    position: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    catch_up_lock: threading.Lock = field(default_factory=threading.Lock)
    reader: Any = None
    breaker_events: list[LoggedEvent] = field(default_factory=list)
    """Provider breaker openings and closings folded in and not yet taken by the runner."""
    project_events: list[LoggedEvent] = field(default_factory=list)
    """Project-level decisions (the gate registry's) not yet taken by the runner."""
    epics: set[str] = field(default_factory=set)
    """Epics that may need a look and were not yet taken (see :meth:`take_epics`)."""
    all_epics: set[str] = field(default_factory=set)
    """Every epic the log holds (a sweep looks at them without scanning the store)."""

    def apply(self, events: Iterable[LoggedEvent]) -> set[str]:
        """Fold events in; returns the ids of stories that need a look (incl. dependants)."""
        touched: set[str] = set()
        with self.lock:
            for event in events:
                if event.position <= self.position:
                    continue  # already folded in (catch-ups may overlap)
                self.position = event.position
                sid = event.story_id
                if is_epic_originator(sid):
                    self.epics.add(sid)
                    self.all_epics.add(sid)
                    continue
                if not is_story_originator(sid):
                    self.project_events.append(event)  # the gate registry's decisions
                    continue
                touched.add(sid)
                if event.type in ("ProviderBreakerOpened", "ProviderBreakerClosed"):
                    self.breaker_events.append(event)
                    continue  # not a step: nothing else of the story changes
                if event.type == "StoryCreated":
                    deps = tuple(event.data.get("depends_on") or ())
                    # ``epic`` was a free-form label before epics existed: only an epic's
                    # id ties the story to an epic.
                    label = event.data.get("epic")
                    epic = label if isinstance(label, str) and is_epic_originator(label) else None
                    self.stories[sid] = IndexedStory(
                        sid, "backlog", deps, event.position, epic=epic
                    )
                    if epic is not None:
                        self.epics.add(epic)
                    for dep in deps:
                        self.dependants.setdefault(dep, set()).add(sid)
                    continue
                story = self.stories.get(sid)
                if story is None:
                    continue
                if event.to_stage and event.to_stage != story.stage:
                    story.stage = event.to_stage
                    story.entered_stage_position = event.position
                    story.merging = False
                    if story.epic is not None:
                        self.epics.add(story.epic)
                    if event.to_stage in ("done", "archived"):
                        touched.update(self.dependants.get(sid, ()))
                if event.type == "MergeStarted":
                    story.merging = True
                elif event.type == "SpeculationRestarted":
                    story.merging = False  # back in the queue at its old position
                elif event.type in ("MergeRequeued", "StoryUnblocked") and story.stage == "merge":
                    # Back in the queue: its place is the position of this event.
                    story.entered_stage_position = event.position
                    story.merging = False
                if event.type == "MergeFailed":
                    story.merge_failure_kind = event.data.get("kind")
                    story.final = False
                elif event.type == "MergemasterAttempted":
                    story.final = True
                elif event.type in ("MergeRequeued", "StoryUnblocked", "MergeSucceeded"):
                    story.final = False
        return touched

    def catch_up(self, app: StorylineApplication, batch: int = 5000) -> set[str]:
        """Fold in everything committed since the index's position.

        With a ``reader`` (the projections' EventReader) a position that is allocated but
        not yet committed on PostgreSQL holds the index back instead of being skipped for
        good; without one the application's plain log read is used (SQLite commits in
        position order).
        """
        touched: set[str] = set()
        with self.catch_up_lock:
            while True:
                if self.reader is not None:
                    events = self.reader.read(self.position, batch)
                else:
                    events = app.events_after(self.position, batch)
                if not events:
                    return touched
                touched |= self.apply(events)

    def take_breaker_events(self) -> list[LoggedEvent]:
        with self.lock:
            taken, self.breaker_events = self.breaker_events, []
        return taken

    def take_project_events(self) -> list[LoggedEvent]:
        with self.lock:
            taken, self.project_events = self.project_events, []
        return taken

    def take_epics(self) -> set[str]:
        """The epics noted since the last call (and forget them): those with a new event
        of their own, or a story of theirs created or moved to another stage."""
        with self.lock:
            taken, self.epics = self.epics, set()
        return taken

    def in_stage(self, *stages: str) -> list[IndexedStory]:
        with self.lock:
            found = [s for s in self.stories.values() if s.stage in stages]
        return sorted(found, key=lambda s: s.entered_stage_position)

    def stage_of(self, story_id: str) -> str | None:
        with self.lock:
            story = self.stories.get(story_id)
            return story.stage if story else None

    def get(self, story_id: str) -> IndexedStory | None:
        with self.lock:
            return self.stories.get(story_id)
