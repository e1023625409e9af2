"""The project's gate registry: which gates are quarantined as flaky, and who cleared them.

One aggregate per project (id ``_gates``: a story id must start with a letter or digit, so
it can never collide). Its events are decisions, few and far between: a gate caught giving
different verdicts on the same tree is quarantined under ``[gates] flaky = "quarantine"``,
and stays so until a person clears it. The verdicts themselves are recorded on the stories
whose gates ran (``GateVerdictRecorded``), where their history shows them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from eventsourcing.domain import BaseAggregate, CanInitAggregate, CanMutateAggregate
from eventsourcing.utils import register_topic
from pydantic import BaseModel, ConfigDict

from domain.errors import InvalidCommand
from domain.events import Actor, Reason
from domain.story import check_reason

REGISTRY_ID = "_gates"
MAX_GATE = 4096


class RegistryEvent(BaseModel, CanMutateAggregate[str]):
    model_config = ConfigDict(frozen=True, extra="forbid")

    TOPIC: ClassVar[str]
    originator_id: str
    originator_version: int
    timestamp: datetime
    actor: Actor
    reason: Reason | None = None

    def apply(self, aggregate: Any) -> None:
        self.apply_to(aggregate)

    def apply_to(self, registry: GateRegistry) -> None:
        """The event's change."""


class GateRegistryCreated(RegistryEvent, CanInitAggregate[str]):
    TOPIC: ClassVar[str] = "storyline.GateRegistryCreated.v1"
    originator_topic: str


class GateQuarantined(RegistryEvent):
    """A flaky gate's failures stop blocking (they are still recorded and counted)."""

    TOPIC: ClassVar[str] = "storyline.GateQuarantined.v1"
    gate: str
    phase: str
    story_id: str | None = None
    """The story whose runs showed the flakiness."""

    def apply_to(self, registry: GateRegistry) -> None:
        registry.quarantined = {
            **registry.quarantined,
            self.gate: {
                "phase": self.phase,
                "since": self.timestamp.isoformat(),
                "reason": self.reason,
                "story_id": self.story_id,
                "actor": self.actor,
            },
        }


class GateCleared(RegistryEvent):
    """A person cleared a quarantined gate: its failures block again."""

    TOPIC: ClassVar[str] = "storyline.GateCleared.v1"
    gate: str

    def apply_to(self, registry: GateRegistry) -> None:
        registry.quarantined = {k: v for k, v in registry.quarantined.items() if k != self.gate}
        registry.cleared = registry.cleared + 1


class GateRegistry(BaseAggregate[str]):
    TOPIC: ClassVar[str] = "storyline.GateRegistry.v1"

    def __init__(self) -> None:
        self.quarantined: dict[str, dict[str, Any]] = {}
        self.cleared = 0

    @classmethod
    def create(cls, *, actor: str) -> GateRegistry:
        return cls._create(
            GateRegistryCreated, id=REGISTRY_ID, actor=actor, reason="the gate registry"
        )

    def quarantine(
        self, *, actor: str, gate: str, phase: str, reason: str, story_id: str | None = None
    ) -> None:
        _check_gate(gate)
        if gate in self.quarantined:
            raise InvalidCommand(f"gate {gate!r} is already quarantined")
        if not reason.strip():
            raise InvalidCommand("quarantining a gate needs a reason")
        self.trigger_event(
            GateQuarantined,
            actor=actor,
            reason=check_reason(reason),
            gate=gate,
            phase=phase,
            story_id=story_id,
        )

    def clear(self, *, actor: str, gate: str, reason: str | None) -> None:
        _check_gate(gate)
        if gate not in self.quarantined:
            known = ", ".join(sorted(self.quarantined)) or "none"
            raise InvalidCommand(f"gate {gate!r} is not quarantined (quarantined: {known})")
        if not reason or not reason.strip():
            raise InvalidCommand("clearing a gate needs a reason")
        self.trigger_event(GateCleared, actor=actor, reason=check_reason(reason), gate=gate)


def _check_gate(gate: str) -> None:
    if not isinstance(gate, str) or not gate.strip() or len(gate) > MAX_GATE or "\x00" in gate:
        raise InvalidCommand("a gate is named by its command line (at most 4096 characters)")


REGISTRY_EVENT_CLASSES = (GateRegistryCreated, GateQuarantined, GateCleared)
for _cls in REGISTRY_EVENT_CLASSES:
    register_topic(_cls.TOPIC, _cls)
