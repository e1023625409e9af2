"""The ``openai`` runtime: a tool-calling loop against an OpenAI-compatible endpoint.

``POST {base_url}/chat/completions`` with four tools (read_file, write_file, list_files,
run_command), all confined to the story's worktree. The loop runs in a thread so the
runtime has the same start/wait/kill shape as the CLI one. A refused or failing tool call is
an error string handed back to the model, never an exception: the model can correct itself,
and a hostile path cannot crash the runner.

Limits: the turn cap (``agent.max_turns``, lowered by the fixup cap, else
``default_max_turns``), a dollar budget when token prices are configured (or the endpoint
reports a cost), the inactivity timeout as the read timeout of each request, and the overall
timeout between steps. 429/5xx answers and connection errors are retried with bounded
exponential backoff that honours ``Retry-After``.

``run_command`` runs the argv without a shell in the worktree and in its own process group
(killed on timeout), but it is not a sandbox: a command can read outside the worktree like
any process of this user. Confinement applies to the file tools.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from runners.agents.argv import (
    build_prompt,
    effective_max_budget,
    effective_max_turns,
    gate_failure_section,
    tail_bytes,
)
from runners.agents.cli_runtime import agent_environment, terminate_group
from runners.agents.spawn_spec import AgentResult, AgentStartError, Outcome, SpawnSpec

log = logging.getLogger(__name__)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a UTF-8 text file. Paths are relative to the worktree root.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Create or overwrite a file (parent directories are created).",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                "required": ["path", "content"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "list_files",
            "description": "List a directory (default: the worktree root); directories end in /.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "recursive": {"type": "boolean"},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run_command",
            "description": (
                "Run a command in the worktree without a shell, e.g. "
                '["git", "commit", "-am", "message"]. Returns the exit code and output.'
            ),
            "parameters": {
                "type": "object",
                "properties": {"argv": {"type": "array", "items": {"type": "string"}}},
                "required": ["argv"],
            },
        },
    },
]

SYSTEM_PROMPT = (
    "You are an autonomous coding agent working in the git worktree {worktree}. Use the tools "
    "to inspect and change files (paths are relative to the worktree; you cannot leave it) and "
    "to run commands (an argv list, no shell). Commit your work with git. When you are done, "
    "reply with a short summary and no tool call."
)


class ToolError(Exception):
    """A refused or failed tool call; its message goes back to the model."""


class Workspace:
    """File and command tools confined to one directory tree."""

    def __init__(
        self,
        root: Path,
        *,
        env: dict[str, str],
        command_timeout_secs: float,
        kill_grace_secs: float = 2.0,
        max_read_bytes: int = 256_000,
        max_output_bytes: int = 20_000,
        max_list_entries: int = 2_000,
    ) -> None:
        self.root = root.resolve()
        self.env = env
        self.command_timeout_secs = command_timeout_secs
        self.kill_grace_secs = kill_grace_secs
        self.max_read_bytes = max_read_bytes
        self.max_output_bytes = max_output_bytes
        self.max_list_entries = max_list_entries
        self._lock = threading.Lock()
        self._running: subprocess.Popen[bytes] | None = None
        self._closed = False

    # --- confinement ----------------------------------------------------------------------

    def resolve(self, raw: object) -> Path:
        """The real path for a model-supplied relative path, or ToolError if it escapes."""
        if not isinstance(raw, str) or not raw.strip():
            raise ToolError("path must be a non-empty string")
        if "\x00" in raw:
            raise ToolError("path must not contain NUL bytes")
        rel = PurePosixPath(raw)
        if rel.is_absolute() or raw.startswith("~"):
            raise ToolError(f"refused: {raw!r} is absolute; use a path relative to the worktree")
        if ".git" in rel.parts:
            raise ToolError(f"refused: {raw!r} is inside git metadata")
        # resolve() follows every symlink on the way, so a link pointing outside is caught
        # here just like a literal '..'.
        resolved = (self.root / rel).resolve()
        if resolved != self.root and not resolved.is_relative_to(self.root):
            raise ToolError(f"refused: {raw!r} resolves outside the worktree")
        inside = resolved.relative_to(self.root).parts
        if inside and inside[0] == ".git":  # reached through a symlink
            raise ToolError(f"refused: {raw!r} is inside git metadata")
        return resolved

    # --- tools ----------------------------------------------------------------------------

    def read_file(self, path: object) -> str:
        target = self.resolve(path)
        if not target.is_file():
            raise ToolError(f"{path!r} is not a file")
        with target.open("rb") as fh:
            data = fh.read(self.max_read_bytes + 1)
        text = data[: self.max_read_bytes].decode("utf-8", "replace")
        if len(data) > self.max_read_bytes:
            text += f"\n[truncated after {self.max_read_bytes} bytes]"
        return text

    def write_file(self, path: object, content: object) -> str:
        if not isinstance(content, str):
            raise ToolError("content must be a string")
        target = self.resolve(path)
        if target == self.root or target.is_dir():
            raise ToolError(f"{path!r} is a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
        return f"wrote {len(content.encode('utf-8'))} bytes to {target.relative_to(self.root)}"

    def list_files(self, path: object = ".", recursive: object = False) -> str:
        target = self.resolve(path if path not in (None, "") else ".")
        if not target.is_dir():
            raise ToolError(f"{path!r} is not a directory")
        entries: list[str] = []
        truncated = False
        if recursive:
            for dirpath, dirnames, filenames in os.walk(target):
                dirnames[:] = sorted(d for d in dirnames if d != ".git")
                base = Path(dirpath)
                entries.extend(str((base / d).relative_to(self.root)) + "/" for d in dirnames)
                entries.extend(str((base / f).relative_to(self.root)) for f in sorted(filenames))
                if len(entries) >= self.max_list_entries:
                    truncated = True
                    break
        else:
            for child in sorted(target.iterdir()):
                if child.name == ".git":
                    continue
                suffix = "/" if child.is_dir() and not child.is_symlink() else ""
                entries.append(str(child.relative_to(self.root)) + suffix)
        entries = entries[: self.max_list_entries]
        if truncated:
            entries.append(f"[truncated after {self.max_list_entries} entries]")
        return "\n".join(entries) if entries else "(empty)"

    def run_command(self, argv: object) -> str:
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(a, str) for a in argv)
            or not argv[0]
        ):
            raise ToolError("argv must be a non-empty list of strings")
        with self._lock:
            if self._closed:
                raise ToolError("the run is stopping")
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=self.root,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ToolError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
            self._running = proc
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=self.command_timeout_secs)
        except subprocess.TimeoutExpired:
            timed_out = True
            terminate_group(proc.pid, self.kill_grace_secs, reap=proc)
            out, _ = proc.communicate()
        finally:
            with self._lock:
                self._running = None
        text = tail_bytes(out.decode("utf-8", "replace"), self.max_output_bytes)
        if timed_out:
            return f"timed out after {self.command_timeout_secs:g}s (process group killed)\n{text}"
        return f"exit code: {proc.returncode}\n{text}"

    def close(self) -> None:
        """Refuse further commands and kill the one running, with its whole group."""
        with self._lock:
            self._closed = True
            proc = self._running
        if proc is not None and proc.poll() is None:
            terminate_group(proc.pid, self.kill_grace_secs, reap=proc)

    def dispatch(self, name: str, raw_arguments: object) -> tuple[bool, str]:
        """Run one tool call; (ok, text for the model). Never raises for model mistakes."""
        try:
            if isinstance(raw_arguments, str):
                args = json.loads(raw_arguments) if raw_arguments.strip() else {}
            else:
                args = raw_arguments if raw_arguments is not None else {}
            if not isinstance(args, dict):
                raise ToolError("tool arguments must be a JSON object")
            if name == "read_file":
                return True, self.read_file(args.get("path"))
            if name == "write_file":
                return True, self.write_file(args.get("path"), args.get("content"))
            if name == "list_files":
                return True, self.list_files(args.get("path", "."), args.get("recursive", False))
            if name == "run_command":
                return True, self.run_command(args.get("argv"))
            raise ToolError(f"unknown tool {name!r}; available: {', '.join(_tool_names())}")
        except ToolError as exc:
            return False, f"error: {exc}"
        except json.JSONDecodeError as exc:
            return False, f"error: tool arguments are not valid JSON: {exc}"
        except (OSError, UnicodeError) as exc:
            return False, f"error: {exc}"


def _tool_names() -> list[str]:
    return [t["function"]["name"] for t in TOOLS]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


# --- control flow of the loop --------------------------------------------------------------


class _Stop(Exception):
    def __init__(self, outcome: Outcome, subtype: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.subtype = subtype


class OpenAIRuntime:
    """Starts OpenAI-compatible agents. Prices are USD per token (0: budget via turns only)."""

    def __init__(
        self,
        *,
        price_per_input_token: float = 0.0,
        price_per_output_token: float = 0.0,
        default_max_turns: int = 100,
        max_retries: int = 5,
        backoff_base_secs: float = 1.0,
        backoff_max_secs: float = 60.0,
        backoff_jitter: float = 0.1,
        connect_timeout_secs: float = 10.0,
        strip_env: Iterable[str] = (),
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if price_per_input_token < 0 or price_per_output_token < 0:
            raise ValueError("token prices must not be negative")
        self.price_per_input_token = price_per_input_token
        self.price_per_output_token = price_per_output_token
        self.default_max_turns = default_max_turns
        self.max_retries = max_retries
        self.backoff_base_secs = backoff_base_secs
        self.backoff_max_secs = backoff_max_secs
        self.backoff_jitter = backoff_jitter
        self.connect_timeout_secs = connect_timeout_secs
        self.strip_env = tuple(strip_env)
        self.transport = transport
        self.sleep = sleep

    def start(self, spec: SpawnSpec) -> OpenAIRunningAgent:
        agent = spec.agent
        if not agent.base_url:
            raise AgentStartError(f"agent {agent.name!r} has no base_url")
        api_key: str | None = None
        if agent.api_key_env:
            api_key = os.environ.get(agent.api_key_env) or None
            if api_key is None:
                raise AgentStartError(
                    f"agent {agent.name!r}: environment variable {agent.api_key_env} "
                    "(api_key_env) is not set"
                )
        if not spec.cwd.is_dir():
            raise AgentStartError(f"agent working directory {str(spec.cwd)!r} does not exist")
        strip = [*self.strip_env, *([agent.api_key_env] if agent.api_key_env else [])]
        return OpenAIRunningAgent(self, spec, api_key, agent_environment(spec.env, strip))


class OpenAIRunningAgent:
    """One attempt's conversation loop, running in a thread."""

    def __init__(
        self,
        runtime: OpenAIRuntime,
        spec: SpawnSpec,
        api_key: str | None,
        command_env: dict[str, str],
    ) -> None:
        self.spec = spec
        self._rt = runtime
        self._api_key = api_key
        self._secrets = [s for s in (api_key, *spec.secret_values()) if s]
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._result: AgentResult | None = None
        self._session_id: str | None = None
        self._started = time.monotonic()
        self.turns = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self._cost: float | None = None
        self.requests = 0
        self.workspace = Workspace(
            spec.cwd,
            env=command_env,
            command_timeout_secs=spec.agent.command_timeout_secs,
        )
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = spec.log_path.open("a", encoding="utf-8")
        self._thread = threading.Thread(
            target=self._main, name=f"openai-agent-{spec.story_id}", daemon=True
        )
        self._thread.start()

    # --- RunningAgent ---------------------------------------------------------------------

    @property
    def pid(self) -> None:
        return None

    @property
    def session_id(self) -> str | None:
        with self._lock:
            return self._session_id

    def poll(self) -> AgentResult | None:
        return self._result if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> AgentResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"agent for story {self.spec.story_id} still running")
        assert self._result is not None
        return self._result

    def kill(self) -> None:
        self._stop.set()
        self.workspace.close()
        self._done.wait(30.0)

    # --- logging --------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def _log(self, event: str, **fields: Any) -> None:
        record = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event}
        record.update(fields)
        line = self._redact(json.dumps(record, default=str))
        with self._lock:
            if not self._log_file.closed:
                self._log_file.write(line + "\n")
                self._log_file.flush()

    # --- the loop -------------------------------------------------------------------------

    def _main(self) -> None:
        outcome: Outcome = "failed"
        subtype = "error_during_execution"
        error: str | None = None
        try:
            with httpx.Client(
                transport=self._rt.transport,
                timeout=httpx.Timeout(
                    connect=self._rt.connect_timeout_secs,
                    # A response that takes longer than the inactivity timeout is the model
                    # going silent, the same thing the CLI watchdog catches.
                    read=self.spec.inactivity_timeout_secs,
                    write=60.0,
                    pool=self._rt.connect_timeout_secs,
                ),
            ) as client:
                self._converse(client)
            outcome, subtype = "completed", "success"
        except _Stop as stop:
            outcome, subtype, error = stop.outcome, stop.subtype, str(stop)
        except Exception as exc:
            log.exception("openai agent for story %s crashed", self.spec.story_id)
            error = self._redact(f"internal error: {exc}")
        finally:
            self.workspace.close()
            with self._lock:
                cost = self._cost
                session = self._session_id
            self._result = AgentResult(
                outcome=outcome,
                exit_code=None,
                signal=None,
                session_id=session,
                turns=self.turns,
                tokens_in=self.tokens_in,
                tokens_out=self.tokens_out,
                cost_usd=cost,
                result_subtype=subtype,
                log_path=self.spec.log_path,
                duration_secs=time.monotonic() - self._started,
                error=error,
                killed_on_request=self._stop.is_set(),
            )
            self._log(
                "end",
                outcome=outcome,
                subtype=subtype,
                error=error,
                turns=self.turns,
                tokens_in=self.tokens_in,
                tokens_out=self.tokens_out,
                cost_usd=cost,
            )
            with self._lock:
                self._log_file.close()
            self._done.set()

    def _messages(self) -> list[dict[str, Any]]:
        system = SYSTEM_PROMPT.format(worktree=self.spec.cwd)
        if self.spec.gate_failure is not None:
            system += "\n\n" + gate_failure_section(self.spec.gate_failure)
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": build_prompt(self.spec)},
        ]

    def _check_limits(self, max_turns: int, budget: float | None) -> None:
        spec = self.spec
        if self._stop.is_set():
            raise _Stop("failed", "error_during_execution", "killed on request")
        elapsed = time.monotonic() - self._started
        if spec.overall_timeout_secs is not None and elapsed >= spec.overall_timeout_secs:
            raise _Stop(
                "timed_out",
                "error_during_execution",
                f"overall timeout of {spec.overall_timeout_secs:g}s reached",
            )
        if self.turns >= max_turns:
            raise _Stop("failed", "error_max_turns", f"reached the turn cap ({max_turns})")
        with self._lock:
            cost = self._cost
        if budget is not None and cost is not None and cost >= budget:
            raise _Stop(
                "failed",
                "error_max_budget_usd",
                f"spent ${cost:.4f} of a ${budget:g} budget",
            )

    def _converse(self, client: httpx.Client) -> None:
        spec = self.spec
        max_turns = effective_max_turns(spec) or self._rt.default_max_turns
        budget = effective_max_budget(spec)
        if spec.resume_session_id:
            # Chat completions keep no server-side state: there is nothing to resume.
            self._log("resume_ignored", session=spec.resume_session_id)
        messages = self._messages()
        self._log(
            "start",
            story=spec.story_id,
            attempt=spec.attempt,
            model=spec.agent.model,
            max_turns=max_turns,
            budget_usd=budget,
            gate_failure_injected=spec.gate_failure is not None,
        )
        while True:
            self._check_limits(max_turns, budget)
            body = self._complete(client, messages)
            self.turns += 1
            with self._lock:
                if self._session_id is None:
                    self._session_id = f"openai-{uuid.uuid4()}"
            self._account(body.get("usage"))
            choices = body.get("choices")
            if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
                raise _Stop("failed", "error_during_execution", "response has no choices")
            choice = choices[0]
            message = _as_dict(choice.get("message"))
            tool_calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
            finish = choice.get("finish_reason")
            self._log(
                "response",
                turn=self.turns,
                finish_reason=finish,
                usage=body.get("usage"),
                tool_calls=[_summarise_call(c) for c in tool_calls],
                content=_clip(message.get("content")),
            )
            assistant: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
            if tool_calls:
                assistant["tool_calls"] = tool_calls
            messages.append(assistant)
            if not tool_calls:
                # Servers disagree on the name of a normal stop ("stop", "eos", none at all);
                # only a truncated or filtered answer means the model did not finish.
                if finish not in ("length", "content_filter"):
                    return
                raise _Stop(
                    "failed",
                    "error_during_execution",
                    f"the model stopped with finish_reason {finish!r}",
                )
            for call in tool_calls:
                if self._stop.is_set():
                    raise _Stop("failed", "error_during_execution", "killed on request")
                function = _as_dict(call.get("function"))
                name = str(function.get("name", ""))
                ok, text = self.workspace.dispatch(name, function.get("arguments"))
                self._log("tool", turn=self.turns, name=name, ok=ok, result=_clip(text))
                messages.append(
                    {"role": "tool", "tool_call_id": str(call.get("id", "")), "content": text}
                )

    def _account(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        self.tokens_in += prompt
        self.tokens_out += completion
        reported = usage.get("cost")
        rt = self._rt
        turn_cost: float | None = None
        if isinstance(reported, (int, float)) and not isinstance(reported, bool):
            turn_cost = float(reported)  # some gateways (OpenRouter) report the price paid
        elif rt.price_per_input_token or rt.price_per_output_token:
            turn_cost = prompt * rt.price_per_input_token + completion * rt.price_per_output_token
        if turn_cost is not None:
            with self._lock:
                self._cost = (self._cost or 0.0) + turn_cost

    def _complete(self, client: httpx.Client, messages: list[dict[str, Any]]) -> dict[str, Any]:
        spec = self.spec
        url = spec.agent.base_url.rstrip("/") + "/chat/completions"  # type: ignore[union-attr]
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        payload = {
            "model": spec.agent.model or "default",
            "messages": messages,
            "tools": TOOLS,
            "tool_choice": "auto",
        }
        failures = 0
        while True:
            if self._stop.is_set():
                raise _Stop("failed", "error_during_execution", "killed on request")
            self.requests += 1
            self._log("request", turn=self.turns + 1, messages=len(messages))
            retry_after: float | None = None
            try:
                response = client.post(url, json=payload, headers=headers)
            except httpx.ReadTimeout as exc:
                raise _Stop(
                    "inactive",
                    "error_during_execution",
                    f"no answer from the model within {spec.inactivity_timeout_secs:g}s",
                ) from exc
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    try:
                        body = response.json()
                    except ValueError as exc:
                        raise _Stop(
                            "failed", "error_during_execution", "the endpoint answered non-JSON"
                        ) from exc
                    if not isinstance(body, dict):
                        raise _Stop("failed", "error_during_execution", "unexpected answer")
                    return body
                detail = self._redact(response.text[:500])
                if response.status_code != 429 and response.status_code < 500:
                    raise _Stop(
                        "failed",
                        "error_during_execution",
                        f"the endpoint refused the request: HTTP {response.status_code}: {detail}",
                    )
                reason = f"HTTP {response.status_code}: {detail}"
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            failures += 1
            if failures > self._rt.max_retries:
                raise _Stop(
                    "failed",
                    "error_during_execution",
                    f"giving up after {failures} failed requests; last: {reason}",
                )
            delay = self._backoff(failures, retry_after)
            self._log("retry", failures=failures, reason=reason, delay_secs=round(delay, 3))
            self._pause(delay)

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        rt = self._rt
        delay = min(rt.backoff_max_secs, rt.backoff_base_secs * 2 ** (failures - 1))
        delay *= 1.0 + random.uniform(0.0, rt.backoff_jitter)
        if retry_after is not None:
            # The server knows when it will accept us again; waiting less only earns another
            # 429. Bounded all the same, so a bogus header cannot park the agent for hours.
            delay = max(delay, min(retry_after, max(rt.backoff_max_secs, 0.0) * 5))
        return delay

    def _pause(self, delay: float) -> None:
        if self._rt.sleep is not None:
            self._rt.sleep(delay)
            return
        if self.spec.overall_timeout_secs is not None:
            # No point sleeping past the overall deadline; the next limit check ends the run.
            remaining = self._started + self.spec.overall_timeout_secs - time.monotonic()
            delay = min(delay, max(remaining, 0.0))
        # Waiting on the stop event keeps kill() prompt during a long backoff.
        self._stop.wait(delay)


def _as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return max(value, 0)
    return 0


def _clip(value: object, limit: int = 500) -> object:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"... [{len(value) - limit} more chars]"
    return value


def _summarise_call(call: dict[str, Any]) -> dict[str, Any]:
    function = _as_dict(call.get("function"))
    return {"name": function.get("name"), "arguments": _clip(function.get("arguments"), 300)}
