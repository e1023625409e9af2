"""Starting, watching and stopping agent attempts, each side effect recorded as an event.

The order is what makes restarts safe: ``spawn_agent`` is recorded (with optimistic
concurrency, so two runners can never record the same attempt) before the process starts;
``agent_started`` with the pid after; ``agent_exited`` when it ends. A pid file written right
after the start lets a restarted runner find and kill an agent whose start was never
recorded.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from domain.config import AgentConfig, StorylineConfig
from domain.errors import DomainError, IllegalTransition, VersionConflict
from domain.stages import AgentOutcome, AgentRole
from domain.story import Story
from runners.agents import (
    AgentResult,
    AgentStartError,
    RunningAgent,
    SecretInArgvError,
    SpawnSpec,
    StoryText,
    build_argv,
    group_alive,
    kill_process_group,
    process_identity,
    runtime_for,
)
from runners.agents.mcp_config import write_mcp_config
from runners.agents.spawn_spec import ReviewFailure
from runners.handles import Handles, exit_reason
from service.agent_tokens import AgentTokens
from service.application import StorylineApplication

logger = logging.getLogger(__name__)


NO_VERDICT = "the evaluator exited without submitting a verdict"
_VERDICT_EXPECTED = frozenset({AgentOutcome.COMPLETED.value, AgentOutcome.PERMISSION_DENIED.value})
"""Outcomes of an evaluator that ran to its end: without a verdict they are a failed run
(counted toward ``[review] max_failed_runs``), not a success."""


class AgentConfigError(Exception):
    """The agent's configuration cannot be used for this spawn (the message says why)."""


@dataclass
class Handle:
    story_id: str
    role: AgentRole
    attempt: int
    running: RunningAgent
    token: str | None
    stop_reason: str | None = None


@dataclass(frozen=True)
class LaunchRequest:
    story: Story
    role: AgentRole
    agent: AgentConfig
    cwd: Path
    purpose: str
    conflict_details: str | None = None
    uncommitted_paths: tuple[str, ...] = ()
    review_diff: str | None = None
    """For an evaluator: the diff it judges (see ``runners.reviewer``)."""
    review_commit: str | None = None


class AgentLauncher:
    def __init__(
        self,
        app: StorylineApplication,
        config: StorylineConfig,
        project: Path,
        *,
        api_url: str | None,
        tokens: AgentTokens | None,
        on_exit: Callable[[str, AgentRole, AgentResult | None], None],
    ) -> None:
        self.app = app
        self.config = config
        self.project = project
        self.api_url = api_url
        self.tokens = tokens
        self.on_exit = on_exit
        self.handles: Handles[Handle] = Handles()
        self._launch_lock = threading.Lock()
        self.run_dir = project / ".storyline" / "run"
        self.log_dir = project / ".storyline" / "logs"
        self.extra_env: dict[str, str] = {}
        """Set for every agent (a worker runner's id, as STORYLINE_WORKER)."""
        self.spawn_veto: Callable[[Story], str | None] | None = None
        """Why no agent may start for a story now (its epic is blocked), or None."""

    # ------------------------------------------------------------------ queries

    def running(self, story_id: str) -> Handle | None:
        return self.handles.get(story_id)

    def count(self, role: AgentRole) -> int:
        return len(self.handles.items(lambda h: h.role is role))

    def describe(self) -> list[str]:
        """One phrase per running agent, for a person waiting on a shutdown."""
        handles = [h for _sid, h in self.handles.items()]
        return [
            f"story {h.story_id} ({h.role.value}, attempt {h.attempt}, pid {h.running.pid})"
            for h in handles
        ]

    def stories(self, role: AgentRole) -> list[str]:
        return [sid for sid, _h in self.handles.items(lambda h: h.role is role)]

    # ------------------------------------------------------------------ launch

    def _project_prompt(self) -> str | None:
        path = (self.project / self.config.prompt_file).resolve()
        if not path.is_relative_to(self.project) or not path.is_file():
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            logger.warning("cannot read project prompt file %s", path)
            return None
        return text if text.strip() else None

    def _agent_secrets(self, agent: AgentConfig) -> dict[str, str]:
        """The agent's declared secrets, read from the server's environment now."""
        values: dict[str, str] = {}
        for name, source in agent.agent_secrets().items():
            value = os.environ.get(source)
            if not value:
                raise AgentConfigError(
                    f"agent {agent.name!r}: secret {name} comes from the server's variable "
                    f"{source}, which is not set"
                )
            values[name] = value
        return values

    def spec_for(self, req: LaunchRequest, attempt: int, token: str | None) -> SpawnSpec:
        story = req.story
        secrets = self._agent_secrets(req.agent) if req.agent.runtime != "openai" else {}
        env = {**req.agent.agent_env(), **secrets}
        env.update(self.extra_env)
        env.update({"STORYLINE_STORY_ID": story.id, "STORYLINE_ATTEMPT": str(attempt)})
        if self.api_url:
            env["STORYLINE_URL"] = self.api_url
        if token:
            env["STORYLINE_TOKEN"] = token
        coder = req.role is AgentRole.CODER
        evaluator = req.role is AgentRole.EVALUATOR
        inject = coder and (story.retry_count > 0 or story.fixup_pending)
        review_failure = self._review_failure(story) if coder else None
        if review_failure is not None and story.last_gate_output is not None:
            # Gates that failed before the review are old news: the gates passed since.
            inject = inject and self._gates_failed_since_review(story)
        mcp = None
        if self.api_url and req.agent.runtime in ("claude-code", "codex"):
            mcp = write_mcp_config(
                self.log_dir / story.id / f"{req.role.value}-{attempt}.mcp.json",
                url=self.api_url,
                story_id=story.id,
            )
        return SpawnSpec(
            story_id=story.id,
            attempt=attempt,
            role=req.role.value,  # type: ignore[arg-type]
            agent=req.agent,
            cwd=req.cwd,
            base_branch=story.target_branch or self.config.base_branch,
            story=StoryText(story.name, story.description, tuple(story.acceptance_criteria)),
            log_path=self.log_dir / story.id / f"{req.role.value}-{attempt}.log",
            inactivity_timeout_secs=self.config.inactivity_timeout_secs,
            epic_context=self.config.epics.get(story.epic) if story.epic else None,
            project_prompt=self._project_prompt() if coder else None,
            gate_failure=story.last_gate_output if inject else None,
            fixup_pending=coder and story.fixup_pending,
            fixup_caps=self.config.fixup,
            # An evaluator always starts cold: a resumed one would judge from memories of
            # an earlier commit and an earlier diff.
            resume_session_id=None if evaluator else story.sessions.get(req.role.value),
            conflict_details=req.conflict_details,
            env=env,
            overall_timeout_secs=req.agent.max_run_secs,
            secret_names=frozenset(secrets),
            purpose=req.purpose,
            uncommitted_paths=req.uncommitted_paths,
            conflicts=tuple(story.conflicts) if not coder else (),
            gate_commands=tuple(
                tuple(argv)
                for argv in [*self.config.gates.commands, *self.config.merge_gates.commands]
            ),
            mcp_config=mcp,
            review_failure=review_failure,
            review_diff=req.review_diff if evaluator else None,
            review_commit=req.review_commit if evaluator else None,
        )

    @staticmethod
    def _review_failure(story: Story) -> ReviewFailure | None:
        """The verdict that sent the story back, while the story is still being redone for
        it (``last_review_failure`` is cleared when a later review passes). Also after a
        person unblocks a story whose review retries ran out: the retries start again, but
        what the review found is still what the coder has to fix."""
        if story.last_review_failure is None:
            return None
        return ReviewFailure.from_story(story.last_review_failure)

    def _gates_failed_since_review(self, story: Story) -> bool:
        """Whether the story's last gate failure came after its last review failure."""
        for event in reversed(self.app.history(story.id)):
            if event.type == "GatesFailed":
                return True
            if event.type == "ReviewFailed":
                return False
        return True

    def launch(self, req: LaunchRequest, *, limit: int) -> bool:
        """Record and start one attempt if fewer than ``limit`` agents of its role run.

        False when no slot is free or another writer moved the story first. The slot check
        and the start happen under one lock, so two stories can never both take the last
        free slot.
        """
        with self._launch_lock:
            if self.running(req.story.id) is not None or self.count(req.role) >= limit:
                return False
            veto = self.spawn_veto(req.story) if self.spawn_veto is not None else None
            if veto is not None:
                logger.info("no agent for story %s: %s", req.story.id, veto)
                return False
            return self._launch(req)

    def _launch(self, req: LaunchRequest) -> bool:
        story = req.story
        role = req.role
        attempt = {
            AgentRole.CODER: story.coder_attempts,
            AgentRole.EVALUATOR: story.evaluator_attempts,
        }.get(role, story.mergemaster_attempts) + 1
        token = self.tokens.issue(story.id, attempt, role) if self.tokens else None
        try:
            spec = self.spec_for(req, attempt, token)
            argv = build_argv(spec)
        except SecretInArgvError as exc:
            # Refuse rather than leak: the configured args would carry a secret into argv.
            if token and self.tokens:
                self.tokens.revoke(token)
            raise AgentConfigError(f"agent {req.agent.name!r}: {exc}") from None
        except AgentConfigError:
            if token and self.tokens:
                self.tokens.revoke(token)
            raise
        try:
            self.app.transition(
                story.id,
                "spawn_agent",
                actor=f"runner:{role.value}",
                expected_version=story.version,
                reason=f"{req.purpose} (attempt {attempt})",
                data={
                    "role": role.value,
                    "agent": req.agent.name,
                    "runtime": req.agent.runtime,
                    "model": req.agent.model,
                    "purpose": req.purpose,
                    "resume_session_id": spec.resume_session_id,
                    "argv": argv,
                    "log_path": str(spec.log_path),
                },
            )
        except (VersionConflict, IllegalTransition):
            if token and self.tokens:
                self.tokens.revoke(token)
            return False
        try:
            running = runtime_for(req.agent, strip_env=self._strip_env(req.agent)).start(spec)
        except (AgentStartError, OSError) as exc:
            self._record_exit(story.id, role, attempt, None, f"could not start the agent: {exc}")
            if token and self.tokens:
                self.tokens.revoke(token)
            self.on_exit(story.id, role, None)
            return True
        handle = Handle(story.id, role, attempt, running, token)
        self.handles.put(story.id, handle)
        pid = running.pid or os.getpid()
        self._write_pidfile(story.id, role, attempt, running.pid)
        try:
            self.app.transition(
                story.id,
                "agent_started",
                actor=f"runner:{role.value}",
                data={"role": role.value, "attempt": attempt, "pid": pid},
            )
        except DomainError:
            logger.exception("could not record the start of %s attempt %s", story.id, attempt)
        threading.Thread(
            target=self._watch, args=(handle,), name=f"agent-{story.id}-{attempt}", daemon=True
        ).start()
        return True

    def _strip_env(self, agent: AgentConfig) -> tuple[str, ...]:
        """Variables an agent must not inherit: API token sources and other agents' keys
        and secrets. Its own declared ones are kept: a claude-code agent whose
        ``api_key_env`` is ``ANTHROPIC_API_KEY`` must not lose its own key."""
        names = {t.token_env for t in self.config.server.tokens if t.token_env}
        for other in self.config.agent:
            if other.api_key_env:
                names.add(other.api_key_env)
            names.update(other.agent_secrets().values())
        own = set(agent.agent_secrets()) | set(agent.agent_secrets().values())
        return tuple(sorted(names - own))

    # ------------------------------------------------------------------ exit

    def _watch(self, handle: Handle) -> None:
        result = handle.running.wait()
        reason = handle.stop_reason or result.error
        if self._record_exit(handle.story_id, handle.role, handle.attempt, result, reason):
            # Unrecorded (the database stayed away until shutdown), the pid file stays: the
            # next runner finds the attempt and records how it ended.
            self._remove_pidfile(handle.story_id)
        if handle.token and self.tokens:
            try:
                self.tokens.revoke(handle.token)
            except Exception:
                logger.exception("could not revoke the agent token of %s", handle.story_id)
        self.handles.discard(handle.story_id, handle)
        self.on_exit(handle.story_id, handle.role, result)

    def _record_exit(
        self,
        story_id: str,
        role: AgentRole,
        attempt: int,
        result: AgentResult | None,
        reason: str | None,
    ) -> bool:
        """Record the attempt's exit; False if it could not be (see :meth:`_watch`).

        A database outage is waited out: an exit left unrecorded would leave the story
        "running" in this process until it restarts."""
        if result is None:
            data: dict[str, object] = {
                "role": role.value,
                "attempt": attempt,
                "outcome": AgentOutcome.FAILED.value,
            }
        else:
            outcome = AgentOutcome(result.outcome)
            if result.killed_on_request and outcome is AgentOutcome.COMPLETED:
                outcome = AgentOutcome.FAILED
            data = {
                "role": role.value,
                "attempt": attempt,
                "outcome": outcome.value,
                "exit_code": result.exit_code,
                "signal": result.signal,
                "session_id": result.session_id,
                "turns": result.turns or 0,
                "tokens_in": result.tokens_in,
                "tokens_out": result.tokens_out,
                "cost_usd": result.cost_usd or 0.0,
                "log_path": str(result.log_path),
                "model": result.model,
                "result_subtype": result.result_subtype,
                "is_error": result.is_error,
                "result_text": result.result_text,
                "stop_reason": result.stop_reason,
                "duration_ms": result.duration_ms,
                "permission_denials": list(result.permission_denials),
                "model_usage": {k: dict(v) for k, v in result.model_usage.items()},
                "api_error_status": result.api_error_status,
                "api_retries": result.api_retries,
            }

        def record() -> object:
            said, sent = reason, data
            # Read at record time (and again on a retry): the verdict may have been
            # committed an instant before the exit.
            if (
                role is AgentRole.EVALUATOR
                and sent["outcome"] in _VERDICT_EXPECTED
                and self.app.get_story(story_id).pending_review != attempt
            ):
                said = NO_VERDICT + (f" ({reason})" if reason else "")
                sent = {**data, "outcome": AgentOutcome.FAILED.value}
            return self.app.transition(
                story_id,
                "agent_exited",
                actor=f"runner:{role.value}",
                reason=exit_reason(said),
                data=sent,
            )

        return self.handles.record_exit(record, f"the exit of {story_id} attempt {attempt}")

    # ------------------------------------------------------------------ stop

    def stop(self, story_id: str, why: str) -> None:
        """Kill the story's agent (its whole process group); its exit is recorded as usual."""
        self.handles.stop(story_id, why)

    def stop_all(self, why: str, wait_secs: float = 10.0) -> None:
        self.handles.stop_all(why, wait_secs)

    # ------------------------------------------------------------------ orphans

    def _pidfile(self, story_id: str) -> Path:
        return self.run_dir / f"{story_id}.pid"

    def _write_pidfile(self, story_id: str, role: AgentRole, attempt: int, pid: int | None) -> None:
        if pid is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        identity = process_identity(pid) or "-"
        self._pidfile(story_id).write_text(
            f"{pid} {role.value} {attempt} {identity}\n", encoding="utf-8"
        )

    def _remove_pidfile(self, story_id: str) -> None:
        self._pidfile(story_id).unlink(missing_ok=True)

    def kill_orphan(self, key: str) -> list[int]:
        """Kill the process group the pid file ``key`` names, if it is still the one we
        started; remove the file. Returns the pids killed.

        Only the pid file names a process we started (with its start-time identity, so a
        reused pid is never killed); the pid in an event may be the runner's own."""
        killed: list[int] = []
        pidfile = self._pidfile(key)
        if pidfile.exists():
            try:
                fields = pidfile.read_text(encoding="utf-8").split()
                pid = int(fields[0])
                identity = fields[3] if len(fields) > 3 and fields[3] != "-" else None
            except (ValueError, IndexError, OSError):
                pid, identity = 0, None
            alive = pid > 1 and pid != os.getpid() and group_alive(pid)
            if alive and kill_process_group(pid, expected_identity=identity):
                killed.append(pid)
        self._remove_pidfile(key)
        return killed

    def reap_orphan(self, story: Story, why: str | None = None) -> None:
        """After a restart: kill whatever this story's recorded attempt left running and
        record that attempt as lost, so the normal crash rules take over."""
        running = story.running_agent
        if running is None or self.running(story.id) is not None:
            return
        killed = self.kill_orphan(story.id)
        role = AgentRole(running["role"])
        detail = f"; killed orphaned process group {killed}" if killed else ""
        try:
            self.app.transition(
                story.id,
                "agent_exited",
                actor=f"runner:{role.value}",
                reason=(why or f"the runner restarted while attempt {running['attempt']} ran")
                + detail,
                data={
                    "role": role.value,
                    "attempt": running["attempt"],
                    "outcome": AgentOutcome.LOST.value,
                },
            )
        except DomainError:
            logger.exception("could not record lost attempt of %s", story.id)
        if self.tokens:
            self.tokens.revoke_story(story.id)
