"""Mapping between pydantic domain events and stored events (orjson on the wire)."""

from __future__ import annotations

from typing import Any, cast

import orjson
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, ProgrammingError, StoredEvent, Transcoder, Transcoding
from eventsourcing.utils import get_topic, resolve_topic
from pydantic import BaseModel


class OrjsonTranscoder(Transcoder):
    def encode(self, obj: Any) -> bytes:
        return orjson.dumps(obj)

    def decode(self, data: bytes) -> Any:
        return orjson.loads(data)

    def register(self, _: Transcoding) -> None:
        raise ProgrammingError("storyline events are pydantic models; nothing to register")


class PydanticMapper(Mapper[str]):
    """Stores ``model_dump(mode="json")`` of each event under its pinned topic."""

    def to_stored_event(self, domain_event: DomainEventProtocol[str]) -> StoredEvent:
        model = cast(BaseModel, domain_event)
        state = model.model_dump(mode="json", exclude={"originator_id", "originator_version"})
        class_version = getattr(type(domain_event), "class_version", 1)
        if class_version > 1:
            state["class_version"] = class_version
        stored = self.transcoder.encode(state)
        if self.compressor:
            stored = self.compressor.compress(stored)
        if self.cipher:
            stored = self.cipher.encrypt(stored)
        return StoredEvent(
            originator_id=domain_event.originator_id,
            originator_version=domain_event.originator_version,
            topic=get_topic(type(domain_event)),
            state=stored,
        )

    def decode_state(self, stored_event: StoredEvent) -> dict[str, Any]:
        state_bytes = stored_event.state
        if self.cipher:
            state_bytes = self.cipher.decrypt(state_bytes)
        if self.compressor:
            state_bytes = self.compressor.decompress(state_bytes)
        return cast(dict[str, Any], self.transcoder.decode(state_bytes))

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[str]:
        cls = resolve_topic(stored_event.topic)
        state = self.decode_state(stored_event)
        from_version = state.pop("class_version", 1)
        class_version = getattr(cls, "class_version", 1)
        while from_version < class_version:
            getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(state)
            from_version += 1
        state["originator_id"] = str(stored_event.originator_id)
        state["originator_version"] = stored_event.originator_version
        return cast(DomainEventProtocol[str], cls(**state))
