"""The ``claude-code`` / ``cli`` runtime: an agent CLI as a subprocess in its own process group.

Design points, each from a failure seen in the reference implementation or in practice:

* argv list, never a shell: story text cannot become a command.
* ``start_new_session=True``: the agent leads its own process group, so the watchdog can
  kill the agent *and* everything it started (test runners, dev servers) with one
  ``killpg``; killing only the leader leaves grandchildren running and holding the pipe.
* Activity is any byte on stdout or stderr, not a complete line, so a tool that streams a
  long line slowly is not mistaken for a hung agent.
* When the leader exits, leftovers in its group are terminated too: nothing an attempt
  started outlives it, and our pipe readers see EOF instead of hanging on a grandchild.
* Exit classification follows the reference: a process that died before announcing a
  session is ``aborted_before_session`` (respawned cold without consuming a retry); once a
  session exists a bad exit is ``failed``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

from runners.agents.argv import build_argv
from runners.agents.spawn_spec import AgentResult, AgentStartError, Outcome, SpawnSpec
from runners.agents.stream_json import StreamJsonParser

log = logging.getLogger(__name__)

StopReason = Literal["inactive", "timed_out", "killed"]

_PROC = Path("/proc")
_DRAIN_SECS = 2.0
_MAX_LINE_BYTES = 16 * 1024 * 1024
_STOP_NOTES: dict[StopReason, str] = {
    "killed": "kill requested",
    "inactive": "no output within the inactivity timeout",
    "timed_out": "overall timeout reached",
}


# --- process helpers, usable by a restarted runner on a recorded pid -----------------------


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        raw = (_PROC / str(pid) / "stat").read_bytes().decode("ascii", "replace")
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces and ')'.
    _, _, rest = raw.rpartition(")")
    fields = rest.split()
    return fields or None


def process_alive(pid: int) -> bool:
    """True if ``pid`` names a live (non-zombie) process.

    Zombies count as dead: in containers whose PID 1 does not reap orphans, a killed
    agent's children can stay zombies indefinitely, and they hold no resources.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _proc_stat(pid)
    return fields is None or fields[0] not in ("Z", "X")


def process_identity(pid: int) -> str | None:
    """A token that changes when ``pid`` is reused: its start time in clock ticks (Linux).

    Record it next to the pid so that a restarted runner never kills an unrelated process
    that happens to have inherited the number.
    """
    fields = _proc_stat(pid)
    if fields is None or len(fields) < 20:
        return None
    return fields[19]


def _group_members(pgid: int) -> list[int] | None:
    """Live (non-zombie) processes in group ``pgid``; None when /proc is unavailable."""
    if not _PROC.is_dir():
        return None
    members: list[int] = []
    try:
        entries = os.listdir(_PROC)
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        if fields is None or len(fields) < 3 or fields[0] in ("Z", "X"):
            continue
        if fields[2] == str(pgid):
            members.append(int(entry))
    return members


def group_alive(pgid: int) -> bool:
    """True while any live process remains in process group ``pgid``."""
    members = _group_members(pgid)
    if members is not None:
        return bool(members)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("no permission to signal process group %d", pgid)
        return False
    return True


def terminate_group(
    pgid: int, grace_secs: float, reap: subprocess.Popen[bytes] | None = None
) -> None:
    """SIGTERM the group, give it ``grace_secs`` to exit, then SIGKILL what is left."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_secs
    while time.monotonic() < deadline:
        if reap is not None:
            reap.poll()
        if not group_alive(pgid):
            return
        time.sleep(0.02)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if reap is not None:
            reap.poll()
        if not group_alive(pgid):
            return
        time.sleep(0.02)
    log.warning("process group %d still has live members after SIGKILL", pgid)


def kill_process_group(
    pid: int, *, grace_secs: float = 5.0, expected_identity: str | None = None
) -> bool:
    """Terminate the process group an agent was started as (``pid`` == its group id).

    For a restarted runner reconciling a recorded pid. Refuses (returns False) when the pid
    now belongs to a process that is not a group leader, or whose identity (see
    :func:`process_identity`) differs from the recorded one: the number was reused.
    Returns True when a signal was sent.
    """
    if pid <= 1:
        raise ValueError(f"refusing to kill process group {pid}")
    if process_alive(pid):
        if expected_identity is not None and process_identity(pid) != expected_identity:
            return False
        try:
            if os.getpgid(pid) != pid:
                return False
        except ProcessLookupError:
            pass
    # A dead leader's group id cannot be handed out again while members remain, so
    # signalling the group of a vanished leader reaches only its orphans.
    if not group_alive(pid):
        return False
    terminate_group(pid, grace_secs)
    return True


def agent_environment(extra: Mapping[str, str], strip: Iterable[str] = ()) -> dict[str, str]:
    """The environment an agent process gets.

    The service's own ``STORYLINE_*`` variables (database URL, admin tokens) are dropped and
    replaced by the agent-scoped ones in ``extra``; ``strip`` names further variables to drop
    (token_env names of API tokens, other agents' API keys). The agent CLI's own credentials
    (``ANTHROPIC_API_KEY``, ``HOME``) are kept: it cannot work without them.
    """
    drop = set(strip)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_") and k not in drop}
    env.update(extra)
    return env


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# --- the runtime --------------------------------------------------------------------------


class CliRuntime:
    """Starts CLI agents. One instance serves any number of concurrent attempts."""

    def __init__(
        self,
        *,
        kill_grace_secs: float = 5.0,
        strip_env: Iterable[str] = (),
        poll_interval_secs: float = 0.1,
    ) -> None:
        self.kill_grace_secs = kill_grace_secs
        self.strip_env = tuple(strip_env)
        self.poll_interval_secs = poll_interval_secs

    def start(self, spec: SpawnSpec) -> CliRunningAgent:
        argv = build_argv(spec)
        env = agent_environment(spec.env, self.strip_env)
        return CliRunningAgent(
            spec,
            argv,
            env,
            kill_grace_secs=self.kill_grace_secs,
            poll_interval_secs=self.poll_interval_secs,
        )


class _LogWriter:
    """Serialises whole lines from the stdout and stderr readers into one per-attempt log.

    Secret values are redacted on the way in: an agent that echoes its environment (a
    debugging ``env`` call, a verbose HTTP client) must not leak its token into the log.
    """

    def __init__(self, path: Path, secrets: Iterable[str] = ()) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._secrets = [s.encode() for s in secrets if s]
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        for secret in self._secrets:
            data = data.replace(secret, b"[redacted]")
        with self._lock:
            if self._file.closed:
                return
            self._file.write(data)
            self._file.flush()

    def note(self, text: str) -> None:
        self.write(f"[storyline {_now_iso()}] {text}\n".encode())

    def close(self) -> None:
        with self._lock:
            self._file.close()


class CliRunningAgent:
    """A running CLI agent attempt (see :class:`runners.agents.spawn_spec.RunningAgent`)."""

    parser_class: type[StreamJsonParser] = StreamJsonParser
    """How stdout is read: Claude Code's stream-json here, codex's events in a subclass."""

    def __init__(
        self,
        spec: SpawnSpec,
        argv: list[str],
        env: dict[str, str],
        *,
        kill_grace_secs: float,
        poll_interval_secs: float,
    ) -> None:
        self.spec = spec
        self.argv = argv
        self._kill_grace = kill_grace_secs
        self._poll = poll_interval_secs
        self._parser = self.parser_class()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Event()
        self._readers_stop = threading.Event()
        self._stop_reason: StopReason | None = None
        self._last_text_line: str | None = None
        self._kill_requested = False
        self._result: AgentResult | None = None

        if not spec.cwd.is_dir():
            raise AgentStartError(f"agent working directory {str(spec.cwd)!r} does not exist")
        self._log = _LogWriter(spec.log_path, spec.secret_values())
        self._log.note(
            f"story {spec.story_id} attempt {spec.attempt} ({spec.role}, agent "
            f"{spec.agent.name}) argv={json.dumps(argv)}"
        )
        self._started = time.monotonic()
        self._last_output = self._started
        try:
            self._proc = subprocess.Popen(
                argv,
                cwd=spec.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )
        except (OSError, ValueError) as exc:
            # ValueError: an argv element Popen refuses (NUL byte). E2BIG surfaces as OSError
            # "Argument list too long" when one element exceeds the kernel's 128 KiB limit.
            exc_text = getattr(exc, "strerror", None) or str(exc)
            self._log.note(f"could not start: {exc_text}")
            self._log.close()
            raise AgentStartError(
                f"cannot start agent {spec.agent.name!r}: {argv[0]!r}: {exc_text}"
            ) from exc
        self._log.note(f"started pid {self._proc.pid}")
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._readers = [
            threading.Thread(
                target=self._read,
                args=(self._proc.stdout, True),
                name=f"agent-{spec.story_id}-stdout",
                daemon=True,
            ),
            threading.Thread(
                target=self._read,
                args=(self._proc.stderr, False),
                name=f"agent-{spec.story_id}-stderr",
                daemon=True,
            ),
        ]
        for reader in self._readers:
            reader.start()
        self._monitor = threading.Thread(
            target=self._watch, name=f"agent-{spec.story_id}-watch", daemon=True
        )
        self._monitor.start()

    # --- RunningAgent ---------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def session_id(self) -> str | None:
        return self._parser.session_id

    @property
    def last_output_monotonic(self) -> float:
        with self._lock:
            return self._last_output

    def poll(self) -> AgentResult | None:
        return self._result if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> AgentResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"agent for story {self.spec.story_id} still running")
        assert self._result is not None
        return self._result

    def kill(self) -> None:
        """Stop the attempt and block until its whole process group is gone."""
        with self._lock:
            if not self._done.is_set():
                self._kill_requested = True
        self._wake.set()
        self._done.wait(self._kill_grace + 15.0)

    # --- threads --------------------------------------------------------------------------

    def _read(self, stream: IO[bytes], is_stdout: bool) -> None:
        fd = stream.fileno()
        # poll, not select: a busy service can hold file descriptors above FD_SETSIZE.
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        pending = b""
        drain_deadline: float | None = None
        try:
            while True:
                # A timeout, so that a pipe held open by a process that escaped the group
                # cannot pin this thread once the attempt has ended: after the stop signal,
                # whatever is buffered is drained for a bounded time, then we let go.
                if self._readers_stop.is_set():
                    if drain_deadline is None:
                        drain_deadline = time.monotonic() + _DRAIN_SECS
                    elif time.monotonic() > drain_deadline:
                        break
                if not poller.poll(200):
                    if self._readers_stop.is_set():
                        break
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                with self._lock:
                    self._last_output = time.monotonic()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line + b"\n", is_stdout)
                if len(pending) > _MAX_LINE_BYTES:
                    # Keep it in the log; the parser skips the fragments as garbage.
                    self._line(pending + b"\n", is_stdout)
                    pending = b""
        except (OSError, ValueError) as exc:
            log.warning("reading agent output failed: %s", exc)
        finally:
            if pending:
                self._line(pending + b"\n", is_stdout)
            with contextlib.suppress(OSError):
                stream.close()

    def _line(self, line: bytes, is_stdout: bool) -> None:
        self._log.write(line)
        event = self._parser.feed(line) if is_stdout else None
        if event is not None and event.get("subtype") == "api_retry":
            # The CLI announces its back-off and then waits on the provider in silence: it
            # is alive for that long (plus the usual timeout once it tries again).
            delay = event.get("retry_delay_ms")
            if isinstance(delay, (int, float)) and not isinstance(delay, bool) and delay > 0:
                with self._lock:
                    self._last_output = max(self._last_output, time.monotonic() + delay / 1000)
        if event is None:
            # A plain line (stderr, or stdout that is not stream-json) is what a CLI that
            # refuses to start prints: the last one goes into the exit reason.
            text = line.decode("utf-8", "replace").strip()
            if text:
                with self._lock:
                    self._last_text_line = text

    def _watch(self) -> None:
        error: str | None = None
        try:
            self._supervise()
        except Exception as exc:  # the waiter must never hang on a crashed monitor
            log.exception("agent monitor for story %s failed", self.spec.story_id)
            error = f"monitor failed: {exc}"
            with contextlib.suppress(Exception):
                terminate_group(self._proc.pid, self._kill_grace, reap=self._proc)
        finally:
            self._readers_stop.set()
            for reader in self._readers:
                reader.join(timeout=10.0)
            self._proc.poll()
            self._result = self._classify(error)
            self._log.note(
                f"exit outcome={self._result.outcome} exit_code={self._result.exit_code} "
                f"signal={self._result.signal} session={self._result.session_id}"
            )
            self._log.close()
            self._done.set()

    def _supervise(self) -> None:
        spec = self.spec
        while self._proc.poll() is None:
            now = time.monotonic()
            with self._lock:
                idle = now - self._last_output
                kill_requested = self._kill_requested
            reason: StopReason | None = None
            if kill_requested:
                reason = "killed"
            elif idle >= spec.inactivity_timeout_secs:
                reason = "inactive"
            elif (
                spec.overall_timeout_secs is not None
                and now - self._started >= spec.overall_timeout_secs
            ):
                reason = "timed_out"
            if reason is not None:
                with self._lock:
                    self._stop_reason = reason
                self._log.note(f"{_STOP_NOTES[reason]} (idle {idle:.1f}s); terminating the group")
                terminate_group(self._proc.pid, self._kill_grace, reap=self._proc)
                self._proc.wait()
                break
            self._wake.wait(self._poll)
            self._wake.clear()
        # The leader is gone; anything it left behind in its group goes too, so no attempt
        # outlives itself and the pipe readers reach EOF.
        if group_alive(self._proc.pid):
            self._log.note("terminating processes the agent left running")
            terminate_group(self._proc.pid, self._kill_grace)

    def _redact(self, text: str) -> str:
        for secret in self.spec.secret_values():
            text = text.replace(secret, "[redacted]")
        return text

    def _last_line(self) -> str | None:
        with self._lock:
            line = self._last_text_line
        return _clip(self._redact(line), _LAST_LINE_CHARS) if line else None

    def _classify(self, error: str | None = None) -> AgentResult:
        rc = self._proc.returncode
        exit_code = rc if rc is not None and rc >= 0 else None
        sig = -rc if rc is not None and rc < 0 else None
        parser = self._parser
        session = parser.session_id
        with self._lock:
            reason = self._stop_reason
        how = f"signal {sig}" if sig is not None else f"exit code {rc}"
        denials = tuple(self._redact(d) for d in describe_denials(parser.permission_denials))
        result_text = parser.result_text
        said = self._redact(result_text) if result_text else None
        outcome: Outcome
        if reason == "inactive":
            outcome = "inactive"
            error = error or (
                f"no output for {self.spec.inactivity_timeout_secs:g}s; process group killed"
            )
        elif reason == "timed_out":
            outcome = "timed_out"
            error = error or (
                f"the run reached its wall-clock cap of {self.spec.overall_timeout_secs:g}s "
                "(max_run_secs); process group killed"
            )
        elif reason == "killed":
            # A deliberate stop is not a crash: it must not trigger the cold-respawn path.
            outcome = "failed"
            error = error or "killed on request"
        elif error is not None:
            outcome = "failed" if session else "aborted_before_session"
        elif parser.saw_result:
            outcome, error = self._classify_result(rc, how, denials, said)
        elif rc != 0:
            last = self._last_line()
            detail = f": {last}" if last else ""
            if session is None:
                outcome = "aborted_before_session"
                error = f"agent died before starting a session ({how}){detail}"
            elif parser.api_retries:
                outcome = "provider_unavailable"
                error = (
                    f"the model provider kept failing (HTTP {parser.api_error_status}, "
                    f"{parser.api_retries} retries) and the agent exited with {how}{detail}"
                )
            else:
                outcome = "failed"
                error = f"agent exited with {how}{detail}"
        else:
            outcome = "completed"
        usage = parser.usage
        return AgentResult(
            outcome=outcome,
            exit_code=exit_code,
            signal=sig,
            session_id=session,
            turns=parser.turns,
            tokens_in=usage.tokens_in,
            tokens_out=usage.tokens_out,
            cost_usd=parser.cost_usd,
            result_subtype=parser.result_subtype,
            log_path=self.spec.log_path,
            duration_secs=time.monotonic() - self._started,
            error=error,
            killed_on_request=reason == "killed",
            model=parser.model,
            is_error=parser.result_is_error if parser.saw_result else None,
            result_text=_clip(said, _RESULT_TEXT_CHARS) if said else None,
            stop_reason=parser.stop_reason,
            duration_ms=parser.duration_ms,
            permission_denials=denials,
            model_usage=parser.model_usage,
            api_error_status=parser.api_error_status,
            api_retries=parser.api_retries,
        )

    def _classify_result(
        self, rc: int | None, how: str, denials: tuple[str, ...], said: str | None
    ) -> tuple[Outcome, str | None]:
        """The outcome of a run that printed its result line, from what the CLI reported."""
        parser = self._parser
        subtype = parser.result_subtype or ""
        terminal = parser.terminal_reason or ""
        errors = "; ".join(self._redact(e) for e in parser.errors)[:_LAST_LINE_CHARS]
        if subtype == "error_max_turns" or terminal == "max_turns":
            return "max_turns", (
                f"the agent stopped at its turn cap before finishing ({errors or subtype}); "
                "the next attempt starts a new session"
            )
        if subtype == "error_max_budget_usd" or terminal == "budget_exhausted":
            return "max_budget", (
                f"the agent stopped at its spending cap ({errors or subtype}, "
                f"${parser.cost_usd or 0:g} spent)"
            )
        status = parser.api_error_status
        if parser.result_is_error and (terminal == "api_error" or status is not None):
            if status is None or status in _PROVIDER_STATUSES or status >= 500:
                return "provider_unavailable", (
                    f"the model provider is unavailable (HTTP {status}, "
                    f"{parser.api_retries} retries): {_clip(said or errors, _LAST_LINE_CHARS)}"
                )
            return "failed", f"the model API refused the request (HTTP {status}): {said}"
        if parser.result_is_error:
            detail = errors or _clip(said or "", _LAST_LINE_CHARS)
            return "failed", f"agent reported {subtype or 'an error'}" + (
                f": {detail}" if detail else ""
            )
        if rc != 0:
            last = self._last_line()
            return "failed", f"agent reported success but exited with {how}" + (
                f": {last}" if last else ""
            )
        if denials:
            listed = "; ".join(denials[:5])
            more = f" (and {len(denials) - 5} more)" if len(denials) > 5 else ""
            return "permission_denied", (
                f"the agent's CLI refused {len(denials)} tool call(s) under its permission "
                f"rules: {listed}{more}. Allow them in the agent's args (--allowedTools) "
                "or its allowed_tools"
            )
        return "completed", None


_LAST_LINE_CHARS = 500
_RESULT_TEXT_CHARS = 2_000
_DENIAL_CHARS = 300
_PROVIDER_STATUSES = frozenset({408, 429, 529})


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def describe_denials(raw: Iterable[Mapping[str, object]]) -> list[str]:
    """``Tool: input`` for each refused tool call (a Bash call shows its command)."""
    out: list[str] = []
    for denial in list(raw)[:20]:
        tool = str(denial.get("tool_name") or "tool")
        tool_input = denial.get("tool_input")
        if isinstance(tool_input, dict) and isinstance(tool_input.get("command"), str):
            shown = tool_input["command"]
        elif isinstance(tool_input, dict) and isinstance(tool_input.get("file_path"), str):
            shown = tool_input["file_path"]
        elif isinstance(tool_input, str):
            shown = tool_input
        else:
            shown = json.dumps(tool_input, ensure_ascii=False, default=str)
        out.append(_clip(f"{tool}: {shown}", _DENIAL_CHARS))
    return out
