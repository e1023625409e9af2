"""Server-owned quality gates: run the configured commands in a directory, capture output.

Each command runs as an argv list (never through a shell) in its own process group, so a
timeout kills everything it started. The output is kept whole; the prompt gets the tail.
:func:`run_command` runs one command and says how it went; :func:`run_gates` runs a list
and stops at the first failure (``results`` keeps each command's own part). The flaky-gate
policy (``runners.gate_verdicts``) runs commands one at a time to record each verdict.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from domain.config import GatesConfig
from runners.agents.spawn_spec import is_secret_name

MAX_GATE_OUTPUT = 2_000_000


@dataclass(frozen=True)
class CommandResult:
    """One gate command's run: ``output`` is its own part of the gate output (the command
    line, what it printed, and how it ended)."""

    argv: tuple[str, ...]
    passed: bool
    output: str

    @property
    def gate(self) -> str:
        """The gate's name: its command line as a shell would read it."""
        return shlex.join(self.argv)


@dataclass(frozen=True)
class GateRun:
    passed: bool
    output: str
    failed_command: str | None = None
    results: tuple[CommandResult, ...] = ()
    """Each command that ran, in order (the last one failed when ``passed`` is false)."""


def _gate_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    # Gates run project code: keep storyline's own secrets out of their environment.
    env = {k: v for k, v in os.environ.items() if not is_secret_name(k)}
    env.update(extra or {})
    return env


def gate_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a gate command runs with (the verdict fingerprint hashes it)."""
    return _gate_env(extra)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def kill_leftover(pidfile: Path) -> bool:
    """Kill the gate process group a crashed runner left behind (named in ``pidfile``)."""
    from runners.agents import kill_process_group

    if not pidfile.exists():
        return False
    try:
        fields = pidfile.read_text(encoding="utf-8").split()
        pid, identity = int(fields[0]), (fields[1] if len(fields) > 1 else None)
    except (OSError, ValueError, IndexError):
        pidfile.unlink(missing_ok=True)
        return False
    killed = pid > 1 and kill_process_group(pid, grace_secs=1.0, expected_identity=identity)
    pidfile.unlink(missing_ok=True)
    return killed


def run_command(
    argv: Sequence[str],
    cwd: Path,
    *,
    timeout_secs: float,
    env: Mapping[str, str] | None = None,
    pidfile: Path | None = None,
) -> CommandResult:
    """Run one gate command; with ``pidfile``, its pid is written there while it runs."""
    from runners.agents import process_identity

    shown = shlex.join(argv)
    parts = [f"$ {shown}"]
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_gate_env(env),
            start_new_session=True,
        )
    except OSError as exc:
        parts.append(f"cannot run {argv[0]!r}: {exc.strerror or exc}")
        return CommandResult(tuple(argv), False, "\n".join(parts))
    if pidfile is not None:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{proc.pid} {process_identity(proc.pid) or '-'}\n")
    try:
        out, _ = proc.communicate(timeout=timeout_secs)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        parts.append(out.decode("utf-8", "replace"))
        parts.append(f"[timed out after {timeout_secs:g}s; process group killed]")
        return CommandResult(tuple(argv), False, _cap("\n".join(parts)))
    finally:
        # Anything the gate left running in its group goes with it.
        _kill_group(proc)
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)
    parts.append(out.decode("utf-8", "replace").rstrip("\n"))
    parts.append(f"[exit {proc.returncode} after {time.monotonic() - started:.1f}s]")
    return CommandResult(tuple(argv), proc.returncode == 0, _cap("\n".join(parts)))


def run_gates(
    commands: Sequence[Sequence[str]],
    cwd: Path,
    *,
    timeout_secs: float,
    env: Mapping[str, str] | None = None,
    pidfile: Path | None = None,
) -> GateRun:
    """Run ``commands`` in order, stopping at the first failure.

    With ``pidfile``, a gate left running by a previous (crashed) run is killed first, and
    each command's pid is written there while it runs.
    """
    if pidfile is not None:
        kill_leftover(pidfile)
        pidfile.parent.mkdir(parents=True, exist_ok=True)
    if not commands:
        return GateRun(passed=True, output="(no gate commands configured)")
    results: list[CommandResult] = []
    for argv in commands:
        result = run_command(argv, cwd, timeout_secs=timeout_secs, env=env, pidfile=pidfile)
        results.append(result)
        if not result.passed:
            return gate_run(results, failed_command=result.gate)
    return gate_run(results)


def gate_run(
    results: Sequence[CommandResult], *, failed_command: str | None = None, notes: str = ""
) -> GateRun:
    """The verdict of a sequence of command runs: passed unless ``failed_command``."""
    text = "\n".join([*(r.output for r in results), *([notes] if notes else [])])
    return GateRun(failed_command is None, _cap(text), failed_command, tuple(results))


def story_gate_pidfile(project: Path, story_id: str) -> Path:
    """Where the pid of a story's running gate command is kept (a crash leaves it)."""
    return project / ".storyline" / "run" / f"gate-{story_id}.pid"


def run_story_gates(gates: GatesConfig, cwd: Path, project: Path, story_id: str) -> GateRun:
    """Run a story's gates in ``cwd``, tracked by the story's gate pid file."""
    return run_gates(
        gates.commands,
        cwd,
        timeout_secs=gates.timeout_secs,
        pidfile=story_gate_pidfile(project, story_id),
    )


def _cap(text: str) -> str:
    return text if len(text) <= MAX_GATE_OUTPUT else text[-MAX_GATE_OUTPUT:]
