"""Commands and queries on the project's gate registry (``domain.gate_registry``)."""

from __future__ import annotations

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from domain.errors import VersionConflict
from domain.gate_registry import REGISTRY_ID, GateRegistry
from service.application import StorylineApplication
from service.events_log import LoggedEvent


class GateRegistryService:
    def __init__(self, app: StorylineApplication) -> None:
        self.app = app

    def get(self) -> GateRegistry:
        try:
            registry: object = self.app.repository.get(REGISTRY_ID)
        except AggregateNotFoundError:
            return GateRegistry.create(actor="system:storyline")
        assert isinstance(registry, GateRegistry)
        return registry

    def quarantined(self) -> dict[str, dict[str, object]]:
        return dict(self.get().quarantined)

    def quarantine(
        self, *, actor: str, gate: str, phase: str, reason: str, story_id: str | None = None
    ) -> int:
        registry = self.get()
        registry.quarantine(actor=actor, gate=gate, phase=phase, reason=reason, story_id=story_id)
        return self._save(registry)

    def clear(self, *, actor: str, gate: str, reason: str | None) -> int:
        registry = self.get()
        registry.clear(actor=actor, gate=gate, reason=reason)
        return self._save(registry)

    def history(self) -> list[LoggedEvent]:
        return [logged for logged, _ in self.app.aggregate_events(REGISTRY_ID)]

    def _save(self, registry: GateRegistry) -> int:
        try:
            recordings = self.app.save(registry)
        except IntegrityError:
            raise VersionConflict(REGISTRY_ID, registry.version, registry.version) from None
        position = recordings[-1].notification.id
        self.app._committed(position)
        return position
