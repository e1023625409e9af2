"""A scripted stand-in for the Claude Code CLI, used by the test suite and the demo.

It is a real executable speaking the same contract as ``claude -p --output-format
stream-json --verbose``: the same flags, stream-JSON on stdout (an ``init`` line with a session
id, one ``assistant`` line per action, a final ``result`` line with ``num_turns``,
``total_cost_usd`` and ``usage``) and exit codes. What it does to the working tree comes from a
JSON script instead of a model, so the runner code it exercises is the production code.

Run::

    python -m runners.scripted_agent --script script.json -p "prompt" \\
        --output-format stream-json --verbose [--append-system-prompt X] [--max-turns N] \\
        [--max-budget-usd X] [--resume ID] [--model M] [--record calls.jsonl]

Unknown flags are ignored. ``--script`` may also come from ``$SCRIPTED_AGENT_SCRIPT``.
Stdlib only, and heavy modules are imported lazily, so that it starts fast.

Script format
-------------
A JSON object keyed by story id (``$STORYLINE_STORY_ID``), with ``"*"`` as the default for
any other story. A value is either a list of actions (used for every attempt) or an object
keyed by attempt number (``$STORYLINE_ATTEMPT``, default 1) as a string, with optional
``"*"``; an attempt with no entry of its own uses ``"*"``, else the entry with the highest
attempt number::

    {
      "42": {
        "1": [{"write": "a.txt", "content": "x\\n"}, {"exit": 1}],
        "2": [{"expect_in_prompt": "quality gates failed"},
              {"write": "a.txt", "content": "fixed\\n"}, {"commit": "fix a"}]
      },
      "*": [{"say": "nothing to do"}]
    }

Actions (one JSON object each; the first key names it). Every action except
``expect_in_prompt``, ``raw`` and ``crash_before_session`` is one turn and prints one
``assistant`` line. Any action may carry ``input_tokens``, ``output_tokens`` and ``cost_usd``
to replace that turn's default usage (100 in, 20 out, $0.001).

``{"write": "path", "content": "..."}``
    Create or overwrite a file (relative to the working directory; parents created).
``{"append": "path", "content": "..."}``
    Append to a file.
``{"delete": "path"}``
    Delete a file (missing is fine).
``{"commit": "message", "allow_empty": false, "no_verify": false, "amend": false}``
    ``git add -A`` and commit with an explicit identity. A clean tree is skipped (not an error)
    unless ``allow_empty``. With ``amend`` the last commit is replaced instead (``git commit
    --amend``, message and all), clean tree or not: what a mergemaster does to the resolution
    commit it was sent back to fix.
``{"say": "text"}``
    Only print an assistant message.
``{"sleep": secs, "interval": 0.5}``
    Busy but talkative: prints a progress line every ``interval`` seconds.
``{"silent": secs}``
    No output at all for that long (exercises the inactivity watchdog).
``{"spawn_child_sleep": secs, "pid_file": "/abs/path"}``
    Start ``sleep secs`` as a child in the same process group (inheriting stdout, like a test
    runner would) and write its pid to ``pid_file``; the agent carries on.
``{"crash_before_session": true}``
    Anywhere in the list: before printing the init line, kill itself with SIGKILL (or the
    signal named instead of ``true``, e.g. ``"SIGABRT"``).
``{"kill_self": "SIGKILL"}``
    Kill itself with that signal at this point (after the session exists).
``{"exit": code, "result": true}``
    Stop here with that exit code; prints a result line first (subtype ``success`` for 0,
    ``error_during_execution`` otherwise) unless ``"result": false``.
``{"fail_result": "error_max_turns", "exit_code": 0}``
    Print a result line with that error subtype and exit (0 by default).
``{"raw": "text"}``
    Print a line that is not JSON (exercises parsers).
``{"api": {"event": "merge_resolved", "reason": "...", "data": {}}, "allow_failure": false}``
    ``GET $STORYLINE_URL/stories/$STORYLINE_STORY_ID`` for the version, then ``POST
    .../transitions`` with ``{"event", "expected_version", "reason", "data"}`` and
    ``Authorization: Bearer $STORYLINE_TOKEN``. A failed call exits 4 unless ``allow_failure``.
``{"submit_plan": {"subtasks": [...], "prefer_single_session": false}}``
    An epic's planner (``$STORYLINE_STORY_ID`` is ``epic-<n>``): ``POST
    $STORYLINE_URL/epics/<id>/transitions`` with ``{"event": "submit_plan", "data": {"plan":
    ...}}``. A refused plan is an answer (HTTP 200), not a failure.
``{"submit_review": {"criteria": [{"criterion": 0, "met": true, "score": 1, "evidence": ""}],
"summary": "..."}}``
    An evaluator's verdict: ``POST .../stories/$STORYLINE_STORY_ID/transitions`` with event
    ``submit_review`` and ``data`` the verdict plus ``attempt`` (``$STORYLINE_ATTEMPT``). A
    refused verdict (HTTP 4xx) exits 4 unless ``allow_failure``.
``{"submit_evaluation": {"criteria": [...], "summary": "..."}}``
    An epic's evaluator: ``POST .../epics/<id>/transitions`` event ``submit_evaluation`` with
    ``{"attempt": $STORYLINE_ATTEMPT, "criteria": ..., "summary": ...}``. A refused verdict
    (HTTP 4xx) exits 4 unless ``"allow_failure": true``.
``{"ask_questions": ["question", ...]}``
    An epic's planner asks instead of planning: event ``ask_questions`` with
    ``{"attempt": $STORYLINE_ATTEMPT, "questions": [...]}``; a refusal exits 4 as above.
``{"resolve_conflicts": "ours" | "theirs" | "union"}``
    Rewrite every conflicted file, dropping the conflict markers (keeping our side, their
    side, or both in that order) and ``git add`` it.
``{"expect_in_prompt": "text"}``
    Exit 3 with an error result unless ``text`` occurs in the prompt or the system prompt.

``--max-turns`` and ``--max-budget-usd`` are honoured like the real CLI: exceeding them ends
the run with result ``error_max_turns`` / ``error_max_budget_usd`` and exit code 1.

Exit codes: 0 success, 1 a cap was reached, 2 bad usage or script, 3 ``expect_in_prompt``
failed, 4 an ``api`` call failed, 5 an action failed (git error, I/O error), or the code of
an ``exit`` action.

``--record PATH`` appends one JSON line per invocation, written before anything else:
``args`` (argv after the executable), ``cwd``, ``pid``, ``pgid``, ``env`` (the ``STORYLINE_*``
variables except the token), ``token_present``, ``env_names`` (names only, no values),
``prompt``, ``system_prompt``, ``resume``, ``model``, ``max_turns``, ``max_budget_usd``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

GIT_IDENTITY = ("Scripted Agent", "scripted-agent@storyline.invalid")
DEFAULT_INPUT_TOKENS = 100
DEFAULT_OUTPUT_TOKENS = 20
DEFAULT_TURN_COST = 0.001

EXIT_CAP = 1
EXIT_USAGE = 2
EXIT_EXPECTATION = 3
EXIT_API = 4
EXIT_ACTION = 5

# Flags of the real CLI that take a value. Anything else starting with "-" is a switch.
_VALUE_FLAGS = {
    "--append-system-prompt",
    "--system-prompt",
    "--max-turns",
    "--max-budget-usd",
    "--resume",
    "-r",
    "--model",
    "--output-format",
    "--input-format",
    "--permission-mode",
    "--allowedTools",
    "--allowed-tools",
    "--disallowedTools",
    "--disallowed-tools",
    "--mcp-config",
    "--session-id",
    "--script",
    "--record",
}
_NON_TURN_ACTIONS = {"expect_in_prompt", "raw", "crash_before_session"}
_ACTIONS = {
    "write",
    "append",
    "delete",
    "commit",
    "say",
    "sleep",
    "silent",
    "spawn_child_sleep",
    "crash_before_session",
    "submit_plan",
    "submit_review",
    "submit_evaluation",
    "ask_questions",
    "kill_self",
    "exit",
    "fail_result",
    "raw",
    "api",
    "resolve_conflicts",
    "expect_in_prompt",
}


class UsageError(Exception):
    pass


class ActionError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_ACTION) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Options:
    def __init__(self) -> None:
        self.prompt: str | None = None
        self.system_prompts: list[str] = []
        self.max_turns: int | None = None
        self.max_budget_usd: float | None = None
        self.resume: str | None = None
        self.model: str | None = None
        self.script: str | None = os.environ.get("SCRIPTED_AGENT_SCRIPT")
        self.record: str | None = None

    @property
    def system_prompt(self) -> str:
        return "\n\n".join(self.system_prompts)


def parse_args(args: list[str]) -> Options:
    opts = Options()
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        value: str | None = None
        if flag in ("-p", "--print"):
            # -p is a switch in the real CLI with the prompt as a positional, but templates
            # usually write "-p {{prompt}}": both read the same.
            if eq:
                opts.prompt = inline
            elif i + 1 < len(args) and not _looks_like_flag(args[i + 1]):
                opts.prompt = args[i + 1]
                i += 1
            i += 1
            continue
        if flag in _VALUE_FLAGS:
            if eq:
                value = inline
            elif i + 1 < len(args):
                value = args[i + 1]
                i += 1
            else:
                raise UsageError(f"flag {flag} needs a value")
            _set_option(opts, flag, value)
        elif not arg.startswith("-") and opts.prompt is None:
            opts.prompt = arg
        i += 1
    return opts


def _looks_like_flag(arg: str) -> bool:
    return arg.split("=", 1)[0] in _VALUE_FLAGS or arg.startswith("--")


def _set_option(opts: Options, flag: str, value: str) -> None:
    try:
        if flag in ("--append-system-prompt", "--system-prompt"):
            opts.system_prompts.append(value)
        elif flag == "--max-turns":
            opts.max_turns = int(value)
        elif flag == "--max-budget-usd":
            opts.max_budget_usd = float(value)
        elif flag in ("--resume", "-r"):
            opts.resume = value
        elif flag == "--model":
            opts.model = value
        elif flag == "--script":
            opts.script = value
        elif flag == "--record":
            opts.record = value
    except ValueError as exc:
        raise UsageError(f"bad value for {flag}: {value!r}") from exc


def load_actions(script_path: str | None, story_id: str, attempt: int) -> list[dict[str, Any]]:
    if not script_path:
        return [{"say": "no script given; nothing to do"}]
    try:
        script = json.loads(Path(script_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read script {script_path}: {exc}") from exc
    if not isinstance(script, dict):
        raise UsageError("a script is a JSON object keyed by story id")
    entry = script.get(story_id, script.get("*"))
    if entry is None:
        return [{"say": f"the script has nothing for story {story_id}"}]
    if isinstance(entry, dict):
        if str(attempt) in entry:
            entry = entry[str(attempt)]
        elif "*" in entry:
            entry = entry["*"]
        else:
            numbered = sorted((int(k), v) for k, v in entry.items() if k.isdigit())
            if not numbered:
                raise UsageError(f"story {story_id}: no attempt entries")
            entry = numbered[-1][1]
    if not isinstance(entry, list):
        raise UsageError(f"story {story_id}: actions must be a list")
    for action in entry:
        if not isinstance(action, dict) or not action:
            raise UsageError(f"story {story_id}: every action is a non-empty object")
        name = next(iter(action))
        if name not in _ACTIONS:
            raise UsageError(f"story {story_id}: unknown action {name!r}")
    return entry


class Agent:
    def __init__(self, opts: Options, actions: list[dict[str, Any]]) -> None:
        self.opts = opts
        self.actions = actions
        self.session_id = opts.resume or _new_session_id()
        self.model = opts.model or "scripted"
        self.turns = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost = 0.0
        self.turn_usage = {"input_tokens": 0, "output_tokens": 0}
        self.started = time.monotonic()

    # --- output -------------------------------------------------------------------------

    def emit(self, obj: dict[str, Any]) -> None:
        try:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            os._exit(141)

    def init_line(self) -> None:
        self.emit(
            {
                "type": "system",
                "subtype": "init",
                "session_id": self.session_id,
                "cwd": os.getcwd(),
                "model": self.model,
                "tools": ["Read", "Write", "Bash"],
                "permissionMode": "default",
                "apiKeySource": "none",
            }
        )

    def assistant(self, text: str) -> None:
        self.emit(
            {
                "type": "assistant",
                "message": {
                    "id": f"msg_{self.turns:04d}_{self.session_id[:8]}",
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [{"type": "text", "text": text}],
                    # The turn's usage rides on its message, as with the real CLI, so a run
                    # killed before its result line still shows what it consumed.
                    "usage": dict(self.turn_usage),
                },
                "session_id": self.session_id,
            }
        )

    def progress(self, text: str) -> None:
        self.emit(
            {
                "type": "user",
                "message": {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "progress", "content": text}
                    ],
                },
                "session_id": self.session_id,
            }
        )

    def finish(self, subtype: str = "success", exit_code: int = 0, text: str = "") -> NoReturn:
        self.emit(
            {
                "type": "result",
                "subtype": subtype,
                "is_error": subtype != "success",
                "duration_ms": int((time.monotonic() - self.started) * 1000),
                "duration_api_ms": 0,
                "num_turns": self.turns,
                "result": text or subtype,
                "session_id": self.session_id,
                "total_cost_usd": round(self.cost, 6),
                "usage": {
                    "input_tokens": self.input_tokens,
                    "output_tokens": self.output_tokens,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            }
        )
        sys.exit(exit_code)

    # --- the run ------------------------------------------------------------------------

    def run(self) -> NoReturn:
        for action in self.actions:
            if "crash_before_session" in action:
                sig = action["crash_before_session"]
                _kill_self("SIGKILL" if sig is True else str(sig))
        self.init_line()
        for action in self.actions:
            name = next(iter(action))
            try:
                if name not in _NON_TURN_ACTIONS:
                    self.start_turn(action)
                text = getattr(self, f"do_{name}")(action[name], action)
            except ActionError as exc:
                self.assistant(f"{name} failed: {exc}")
                self.finish("error_during_execution", exc.exit_code, str(exc))
            except (OSError, ValueError, TypeError) as exc:
                self.assistant(f"{name} failed: {exc}")
                self.finish("error_during_execution", EXIT_ACTION, str(exc))
            if text is not None:
                self.assistant(text)
            budget = self.opts.max_budget_usd
            if budget is not None and self.cost > budget + 1e-12:
                self.finish("error_max_budget_usd", EXIT_CAP, f"exceeded budget ${budget}")
        self.finish("success", 0, "done")

    def start_turn(self, action: dict[str, Any]) -> None:
        if self.opts.max_turns is not None and self.turns >= self.opts.max_turns:
            self.finish("error_max_turns", EXIT_CAP, f"reached max turns ({self.turns})")
        self.turns += 1
        self.turn_usage = {
            "input_tokens": int(action.get("input_tokens", DEFAULT_INPUT_TOKENS)),
            "output_tokens": int(action.get("output_tokens", DEFAULT_OUTPUT_TOKENS)),
        }
        self.input_tokens += self.turn_usage["input_tokens"]
        self.output_tokens += self.turn_usage["output_tokens"]
        self.cost += float(action.get("cost_usd", DEFAULT_TURN_COST))

    # --- actions (return the assistant text, or None for no line) -------------------------

    def do_write(self, path: str, action: dict[str, Any]) -> str:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(str(action.get("content", "")), encoding="utf-8")
        return f"wrote {path}"

    def do_append(self, path: str, action: dict[str, Any]) -> str:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a", encoding="utf-8") as fh:
            fh.write(str(action.get("content", "")))
        return f"appended to {path}"

    def do_delete(self, path: str, action: dict[str, Any]) -> str:
        Path(path).unlink(missing_ok=True)
        return f"deleted {path}"

    def do_commit(self, message: str, action: dict[str, Any]) -> str:
        _git("add", "-A")
        allow_empty = bool(action.get("allow_empty"))
        amend = bool(action.get("amend"))
        if not allow_empty and not amend and not _git("status", "--porcelain").strip():
            return "nothing to commit"
        args = ["commit", "-q", "-m", str(message)]
        if amend:
            args.append("--amend")
        if allow_empty or amend:
            # An amend may leave the tree as the commit's parent had it; still a commit.
            args.append("--allow-empty")
        if action.get("no_verify"):
            args.append("--no-verify")
        _git(*args)
        return f"committed {_git('rev-parse', 'HEAD').strip()}: {message}"

    def do_say(self, text: str, action: dict[str, Any]) -> str:
        return str(text)

    def do_sleep(self, secs: float, action: dict[str, Any]) -> str:
        interval = float(action.get("interval", 0.5))
        deadline = time.monotonic() + float(secs)
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(interval, left))
            self.progress("still working")
        return f"slept {secs}s"

    def do_silent(self, secs: float, action: dict[str, Any]) -> str:
        time.sleep(float(secs))
        return f"was silent for {secs}s"

    def do_spawn_child_sleep(self, secs: float, action: dict[str, Any]) -> str:
        child = subprocess.Popen(["sleep", str(secs)])
        pid_file = action.get("pid_file")
        if pid_file:
            Path(pid_file).write_text(str(child.pid), encoding="utf-8")
        return f"spawned child pid {child.pid}"

    def do_crash_before_session(self, value: object, action: dict[str, Any]) -> None:
        return None  # handled before the init line

    def do_kill_self(self, sig: str, action: dict[str, Any]) -> NoReturn:
        _kill_self(str(sig))

    def do_exit(self, code: int, action: dict[str, Any]) -> NoReturn:
        code = int(code)
        if action.get("result", True):
            self.finish("success" if code == 0 else "error_during_execution", code, f"exit {code}")
        sys.exit(code)

    def do_fail_result(self, subtype: str, action: dict[str, Any]) -> NoReturn:
        self.finish(str(subtype), int(action.get("exit_code", 0)), str(subtype))

    def do_raw(self, text: str, action: dict[str, Any]) -> None:
        self.emit_raw(str(text))

    def emit_raw(self, text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def do_expect_in_prompt(self, text: str, action: dict[str, Any]) -> None:
        haystack = f"{self.opts.prompt or ''}\n{self.opts.system_prompt}"
        if str(text) not in haystack:
            raise ActionError(f"expected {text!r} in the prompt", EXIT_EXPECTATION)
        return None

    def do_api(self, call: dict[str, Any], action: dict[str, Any]) -> str:
        try:
            status, body = _api_transition(call)
        except ActionError:
            if action.get("allow_failure"):
                return "api call failed (allowed)"
            raise
        return f"api {call.get('event')}: HTTP {status} {body[:200]}"

    def do_submit_plan(self, plan: Any, action: dict[str, Any]) -> str:
        return self.do_api({"event": "submit_plan", "data": {"plan": plan}}, action)

    def do_submit_evaluation(self, verdict: Any, action: dict[str, Any]) -> str:
        if not isinstance(verdict, dict):
            raise ActionError("submit_evaluation takes {criteria, summary}", EXIT_USAGE)
        data = {"attempt": _attempt(), **verdict}
        return self.do_api({"event": "submit_evaluation", "data": data}, action)

    def do_ask_questions(self, questions: Any, action: dict[str, Any]) -> str:
        data = {"attempt": _attempt(), "questions": questions}
        return self.do_api({"event": "ask_questions", "data": data}, action)

    def do_submit_review(self, verdict: Any, action: dict[str, Any]) -> str:
        """An evaluator's verdict on its story, for its own attempt ($STORYLINE_ATTEMPT)."""
        if not isinstance(verdict, dict):
            raise ActionError("submit_review takes an object: {criteria, summary}")
        data = {"attempt": int(os.environ.get("STORYLINE_ATTEMPT", "1")), **verdict}
        call = {"event": "submit_review", "data": data}
        for _ in range(3):
            try:
                return self.do_api(call, action)
            except ActionError as exc:
                # The runner may record the agent's start between our read and our write.
                if "version_conflict" not in str(exc):
                    raise
        return self.do_api(call, action)

    def do_resolve_conflicts(self, mode: str, action: dict[str, Any]) -> str:
        if mode not in ("ours", "theirs", "union"):
            raise ActionError(f"resolve_conflicts takes ours, theirs or union, not {mode!r}")
        out = _git("diff", "--name-only", "--diff-filter=U", "-z")
        paths = [p for p in out.split("\0") if p]
        for rel in paths:
            target = Path(rel)
            if target.exists():
                target.write_bytes(resolve_markers(target.read_bytes(), mode))
                _git("add", "--", rel)
            else:
                _git("rm", "-q", "--cached", "--ignore-unmatch", "--", rel)
        return f"resolved {len(paths)} conflicted file(s) ({mode}): {', '.join(paths)}"


def resolve_markers(data: bytes, mode: str) -> bytes:
    """Drop git conflict markers, keeping our side, their side, or both (ours first)."""
    out: list[bytes] = []
    ours: list[bytes] = []
    theirs: list[bytes] = []
    state = "outside"
    for line in data.splitlines(keepends=True):
        bare = line.rstrip(b"\r\n")
        if state == "outside" and bare.startswith(b"<<<<<<<"):
            state, ours, theirs = "ours", [], []
        elif state == "ours" and bare.startswith(b"|||||||"):
            state = "base"  # diff3 style: the common ancestor is dropped
        elif state in ("ours", "base") and bare == b"=======":
            state = "theirs"
        elif state == "theirs" and bare.startswith(b">>>>>>>"):
            if mode in ("ours", "union"):
                out.extend(ours)
            if mode in ("theirs", "union"):
                out.extend(theirs)
            state = "outside"
        elif state == "ours":
            ours.append(line)
        elif state == "theirs":
            theirs.append(line)
        elif state == "outside":
            out.append(line)
    if state != "outside":  # unterminated block: keep what we have rather than lose text
        out.extend(ours + theirs)
    return b"".join(out)


def _git(*args: str) -> str:
    name, email = GIT_IDENTITY
    cmd = [
        "git",
        "-c",
        f"user.name={name}",
        "-c",
        f"user.email={email}",
        "-c",
        "commit.gpgsign=false",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ActionError(f"git {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def _api_transition(call: dict[str, Any]) -> tuple[int, str]:
    # Imported here: urllib.request pulls in http.client, email and ssl, which would slow
    # down every start of the agent for the few scripts that talk to the API.
    import urllib.error
    import urllib.parse
    import urllib.request

    base = os.environ.get("STORYLINE_URL", "").rstrip("/")
    story = os.environ.get("STORYLINE_STORY_ID", "")
    if not base or not story:
        raise ActionError("STORYLINE_URL and STORYLINE_STORY_ID must be set", EXIT_API)
    # An epic's planner reports on its epic (``epic-<n>``), a coder on its story.
    kind = "epics" if story.startswith("epic-") and story[5:].isdigit() else "stories"
    url = f"{base}/{kind}/{urllib.parse.quote(story, safe='')}"
    headers = {"Accept": "application/json"}
    token = os.environ.get("STORYLINE_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def request(method: str, target: str, payload: dict[str, Any] | None) -> tuple[int, str]:
        data = None
        req_headers = dict(headers)
        if payload is not None:
            data = json.dumps(payload).encode()
            req_headers["Content-Type"] = "application/json"
        req = urllib.request.Request(target, data=data, headers=req_headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace")
            raise ActionError(
                f"{method} {target}: HTTP {exc.code}: {body[:500]}", EXIT_API
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ActionError(f"{method} {target}: {exc}", EXIT_API) from exc

    payload: dict[str, Any] = {
        "event": call.get("event"),
        "reason": call.get("reason", ""),
        "data": call.get("data", {}),
    }
    if kind == "stories":
        _, body = request("GET", url, None)
        try:
            payload["expected_version"] = json.loads(body)["version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ActionError(f"GET {url}: no version in the answer", EXIT_API) from exc
    # A plan does not depend on the epic's version (the runner records the planner's start
    # concurrently), so it is sent without one.
    return request("POST", f"{url}/transitions", payload)


def _attempt() -> int:
    """This attempt's number (``$STORYLINE_ATTEMPT``): an epic's agent names it in what it
    submits, and the epic refuses any attempt but the running one."""
    try:
        return int(os.environ.get("STORYLINE_ATTEMPT", "1"))
    except ValueError:
        return 1


def _kill_self(name: str) -> NoReturn:
    sys.stdout.flush()
    sig = getattr(signal, name.upper(), None) if not name.isdigit() else int(name)
    if sig is None:
        sig = signal.SIGKILL
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        # Python installs handlers for some signals (SIGINT); restore the default so the
        # process really dies by the signal, as a crashing CLI would.
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    time.sleep(5)
    os._exit(134)


def _new_session_id() -> str:
    import uuid

    return str(uuid.uuid4())


def write_record(opts: Options, args: list[str]) -> None:
    if not opts.record:
        return
    env = {
        k: v for k, v in os.environ.items() if k.startswith("STORYLINE_") and k != "STORYLINE_TOKEN"
    }
    entry = {
        "args": args,
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "pgid": os.getpgrp(),
        "time": time.time(),
        "env": env,
        "token_present": bool(os.environ.get("STORYLINE_TOKEN")),
        "env_names": sorted(os.environ),
        "prompt": opts.prompt,
        "system_prompt": opts.system_prompt,
        "resume": opts.resume,
        "model": opts.model,
        "max_turns": opts.max_turns,
        "max_budget_usd": opts.max_budget_usd,
    }
    # One O_APPEND write per line keeps concurrent agents' records from interleaving.
    fd = os.open(opts.record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(args)
        write_record(opts, args)
        story = os.environ.get("STORYLINE_STORY_ID", "*")
        try:
            attempt = int(os.environ.get("STORYLINE_ATTEMPT", "1"))
        except ValueError:
            attempt = 1
        actions = load_actions(opts.script, story, attempt)
    except UsageError as exc:
        print(f"scripted_agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    Agent(opts, actions).run()


if __name__ == "__main__":
    sys.exit(main())
