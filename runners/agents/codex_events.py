"""Parser for ``codex exec --json`` output (Codex CLI 0.171), onto the stream-json facts.

Codex prints one JSON object per line: ``thread.started`` (its ``thread_id`` is the session
``codex exec resume`` takes), ``turn.started``, ``item.started``/``item.completed`` (agent
messages, command executions, file changes, MCP calls, and non-fatal ``error`` items such as
a warning about unknown model metadata), then ``turn.completed`` with the usage or
``turn.failed``/``error`` with a message. It reports no cost and no model.

Rather than a second set of accessors, the events are folded into the result record that
:class:`StreamJsonParser` reads (``subtype``, ``is_error``, ``result``, ``usage``,
``num_turns``, ``api_error_status``, ``terminal_reason``), so the runner classifies both CLIs
with one set of rules.
"""

from __future__ import annotations

import re
from typing import Any

from runners.agents.stream_json import StreamJsonParser

# "exceeded retry limit, last status: 429 Too Many Requests" and
# "unexpected status 401 Unauthorized: ..." are how codex names the provider's answer.
_STATUS = re.compile(r"\bstatus:?\s+(\d{3})\b")
# Messages codex prints instead of the status for a provider outage (HTTP 5xx after its own
# retries, a stream that kept dropping).
_OUTAGE = re.compile(
    r"high demand|stream disconnected|exceeded retry limit|connection (?:refused|reset)|"
    r"error sending request|service unavailable|overloaded",
    re.IGNORECASE,
)
_RECONNECTING = "Reconnecting..."


class CodexEventParser(StreamJsonParser):
    """Feed it ``codex exec --json`` stdout lines; read the facts as from stream-json."""

    def __init__(self) -> None:
        super().__init__()
        self._turns_started = 0
        self._usage_in = 0
        self._usage_cached = 0
        self._usage_out = 0
        self._last_message: str | None = None
        self._error_messages: list[str] = []

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "thread.started":
            thread = event.get("thread_id")
            if isinstance(thread, str) and thread:
                self._session_id = thread
        elif kind == "turn.started":
            self._turns_started += 1
        elif kind == "item.completed":
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") == "agent_message":
                text = item.get("text")
                if isinstance(text, str):
                    self._last_message = text
        elif kind == "error":
            message = event.get("message")
            if isinstance(message, str) and message.startswith(_RECONNECTING):
                # The CLI retrying its provider ("Reconnecting... 2/5 (... status: 429 ...)"),
                # Claude Code's api_retry: the provider is failing, the agent is not hung.
                self._api_retries += 1
                match = _STATUS.search(message)
                if match:
                    self._last_retry_status = int(match.group(1))
            elif isinstance(message, str) and message:
                self._error_messages.append(message)
        elif kind == "turn.completed":
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._usage_in += _count(usage.get("input_tokens"))
                self._usage_cached += _count(usage.get("cached_input_tokens"))
                self._usage_out += _count(usage.get("output_tokens"))
            self._result = self._record(is_error=False, text=self._last_message)
        elif kind == "turn.failed":
            error = event.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            text = message if isinstance(message, str) and message else None
            text = text or (self._error_messages[-1] if self._error_messages else None)
            self._result = self._record(is_error=True, text=text)

    def _record(self, *, is_error: bool, text: str | None) -> dict[str, Any]:
        record: dict[str, Any] = {
            "type": "result",
            "subtype": "error_during_execution" if is_error else "success",
            "is_error": is_error,
            "num_turns": self._turns_started,
            # OpenAI counts cached tokens inside input_tokens; the stream-json record keeps
            # them apart, so they are moved to the cache field to be counted once.
            "usage": {
                "input_tokens": max(self._usage_in - self._usage_cached, 0),
                "cache_read_input_tokens": min(self._usage_cached, self._usage_in),
                "output_tokens": self._usage_out,
            },
        }
        if text is not None:
            record["result"] = text
        if is_error and text:
            record["errors"] = [text]
            match = _STATUS.search(text)
            if match:
                record["api_error_status"] = int(match.group(1))
                record["terminal_reason"] = "api_error"
            elif _OUTAGE.search(text):
                record["terminal_reason"] = "api_error"
        return record


def _count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return max(value, 0)
    return 0
