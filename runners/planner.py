"""Starting, watching and reaping an epic's planner agent, each step an epic event.

The order is the story launcher's (``runners.launcher``): ``spawn_planner`` is recorded with
the epic's expected version before the process starts (two runners can never start the same
attempt), ``planner_started`` with the pid after, ``planner_exited`` when it ends. The
planner reports its plan itself, through the API (``submit_plan``), while it runs; its exit
only closes the attempt. The agent machinery (runtimes, argv, secrets, pid files) is the
story launcher's, so a planner runs exactly like a coder would.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
from runners.agents.mcp_config import write_mcp_config
from runners.handles import Handles, exit_reason
from runners.launcher import AgentConfigError, AgentLauncher
from service.agent_tokens import AgentTokens
from service.epics import EpicService

logger = logging.getLogger(__name__)

ACTOR = "runner:planner"


@dataclass
class PlannerHandle:
    epic_id: str
    attempt: int
    running: RunningAgent
    token: str | None
    stop_reason: str | None = None


class PlannerLauncher:
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
        self.epics = epics
        self.config = config
        self.agents = agents
        self.api_url = api_url
        self.tokens = tokens
        self.on_exit = on_exit
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
        mcp = None
        if self.api_url and agent.runtime in ("claude-code", "codex"):
            mcp = write_mcp_config(
                log_dir / f"planner-{attempt}.mcp.json", url=self.api_url, story_id=epic.id
            )
        return SpawnSpec(
            story_id=epic.id,
            attempt=attempt,
            role="planner",
            agent=agent,
            cwd=cwd,
            base_branch=self.config.base_branch,
            story=StoryText(epic.name, brief, tuple(epic.acceptance_criteria)),
            log_path=log_dir / f"planner-{attempt}.log",
            inactivity_timeout_secs=self.config.inactivity_timeout_secs,
            env=env,
            overall_timeout_secs=agent.max_run_secs,
            secret_names=frozenset(secrets),
            purpose="plan",
            mcp_config=mcp,
        )

    def launch(self, epic: Epic, agent: AgentConfig, cwd: Path, brief: str) -> bool:
        """Record and start the epic's next planner attempt; False if another writer won."""
        if self.running(epic.id) is not None:
            return False
        attempt = epic.planner_attempts + 1
        token = self.tokens.issue(epic.id, attempt, AgentRole.PLANNER) if self.tokens else None
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
                "spawn_planner",
                actor=ACTOR,
                expected_version=epic.version,
                reason=f"plan the goal (attempt {attempt})",
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
            self._record_exit(epic.id, attempt, None, f"could not start the planner: {exc}")
            if token and self.tokens:
                self.tokens.revoke(token)
            self.on_exit(epic.id)
            return True
        handle = PlannerHandle(epic.id, attempt, running, token)
        self.handles.put(epic.id, handle)
        self.agents._write_pidfile(epic.id, AgentRole.PLANNER, attempt, running.pid)
        try:
            self.epics.transition(
                epic.id,
                "planner_started",
                actor=ACTOR,
                reason=f"planner attempt {attempt} runs as pid {running.pid or os.getpid()}",
                data={"attempt": attempt, "pid": running.pid or os.getpid()},
            )
        except DomainError:
            logger.exception("could not record the start of planner %s/%s", epic.id, attempt)
        threading.Thread(
            target=self._watch, args=(handle,), name=f"planner-{epic.id}-{attempt}", daemon=True
        ).start()
        return True

    # ------------------------------------------------------------------ exit

    def _watch(self, handle: PlannerHandle) -> None:
        result = handle.running.wait()
        reason = handle.stop_reason or result.error
        if self._record_exit(handle.epic_id, handle.attempt, result, reason):
            self.agents._remove_pidfile(handle.epic_id)
        if handle.token and self.tokens:
            try:
                self.tokens.revoke(handle.token)
            except Exception:
                logger.exception("could not revoke the planner token of %s", handle.epic_id)
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
        if not reason:
            reason = f"planner attempt {attempt} ended: {data['outcome']}"
        return self.handles.record_exit(
            lambda: self.epics.transition(
                epic_id,
                "planner_exited",
                actor=ACTOR,
                reason=exit_reason(reason),
                data=data,
            ),
            f"the exit of planner {epic_id}/{attempt}",
        )

    # ------------------------------------------------------------------ stop and reap

    def stop(self, epic_id: str, why: str) -> None:
        self.handles.stop(epic_id, why)

    def stop_all(self, why: str, wait_secs: float = 10.0) -> None:
        self.handles.stop_all(why, wait_secs)

    def reap_orphan(self, epic: Epic) -> None:
        """After a restart: kill what the recorded planner attempt left running and record
        the attempt as lost (it counts toward the plan attempts like any planner run)."""
        running = epic.running_planner
        if running is None or self.running(epic.id) is not None:
            return
        killed = self.agents.kill_orphan(epic.id)
        detail = f"; killed orphaned process group {killed}" if killed else ""
        try:
            self.epics.transition(
                epic.id,
                "planner_exited",
                actor=ACTOR,
                reason=f"the runner restarted while planner attempt {running['attempt']} "
                f"ran{detail}",
                data={"attempt": running["attempt"], "outcome": AgentOutcome.LOST.value},
            )
        except DomainError:
            logger.exception("could not record the lost planner of %s", epic.id)
        if self.tokens:
            self.tokens.revoke_story(epic.id)
