"""Starting, watching and reaping an epic's agents (its planner, its evaluator), each step
an epic event.

The order is the story launcher's (``runners.launcher``): ``spawn_planner`` is recorded with
the epic's expected version before the process starts (two runners can never start the same
attempt), ``planner_started`` with the pid after, ``planner_exited`` when it ends. The
planner reports its plan (or its questions) itself, through the API, while it runs; its exit
only closes the attempt. The epic's evaluator is launched the same way with its own events
(``spawn_evaluator``, ``evaluator_started``, ``evaluator_exited``), attempts, log names and
pid file, and reports its verdict through the API (``submit_evaluation``). The agent
machinery (runtimes, argv, secrets, pid files) is the story launcher's, so an epic's agent
runs exactly like a coder would.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domain.config import AgentConfig, StorylineConfig
from domain.epic import Epic
from domain.errors import DomainError, IllegalTransition, VersionConflict
from domain.stages import AgentOutcome, AgentRole
from runners.agents import (
    AgentResult,
    AgentStartError,
    RunningAgent,
    SecretInArgvError,
    SpawnSpec,
    StoryText,
    build_argv,
    runtime_for,
)
from runners.agents.argv import EPIC_EVALUATION_PURPOSE
from runners.agents.mcp_config import write_mcp_config
from runners.handles import Handles, exit_reason
from runners.launcher import AgentConfigError, AgentLauncher
from service.agent_tokens import AgentTokens
from service.epics import EpicService

logger = logging.getLogger(__name__)

ACTOR = "runner:planner"


@dataclass(frozen=True)
class EpicAgentRole:
    """What differs between an epic's planner and its evaluator: their events, the epic's
    fields that hold their attempts, their log and pid file names."""

    role: AgentRole
    spawn_event: str
    started_event: str
    exited_event: str
    purpose: str
    actor: str

    @property
    def name(self) -> str:
        return self.role.value

    def running_of(self, epic: Epic) -> dict[str, Any] | None:
        if self.role is AgentRole.EVALUATOR:
            return epic.running_evaluator
        return epic.running_planner

    def attempts_of(self, epic: Epic) -> int:
        if self.role is AgentRole.EVALUATOR:
            return epic.evaluator_attempts
        return epic.planner_attempts

    def pid_key(self, epic_id: str) -> str:
        # The planner keeps the epic id (pid files of older runners); the evaluator gets a
        # name no story id can take ('+' is outside the story id alphabet).
        return epic_id if self.role is AgentRole.PLANNER else f"{epic_id}+{self.name}"


PLANNER = EpicAgentRole(
    AgentRole.PLANNER, "spawn_planner", "planner_started", "planner_exited", "plan", ACTOR
)
EVALUATOR = EpicAgentRole(
    AgentRole.EVALUATOR,
    "spawn_evaluator",
    "evaluator_started",
    "evaluator_exited",
    EPIC_EVALUATION_PURPOSE,
    "runner:evaluator",
)


@dataclass
class PlannerHandle:
    epic_id: str
    attempt: int
    running: RunningAgent
    token: str | None
    stop_reason: str | None = None


class EpicAgentLauncher:
    """Launches one kind of an epic's agent (see :class:`EpicAgentRole`)."""

    def __init__(
        self,
        epics: EpicService,
        config: StorylineConfig,
        agents: AgentLauncher,
        *,
        api_url: str | None,
        tokens: AgentTokens | None,
        on_exit: Callable[[str], None],
        kind: EpicAgentRole = PLANNER,
    ) -> None:
        self.epics = epics
        self.config = config
        self.agents = agents
        self.api_url = api_url
        self.tokens = tokens
        self.on_exit = on_exit
        self.kind = kind
        self.handles: Handles[PlannerHandle] = Handles()

    def running(self, epic_id: str) -> PlannerHandle | None:
        return self.handles.get(epic_id)

    def count(self) -> int:
        return len(self.handles.items())

    # ------------------------------------------------------------------ launch

    def spec_for(
        self, epic: Epic, agent: AgentConfig, cwd: Path, brief: str, attempt: int, token: str | None
    ) -> SpawnSpec:
        secrets = self.agents._agent_secrets(agent) if agent.runtime != "openai" else {}
        env = {**agent.agent_env(), **secrets}
        env.update({"STORYLINE_STORY_ID": epic.id, "STORYLINE_ATTEMPT": str(attempt)})
        if self.api_url:
            env["STORYLINE_URL"] = self.api_url
        if token:
            env["STORYLINE_TOKEN"] = token
        log_dir = self.agents.log_dir / epic.id
        name = self.kind.name
        mcp = None
        if self.api_url and agent.runtime in ("claude-code", "codex"):
            mcp = write_mcp_config(
                log_dir / f"{name}-{attempt}.mcp.json", url=self.api_url, story_id=epic.id
            )
        return SpawnSpec(
            story_id=epic.id,
            attempt=attempt,
            role=name,  # type: ignore[arg-type]
            agent=agent,
            cwd=cwd,
            base_branch=self.config.base_branch,
            story=StoryText(epic.name, brief, tuple(epic.acceptance_criteria)),
            log_path=log_dir / f"{name}-{attempt}.log",
            inactivity_timeout_secs=self.config.inactivity_timeout_secs,
            env=env,
            overall_timeout_secs=agent.max_run_secs,
            secret_names=frozenset(secrets),
            purpose=self.kind.purpose,
            mcp_config=mcp,
        )

    def launch(self, epic: Epic, agent: AgentConfig, cwd: Path, brief: str) -> bool:
        """Record and start the epic's next attempt of this agent; False if another writer
        won."""
        if self.running(epic.id) is not None:
            return False
        kind = self.kind
        attempt = kind.attempts_of(epic) + 1
        token = self.tokens.issue(epic.id, attempt, kind.role) if self.tokens else None
        try:
            spec = self.spec_for(epic, agent, cwd, brief, attempt, token)
            argv = build_argv(spec)
        except (SecretInArgvError, AgentConfigError) as exc:
            if token and self.tokens:
                self.tokens.revoke(token)
            raise AgentConfigError(f"agent {agent.name!r}: {exc}") from None
        try:
            self.epics.transition(
                epic.id,
                kind.spawn_event,
                actor=kind.actor,
                expected_version=epic.version,
                reason=(
                    f"plan the goal (attempt {attempt})"
                    if kind.role is AgentRole.PLANNER
                    else f"evaluate the integration (attempt {attempt})"
                ),
                data={
                    "agent": agent.name,
                    "runtime": agent.runtime,
                    "model": agent.model,
                    "argv": argv,
                    "log_path": str(spec.log_path),
                },
            )
        except (VersionConflict, IllegalTransition):
            if token and self.tokens:
                self.tokens.revoke(token)
            return False
        try:
            running = runtime_for(agent, strip_env=self.agents._strip_env(agent)).start(spec)
        except (AgentStartError, OSError) as exc:
            self._record_exit(epic.id, attempt, None, f"could not start the {kind.name}: {exc}")
            if token and self.tokens:
                self.tokens.revoke(token)
            self.on_exit(epic.id)
            return True
        handle = PlannerHandle(epic.id, attempt, running, token)
        self.handles.put(epic.id, handle)
        self.agents._write_pidfile(kind.pid_key(epic.id), kind.role, attempt, running.pid)
        try:
            self.epics.transition(
                epic.id,
                kind.started_event,
                actor=kind.actor,
                reason=f"{kind.name} attempt {attempt} runs as pid {running.pid or os.getpid()}",
                data={"attempt": attempt, "pid": running.pid or os.getpid()},
            )
        except DomainError:
            logger.exception("could not record the start of %s %s/%s", kind.name, epic.id, attempt)
        threading.Thread(
            target=self._watch,
            args=(handle,),
            name=f"{kind.name}-{epic.id}-{attempt}",
            daemon=True,
        ).start()
        return True

    # ------------------------------------------------------------------ exit

    def _watch(self, handle: PlannerHandle) -> None:
        result = handle.running.wait()
        reason = handle.stop_reason or result.error
        if self._record_exit(handle.epic_id, handle.attempt, result, reason):
            self.agents._remove_pidfile(self.kind.pid_key(handle.epic_id))
        if handle.token and self.tokens:
            try:
                self.tokens.revoke(handle.token)
            except Exception:
                logger.exception(
                    "could not revoke the %s token of %s", self.kind.name, handle.epic_id
                )
        self.handles.discard(handle.epic_id, handle)
        self.on_exit(handle.epic_id)

    def _record_exit(
        self, epic_id: str, attempt: int, result: AgentResult | None, reason: str | None
    ) -> bool:
        data: dict[str, object] = {"attempt": attempt, "outcome": AgentOutcome.FAILED.value}
        if result is not None:
            outcome = AgentOutcome(result.outcome)
            if result.killed_on_request and outcome is AgentOutcome.COMPLETED:
                outcome = AgentOutcome.FAILED
            data = {
                "attempt": attempt,
                "outcome": outcome.value,
                "exit_code": result.exit_code,
                "session_id": result.session_id,
                "tokens_in": result.tokens_in,
                "tokens_out": result.tokens_out,
                "cost_usd": result.cost_usd or 0.0,
                "log_path": str(result.log_path),
            }
        kind = self.kind
        if not reason:
            reason = f"{kind.name} attempt {attempt} ended: {data['outcome']}"
        return self.handles.record_exit(
            lambda: self.epics.transition(
                epic_id,
                kind.exited_event,
                actor=kind.actor,
                reason=exit_reason(reason),
                data=data,
            ),
            f"the exit of {kind.name} {epic_id}/{attempt}",
        )

    # ------------------------------------------------------------------ stop and reap

    def stop(self, epic_id: str, why: str) -> None:
        self.handles.stop(epic_id, why)

    def stop_all(self, why: str, wait_secs: float = 10.0) -> None:
        self.handles.stop_all(why, wait_secs)

    def reap_orphan(self, epic: Epic) -> None:
        """After a restart: kill what the recorded attempt left running and record it as
        lost (a planner's counts toward the plan attempts like any planner run; an
        evaluator's toward its aborts, unless it gave its verdict)."""
        kind = self.kind
        running = kind.running_of(epic)
        if running is None or self.running(epic.id) is not None:
            return
        killed = self.agents.kill_orphan(kind.pid_key(epic.id))
        detail = f"; killed orphaned process group {killed}" if killed else ""
        try:
            self.epics.transition(
                epic.id,
                kind.exited_event,
                actor=kind.actor,
                reason=f"the runner restarted while {kind.name} attempt {running['attempt']} "
                f"ran{detail}",
                data={"attempt": running["attempt"], "outcome": AgentOutcome.LOST.value},
            )
        except DomainError:
            logger.exception("could not record the lost %s of %s", kind.name, epic.id)
        if self.tokens:
            # Both of the epic's agents' tokens: neither runs any more (a planner and an
            # evaluator never run at the same time for one epic).
            self.tokens.revoke_story(epic.id)


class PlannerLauncher(EpicAgentLauncher):
    """The epic's planner launcher, holding the evaluator's beside it (``evaluator``) so
    that whoever stops the planners at shutdown stops the evaluators too."""

    def __init__(
        self,
        epics: EpicService,
        config: StorylineConfig,
        agents: AgentLauncher,
        *,
        api_url: str | None,
        tokens: AgentTokens | None,
        on_exit: Callable[[str], None],
    ) -> None:
        super().__init__(
            epics, config, agents, api_url=api_url, tokens=tokens, on_exit=on_exit, kind=PLANNER
        )
        self.evaluator = EpicAgentLauncher(
            epics, config, agents, api_url=api_url, tokens=tokens, on_exit=on_exit, kind=EVALUATOR
        )

    def stop_all(self, why: str, wait_secs: float = 10.0) -> None:
        super().stop_all(why, wait_secs)
        self.evaluator.stop_all(why, wait_secs)
