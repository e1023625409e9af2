"""Flaky gates from history: every gate command's verdict on a committed tree is recorded,
remembered and compared, and the ``[gates] flaky`` policy decides what a difference means.

A verdict's key is ``(tree, gate, fingerprint)``: the tree the gate judged (``git rev-parse
HEAD^{tree}`` where it ran; the gates judge committed work, and a story's worktree is
refused when dirty), the command line, and a hash of the command and of the environment it
ran with (:func:`fingerprint`). A deterministic gate gives the same verdict every time on
one key; two verdicts that differ on one key make the gate flaky. A failure that repeats
is never called flaky, however often it is rerun.

Policies (per phase: ``[gates]`` and ``[merge_gates]`` each have their own):

- ``off``: verdicts and detected flakiness are recorded, nothing else changes.
- ``retry``: a failed command is rerun on the same tree up to ``flaky_retries`` times; a
  rerun that passes makes the command pass, and ``flaky_gate_detected(action="retried")``
  says so. When every rerun fails, the failure stands.
- ``quarantine``: as ``retry``, and a gate found flaky is quarantined in the project's gate
  registry; while it is, its failures are recorded with ``ignored=True`` and do not block
  (the next command runs) until a person clears it (``storyline gates clear``).

Nothing is decided silently: every run is a ``record_gate_verdict`` event on the story
(with its rerun number), every detection a ``flaky_gate_detected`` event naming what was
done and why, every quarantine an event of the registry. Gates named in ``nondeterministic``
are recorded but never compared, rerun or quarantined: their verdicts may differ by design.

The memory of earlier verdicts lives in the runner process: rebuilt from the log at start
(the story index folds every event in; :class:`VerdictIndex` hands it the verdicts on the
way), then fed by the runner's own records. It keeps, per key, the latest passing and the
latest failing verdict (that is all a comparison needs), for a bounded number of keys
(least recently used first out).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import subprocess
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from domain.config import GatesConfig
from domain.errors import DomainError
from domain.events import GateFlakyDetected, GateVerdictRecorded
from domain.gate_registry import GateCleared, GateQuarantined
from domain.story import Story
from runners.gates import (
    CommandResult,
    GateRun,
    gate_env,
    gate_run,
    kill_leftover,
    run_command,
)
from runners.index import StoryIndex
from service.application import StorylineApplication
from service.events_log import LoggedEvent, decode_row
from service.gate_registry import GateRegistryService

logger = logging.getLogger(__name__)

Phase = Literal["gates", "merge_gates"]

VOLATILE_ENV = frozenset(
    {
        "_",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "COLUMNS",
        "LINES",
        "PYTEST_CURRENT_TEST",
        "SSH_AUTH_SOCK",
        "SSH_CLIENT",
        "SSH_CONNECTION",
        "SSH_TTY",
        "TERM_SESSION_ID",
        "WINDOWID",
        "TMUX",
        "TMUX_PANE",
        "STY",
        "XDG_SESSION_ID",
        "INVOCATION_ID",
        "JOURNAL_STREAM",
        "MANAGERPID",
        "NOTIFY_SOCKET",
        "SYSTEMD_EXEC_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
    }
)
"""Left out of the fingerprint: they name the runner's session, terminal or process (the
shell's bookkeeping, the login, the service manager, the test that runs it), which change
between two runs of one runner or across a restart without changing anything a gate can
be judged on. Every other variable of the gate's environment (``runners.gates.gate_env``:
the runner's own, secrets removed) counts: a gate run under another ``PATH`` or toolchain
setting is another key, and its different verdict is no evidence of flakiness."""

VERDICT_OUTPUT = 20_000
"""Characters of a command's output kept in its verdict event (the tail; the whole gate
output is in the GatesPassed/GatesFailed or MergeFailed event as before)."""

MEMORY_OUTPUT = 4_000
"""Characters of output the memory keeps per remembered verdict (for the flaky record)."""

MAX_KEYS = 2_048

VERDICT_TOPIC = GateVerdictRecorded.TOPIC
FLAKY_TOPIC = GateFlakyDetected.TOPIC
REGISTRY_TOPICS = (GateQuarantined.TOPIC, GateCleared.TOPIC)

Key = tuple[str, str, str]
"""``(tree, gate, fingerprint)``."""


def fingerprint(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """sha256 of the command and the environment that matters (see :data:`VOLATILE_ENV`)."""
    kept = sorted((k, v) for k, v in env.items() if k not in VOLATILE_ENV)
    payload = json.dumps({"argv": list(argv), "env": kept}, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8", "surrogateescape")).hexdigest()


def tree_of(cwd: Path) -> str | None:
    """The tree of the commit checked out in ``cwd`` (what the gates judge), or None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", "HEAD^{tree}"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    tree = out.stdout.strip()
    return tree if out.returncode == 0 and tree else None


def gate_name(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def normalized_gate(written: str) -> str:
    """A gate as a person writes it in the config or on the command line, in the form the
    events name it (``shlex.join`` of its argv)."""
    try:
        argv = shlex.split(written)
    except ValueError:
        return written
    return shlex.join(argv) if argv else written


def quarantined_name(given: str, quarantined: Mapping[str, object]) -> str | None:
    """The quarantined gate a person means by ``given`` (as shown, or as written), if any."""
    if given in quarantined:
        return given
    normal = normalized_gate(given)
    return normal if normal in quarantined else None


def not_quarantined(given: str, quarantined: Mapping[str, object]) -> str:
    """The refusal for clearing a gate that is not quarantined (names the ones that are)."""
    known = ", ".join(repr(g) for g in sorted(quarantined)) or "none"
    return f"gate {_shown(given)!r} is not quarantined (quarantined: {known})"


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[-limit:]


def _shown(gate: str) -> str:
    return gate if len(gate) <= 200 else gate[:197] + "..."


def _verdict_word(passed: bool) -> str:
    return "passed" if passed else "failed"


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    output: str
    story_id: str
    position: int


class VerdictMemory:
    """Earlier verdicts per key: the latest pass and the latest failure, LRU-bounded."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._keys: OrderedDict[Key, dict[bool, Verdict]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def differing(self, key: Key, passed: bool) -> Verdict | None:
        """The latest earlier verdict on ``key`` that is not ``passed``, if any."""
        with self._lock:
            found = self._keys.get(key)
            if found is None:
                return None
            self._keys.move_to_end(key)
            return found.get(not passed)

    def reusable(self, key: Key) -> Verdict | None:
        """The latest verdict on ``key`` when it is a pass and no failure on the key came
        after it: a deterministic gate would pass again, so the run may be skipped."""
        with self._lock:
            found = self._keys.get(key)
            if found is None:
                return None
            self._keys.move_to_end(key)
            passed, failed = found.get(True), found.get(False)
            if passed is None or (failed is not None and failed.position > passed.position):
                return None
            return passed

    def remember(self, key: Key, verdict: Verdict) -> None:
        """Keep ``verdict`` unless a later one of the same outcome is known (the runner's own
        record and the log's copy of it arrive in either order)."""
        with self._lock:
            slots = self._keys.get(key)
            if slots is None:
                slots = self._keys[key] = {}
            self._keys.move_to_end(key)
            known = slots.get(verdict.passed)
            if known is None or known.position <= verdict.position:
                slots[verdict.passed] = Verdict(
                    verdict.passed,
                    _tail(verdict.output, MEMORY_OUTPUT),
                    verdict.story_id,
                    verdict.position,
                )
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)

    def feed(self, events: Iterable[LoggedEvent]) -> None:
        """Fold in the log's verdict events (any order; repeats change nothing)."""
        for event in events:
            if event.type != "GateVerdictRecorded":
                continue
            data = event.data
            if data.get("reused_from"):
                continue  # not a run: the evidence is the verdict it reused
            try:
                key = (str(data["tree"]), str(data["gate"]), str(data["fingerprint"]))
                passed = bool(data["passed"])
            except KeyError:
                continue
            self.remember(
                key, Verdict(passed, str(data.get("output") or ""), event.story_id, event.position)
            )


@dataclass
class VerdictIndex(StoryIndex):
    """The runner's story index, which also hands every verdict it folds in to ``verdicts``:
    at start-up it reads the whole log, so the memory is rebuilt with it, and each catch-up
    brings the verdicts recorded since (by this runner or one before it)."""

    verdicts: VerdictMemory = field(default_factory=VerdictMemory)

    def apply(self, events: Iterable[LoggedEvent]) -> set[str]:
        batch = events if isinstance(events, list) else list(events)
        self.verdicts.feed(batch)
        return super().apply(batch)


# --------------------------------------------------------------------------- the policy


class _StoryMoved(Exception):
    """A verdict could not be recorded on the story (it left the gates): stop judging."""


@dataclass
class _Outcome:
    runs: list[CommandResult]
    blocks: bool
    notes: list[str]


class GateJudge:
    """Runs a story's gates one command at a time under the flaky policy, recording each
    verdict and decision on the story (and quarantines in the gate registry)."""

    def __init__(
        self,
        app: StorylineApplication,
        memory: VerdictMemory | None = None,
        registry: GateRegistryService | None = None,
    ) -> None:
        self.app = app
        self.memory = memory if memory is not None else VerdictMemory()
        self.registry = registry if registry is not None else GateRegistryService(app)
        self._quarantine_lock = threading.Lock()
        self.reuse_by_default = False
        """Whether a phase whose ``reuse_verdicts`` is unset reuses recorded passes (the
        runner turns it on with the speculative merge queue)."""

    def run(
        self,
        story: Story,
        phase: Phase,
        gates: GatesConfig,
        cwd: Path,
        *,
        pidfile: Path,
        actor: str,
    ) -> GateRun:
        """The story's gates in ``cwd``: passed when every command passed, passed on a
        rerun, or failed while quarantined (each of those said so in an event)."""
        kill_leftover(pidfile)
        if not gates.commands:
            return GateRun(passed=True, output="(no gate commands configured)")
        tree = tree_of(cwd)
        env = gate_env()
        quarantined = self._quarantined() if gates.flaky == "quarantine" else {}
        opted_out = {normalized_gate(g) for g in gates.nondeterministic}
        reuse = gates.reuse_verdicts if gates.reuse_verdicts is not None else self.reuse_by_default
        runs: list[CommandResult] = []
        notes: list[str] = []
        if tree is None:
            # Without the tree there is no key: no verdict can be recorded or compared, so
            # none may be changed either (no reruns, no quarantine); the gates run as ever.
            logger.warning("gates of %s: cannot read the tree in %s", story.id, cwd)
            notes.append("[no commit tree readable here: verdicts not recorded]")
        for argv in gates.commands:
            gate = gate_name(argv)
            if tree is None:
                result = run_command(
                    argv, cwd, timeout_secs=gates.timeout_secs, env=None, pidfile=pidfile
                )
                runs.append(result)
                if not result.passed:
                    return gate_run(runs, failed_command=gate, notes="\n".join(notes))
                continue
            try:
                outcome = self._command(
                    story,
                    phase,
                    gates,
                    argv,
                    cwd,
                    tree=tree,
                    key=(tree, gate, fingerprint(argv, env)),
                    compared=gate not in opted_out,
                    reuse=reuse and gate not in opted_out,
                    quarantined=quarantined,
                    pidfile=pidfile,
                    actor=actor,
                )
            except _StoryMoved as moved:
                notes.append(f"[{moved}; the gates stopped]")
                return gate_run(runs, failed_command=gate, notes="\n".join(notes))
            runs.extend(outcome.runs)
            notes.extend(outcome.notes)
            if outcome.blocks:
                return gate_run(runs, failed_command=gate, notes="\n".join(notes))
        return gate_run(runs, notes="\n".join(notes))

    # ------------------------------------------------------------------ one command

    def _command(
        self,
        story: Story,
        phase: Phase,
        gates: GatesConfig,
        argv: Sequence[str],
        cwd: Path,
        *,
        tree: str,
        key: Key,
        compared: bool,
        quarantined: dict[str, dict[str, Any]],
        pidfile: Path,
        actor: str,
        reuse: bool = False,
    ) -> _Outcome:
        gate = key[1]
        if reuse:
            earlier_pass = self.memory.reusable(key)
            if earlier_pass is not None:
                return self._reuse(story, phase, key, argv, earlier_pass, actor)
        reruns = gates.flaky_retries if gates.flaky != "off" and compared else 0
        runs: list[CommandResult] = []
        notes: list[str] = []
        reported = False
        failed: Verdict | None = None  # the failure a passing rerun is compared with
        for rerun in range(reruns + 1):
            result = run_command(
                argv, cwd, timeout_secs=gates.timeout_secs, env=None, pidfile=pidfile
            )
            runs.append(result)
            earlier: Verdict | None
            if result.passed and failed is not None:
                # A rerun's pass is always announced, with the failure it overturns: it
                # changes what the gates decide, and no decision goes unrecorded.
                earlier = failed
            elif compared and not reported:
                # Otherwise one detection per command: its reruns are evidence, not news.
                earlier = self.memory.differing(key, result.passed)
            else:
                earlier = None
            newly = False
            if earlier is not None and gates.flaky == "quarantine" and gate not in quarantined:
                newly = self._quarantine(story, phase, gate, tree, earlier, result, quarantined)
            ignored = not result.passed and gates.flaky == "quarantine" and gate in quarantined
            position = self._record_verdict(
                story, phase, key, result, rerun, reruns, ignored, quarantined.get(gate), actor
            )
            verdict = Verdict(
                result.passed, _tail(result.output, VERDICT_OUTPUT), story.id, position
            )
            self.memory.remember(key, verdict)
            if not result.passed:
                failed = verdict
            if earlier is not None:
                reported = True
                action = self._detected(
                    story, phase, gates, key, earlier, result, rerun, newly, quarantined, actor
                )
                notes.append(f"[{gate}: different verdicts on this tree; {action}]")
            if result.passed:
                if rerun:
                    notes.append(f"[{gate}: passed on rerun {rerun} of {reruns}]")
                return _Outcome(runs, False, notes)
            if ignored:
                notes.append(f"[{gate}: failed, ignored: the gate is quarantined as flaky]")
                return _Outcome(runs, False, notes)
        if reruns:
            notes.append(f"[{gate}: failed on every one of {reruns} reruns as well]")
        return _Outcome(runs, True, notes)

    def _reuse(
        self,
        story: Story,
        phase: Phase,
        key: Key,
        argv: Sequence[str],
        earlier: Verdict,
        actor: str,
    ) -> _Outcome:
        """Reuse a recorded pass on the same key instead of running the command again
        (gates named in ``nondeterministic`` never get here): recorded as a verdict that
        names the position of the pass it reuses."""
        tree, gate, fp = key
        output = (
            f"$ {gate}\n[not run: passed on this tree with the same command and environment "
            f"at log position {earlier.position} (story {earlier.story_id}); verdict reused]"
        )
        self._transition(
            story,
            "record_gate_verdict",
            actor,
            f"{phase} command {_shown(gate)} passed on tree {tree[:12]}: reused the verdict "
            f"recorded at position {earlier.position} (story {earlier.story_id})",
            {
                "phase": phase,
                "gate": gate,
                "tree": tree,
                "fingerprint": fp,
                "passed": True,
                "output": output,
                "reused_from": earlier.position,
            },
        )
        # Not remembered as a new pass: the evidence is still the run it reuses.
        result = CommandResult(tuple(argv), True, output)
        note = f"[{gate}: verdict reused from position {earlier.position}]"
        return _Outcome([result], False, [note])

    # ------------------------------------------------------------------ events

    def _transition(
        self, story: Story, event: str, actor: str, reason: str, data: dict[str, Any]
    ) -> int:
        # Not steps (no expected version): the story's own moves are not held up by them.
        try:
            committed = self.app.transition(story.id, event, actor=actor, reason=reason, data=data)
        except DomainError as exc:
            raise _StoryMoved(f"could not record {event} on story {story.id}: {exc}") from exc
        return committed.position

    def _record_verdict(
        self,
        story: Story,
        phase: Phase,
        key: Key,
        result: CommandResult,
        rerun: int,
        reruns: int,
        ignored: bool,
        quarantine: dict[str, Any] | None,
        actor: str,
    ) -> int:
        tree, gate, fp = key
        reason = (
            f"{phase} command {_shown(gate)} {_verdict_word(result.passed)} on tree {tree[:12]}"
        )
        if rerun:
            reason += f" (rerun {rerun} of {reruns} after a failure)"
        if ignored:
            since = (quarantine or {}).get("since") or "now"
            reason += (
                f"; not blocking: the gate is quarantined as flaky (since {since}) until a "
                "person clears it"
            )
        return self._transition(
            story,
            "record_gate_verdict",
            actor,
            reason,
            {
                "phase": phase,
                "gate": gate,
                "tree": tree,
                "fingerprint": fp,
                "passed": result.passed,
                "output": _tail(result.output, VERDICT_OUTPUT),
                "rerun": rerun,
                "ignored": ignored,
            },
        )

    def _detected(
        self,
        story: Story,
        phase: Phase,
        gates: GatesConfig,
        key: Key,
        earlier: Verdict,
        result: CommandResult,
        rerun: int,
        newly_quarantined: bool,
        quarantined: dict[str, dict[str, Any]],
        actor: str,
    ) -> str:
        tree, gate, fp = key
        where = "this run" if earlier.story_id == story.id else f"story {earlier.story_id}"
        seen = (
            f"{_shown(gate)} {_verdict_word(earlier.passed)} (in {where}) and now "
            f"{_verdict_word(result.passed)} on the same tree {tree[:12]} with the same "
            "command and environment"
        )
        if newly_quarantined:
            action = "quarantined"
            decided = (
                "quarantined: its failures no longer block until a person clears it "
                "(storyline gates clear)"
            )
            if result.passed and rerun:
                decided += f"; rerun {rerun} passed, so the gate counts as passed"
        elif result.passed and rerun:
            action = "retried"
            decided = f"rerun {rerun} passed after a failure: the gate counts as passed"
        else:
            action = "recorded"
            if gates.flaky == "quarantine" and gate in quarantined:
                decided = "recorded; the gate is already quarantined"
            elif result.passed:
                decided = "recorded; this verdict (a pass) stands"
            elif gates.flaky == "off":
                decided = "recorded only ([gates] flaky = off); the failure stands"
            else:
                decided = "recorded; the failure stands unless a rerun passes"
        self._transition(
            story,
            "flaky_gate_detected",
            actor,
            f"flaky gate: {seen}; {decided}",
            {
                "phase": phase,
                "gate": gate,
                "tree": tree,
                "fingerprint": fp,
                "outputs": [
                    _tail(earlier.output, VERDICT_OUTPUT),
                    _tail(result.output, VERDICT_OUTPUT),
                ],
                "verdicts": [earlier.passed, result.passed],
                "action": action,
            },
        )
        return decided

    # ------------------------------------------------------------------ the registry

    def _quarantined(self) -> dict[str, dict[str, Any]]:
        try:
            return dict(self.registry.quarantined())
        except Exception:
            # A registry that cannot be read must not make failures pass: none ignored.
            logger.exception("cannot read the gate registry; no gate counts as quarantined")
            return {}

    def _quarantine(
        self,
        story: Story,
        phase: Phase,
        gate: str,
        tree: str,
        earlier: Verdict,
        result: CommandResult,
        quarantined: dict[str, dict[str, Any]],
    ) -> bool:
        """Quarantine ``gate``; True when this call did (``quarantined`` is updated)."""
        reason = (
            f"found flaky in story {story.id} on tree {tree[:12]}: it "
            f"{_verdict_word(earlier.passed)} (story {earlier.story_id}) and then "
            f"{_verdict_word(result.passed)} with the same command and environment"
        )
        with self._quarantine_lock:
            try:
                self.registry.quarantine(
                    actor="runner:gates", gate=gate, phase=phase, reason=reason, story_id=story.id
                )
            except DomainError as exc:
                # Quarantined meanwhile (another story's gates), or the registry moved on.
                logger.info("quarantining %s: %s", gate, exc)
                quarantined.update(self._quarantined())
                return False
        quarantined[gate] = {"phase": phase, "since": "now", "reason": reason}
        return True


# --------------------------------------------------------------------------- reading the log


def read_topics(
    app: StorylineApplication,
    topics: Sequence[str],
    *,
    newest_first: bool = False,
    limit: int | None = None,
) -> list[LoggedEvent]:
    """Log entries of the given topics (a scan of the log: for people's reads, not loops)."""
    marks = ", ".join("?" for _ in topics)
    order = "DESC" if newest_first else "ASC"
    statement = (
        f"SELECT {app._pos} AS position, originator_id, originator_version, topic, state "
        f"FROM {app._events} WHERE topic IN ({marks}) ORDER BY {app._pos} {order}"
    )
    params: list[Any] = list(topics)
    if limit is not None:
        statement += " LIMIT ?"
        params.append(limit)
    return [decode_row(row) for row in app._fetch(statement, params)]


def count_ignored_failures(app: StorylineApplication) -> int:
    """Gate failures recorded as ignored (quarantined gates), counted in the database.

    The key is matched in the stored JSON bytes: the encoder writes ``"ignored":true``
    without spaces, and inside a string value (a gate's output) a quote is always escaped,
    so only the event's own field can match."""
    needle = b'"ignored":true'
    postgres = app.db.kind == "postgres"
    test = "position(?::bytea in state) > 0" if postgres else "instr(state, ?) > 0"
    rows = app._fetch(
        f"SELECT COUNT(*) AS n FROM {app._events} WHERE topic = ? AND {test}",
        (VERDICT_TOPIC, needle),
    )
    return int(rows[0]["n"]) if rows else 0


def flaky_report(app: StorylineApplication, *, limit: int = 100) -> dict[str, Any]:
    """What people see: flaky detections (newest first), the quarantined gates, and the
    registry's decisions (quarantines and clears, newest first)."""
    detections = [
        {
            "gate": e.data.get("gate"),
            "phase": e.data.get("phase"),
            "tree": e.data.get("tree"),
            "story_id": e.story_id,
            "at": e.timestamp.isoformat(),
            "position": e.position,
            "action": e.data.get("action"),
            "verdicts": e.data.get("verdicts"),
            "reason": e.reason,
        }
        for e in read_topics(app, [FLAKY_TOPIC], newest_first=True, limit=limit)
    ]
    registry = GateRegistryService(app)
    quarantined = [{"gate": gate, **info} for gate, info in sorted(registry.quarantined().items())]
    decisions = [
        {
            "type": e.type,
            "gate": e.data.get("gate"),
            "actor": e.actor,
            "reason": e.reason,
            "at": e.timestamp.isoformat(),
            "position": e.position,
        }
        for e in reversed(registry.history())
        if e.type in ("GateQuarantined", "GateCleared")
    ][:limit]
    return {"detections": detections, "quarantined": quarantined, "decisions": decisions}


__all__ = [
    "FLAKY_TOPIC",
    "VERDICT_TOPIC",
    "VOLATILE_ENV",
    "GateJudge",
    "Verdict",
    "VerdictIndex",
    "VerdictMemory",
    "count_ignored_failures",
    "fingerprint",
    "flaky_report",
    "normalized_gate",
    "not_quarantined",
    "quarantined_name",
    "read_topics",
    "tree_of",
]
