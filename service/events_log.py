"""Log entries as read models see them: position, story, type, actor, reason, stages, data.

Decoding goes straight from the stored JSON (upcast when the class version moved on) to a
plain dataclass, without building pydantic events: projections replay millions of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from eventsourcing.utils import resolve_topic

import domain.events  # noqa: F401  (registers the pinned topics)

_COMMON = ("timestamp", "actor", "reason", "from_stage", "to_stage", "originator_topic")


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    position: int
    story_id: str
    version: int
    type: str
    topic: str
    timestamp: datetime
    actor: str
    reason: str | None
    from_stage: str | None
    to_stage: str | None
    data: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "story_id": self.story_id,
            "version": self.version,
            "type": self.type,
            "timestamp": self.timestamp.isoformat(),
            "actor": self.actor,
            "reason": self.reason,
            "from_stage": self.from_stage,
            "to_stage": self.to_stage,
            "data": self.data,
        }


_TYPE_CACHE: dict[str, tuple[str, int, type | None]] = {}


def _type_info(topic: str) -> tuple[str, int, type | None]:
    info = _TYPE_CACHE.get(topic)
    if info is None:
        try:
            cls: type | None = resolve_topic(topic)
        except Exception:
            cls = None
        name = cls.__name__ if cls is not None else topic.split(".")[-2] if "." in topic else topic
        info = (name, getattr(cls, "class_version", 1), cls)
        _TYPE_CACHE[topic] = info
    return info


def decode(
    position: int, story_id: str, version: int, topic: str, state: bytes | memoryview
) -> LoggedEvent:
    name, class_version, cls = _type_info(topic)
    payload: dict[str, Any] = orjson.loads(bytes(state))
    from_version = payload.pop("class_version", 1)
    while cls is not None and from_version < class_version:
        getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(payload)
        from_version += 1
    common = {key: payload.pop(key, None) for key in _COMMON}
    return LoggedEvent(
        position=int(position),
        story_id=str(story_id),
        version=int(version),
        type=name,
        topic=topic,
        timestamp=datetime.fromisoformat(common["timestamp"]),
        actor=common["actor"] or "",
        reason=common["reason"],
        from_stage=common["from_stage"],
        to_stage=common["to_stage"],
        data=payload,
    )


def decode_row(row: Any) -> LoggedEvent:
    return decode(
        row["position"], row["originator_id"], row["originator_version"], row["topic"], row["state"]
    )
