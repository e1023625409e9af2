"""What the story page's "Merge trust" section shows: the hunks a resolution lost, the
drops a mergemaster declared, the gates found flaky on the story, and its gate verdicts.

Lost hunks, declared drops and flaky gates come from the story as shown (now or as of a
position); verdicts and flaky detections from its history up to that position. Whether a
gate is quarantined is the registry's word now, not as of the position: it says whether
the gate's failures block today.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.events_log import LoggedEvent

MAX_VERDICTS = 100
"""Verdicts shown, newest kept: a story retried many times ran its gates many times."""
TREE_SHORT = 12


@dataclass(frozen=True)
class LostHunk:
    file: str
    side: str
    hunk: str
    lines: list[str]


@dataclass(frozen=True)
class DeclaredDrop:
    file: str
    side: str
    hunk: str
    reason: str


@dataclass(frozen=True)
class Detection:
    position: int
    action: str
    verdicts: list[bool]
    tree: str
    reason: str


@dataclass(frozen=True)
class FlakyGate:
    gate: str
    quarantined: bool
    detections: list[Detection]


@dataclass(frozen=True)
class Verdict:
    position: int
    timestamp: str
    phase: str
    gate: str
    tree: str
    passed: bool
    rerun: int
    ignored: bool
    output: str


@dataclass(frozen=True)
class MergeTrust:
    lost_hunks: list[LostHunk] = field(default_factory=list)
    declared_drops: list[DeclaredDrop] = field(default_factory=list)
    flaky_gates: list[FlakyGate] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    earlier_verdicts: int = 0
    """Verdicts left out of ``verdicts`` (the oldest)."""

    @property
    def empty(self) -> bool:
        return not (self.lost_hunks or self.declared_drops or self.flaky_gates or self.verdicts)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _short(tree: Any) -> str:
    return _text(tree)[:TREE_SHORT]


def _lines(value: Any) -> list[str]:
    if isinstance(value, list):
        return [_text(line) for line in value]
    return [] if value is None else [_text(value)]


def _until(history: Iterable[LoggedEvent], position: int | None) -> Iterable[LoggedEvent]:
    for event in history:
        if position is not None and event.position > position:
            return
        yield event


def merge_trust(
    shown: Mapping[str, Any],
    history: list[LoggedEvent],
    as_of_position: int | None,
    quarantined: Mapping[str, Any],
) -> MergeTrust:
    """The section's content for the story ``shown`` (a snapshot), whose history is
    ``history``, as of ``as_of_position`` (None: now)."""
    lost = [
        LostHunk(
            _text(h.get("file")), _text(h.get("side")), _text(h.get("hunk")), _lines(h.get("lines"))
        )
        for h in shown.get("lost_hunks", [])
    ]
    drops = [
        DeclaredDrop(
            _text(d.get("file")), _text(d.get("side")), _text(d.get("hunk")), _text(d.get("reason"))
        )
        for d in shown.get("declared_drops", [])
    ]
    detections: dict[str, list[Detection]] = {}
    verdicts: list[Verdict] = []
    for event in _until(history, as_of_position):
        data = event.data
        if event.type == "GateFlakyDetected":
            detections.setdefault(_text(data.get("gate")), []).append(
                Detection(
                    event.position,
                    _text(data.get("action")),
                    [bool(v) for v in data.get("verdicts", [])],
                    _short(data.get("tree")),
                    _text(event.reason),
                )
            )
        elif event.type == "GateVerdictRecorded":
            verdicts.append(
                Verdict(
                    event.position,
                    event.timestamp.isoformat(),
                    _text(data.get("phase")),
                    _text(data.get("gate")),
                    _short(data.get("tree")),
                    bool(data.get("passed")),
                    int(data.get("rerun") or 0),
                    bool(data.get("ignored")),
                    _text(data.get("output")),
                )
            )
    flaky = [
        FlakyGate(gate, gate in quarantined, detections.get(gate, []))
        for gate in map(_text, shown.get("flaky_gates", []))
    ]
    earlier = max(len(verdicts) - MAX_VERDICTS, 0)
    return MergeTrust(lost, drops, flaky, verdicts[earlier:], earlier)


__all__ = ["MAX_VERDICTS", "MergeTrust", "merge_trust"]
