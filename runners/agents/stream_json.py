"""Incremental parser for ``claude -p --output-format stream-json --verbose`` output.

The stream is one JSON object per line: ``{"type":"system","subtype":"init","session_id":..}``
first, then ``assistant``/``user`` messages, and finally one ``result`` object carrying the
turn count, cost and token usage. Anything else on stdout (a warning from a wrapper script,
a half-written line from a killed process) is logged and skipped: a stray line must never
cost us the session id or the usage of an otherwise good run.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_MAX_LOGGED_CHARS = 200


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def tokens_in(self) -> int:
        """All prompt-side tokens the model processed, cached or not."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    @property
    def tokens_out(self) -> int:
        return self.output_tokens

    @classmethod
    def from_json(cls, raw: object) -> Usage:
        if not isinstance(raw, dict):
            return cls()
        return cls(
            input_tokens=_int(raw.get("input_tokens")),
            output_tokens=_int(raw.get("output_tokens")),
            cache_creation_input_tokens=_int(raw.get("cache_creation_input_tokens")),
            cache_read_input_tokens=_int(raw.get("cache_read_input_tokens")),
        )

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            self.cache_read_input_tokens + other.cache_read_input_tokens,
        )


def _int(value: object) -> int:
    # bool is an int subclass; a JSON true is not a token count.
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and math.isfinite(value):
        return max(int(value), 0)
    return 0


def _float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


class StreamJsonParser:
    """Feed it stdout lines as they arrive; read the accumulated facts at any time.

    Thread-safe: the reader thread feeds while the runner may read ``session_id``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._session_id: str | None = None
        self._model: str | None = None
        self._result: dict[str, Any] | None = None
        self._assistant_messages = 0
        # Per message id, the last usage seen: the CLI repeats a message's usage on each of
        # its content-block lines, so summing per line would count it several times.
        self._message_usage: dict[str, Usage] = {}
        self._anonymous_usage = Usage()
        # Refusals as the CLI announces them (``system/permission_denied``), for a run killed
        # before its result line; the result's own list wins when there is one.
        self._denials_seen: list[dict[str, Any]] = []
        self._api_retries = 0
        self._last_retry_status: int | None = None
        self.lines = 0
        self.skipped_lines = 0

    def feed(self, line: str | bytes) -> dict[str, Any] | None:
        """Parse one line; return the event object, or None for blank/garbage lines."""
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        text = line.strip()
        if not text:
            return None
        with self._lock:
            self.lines += 1
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            with self._lock:
                self.skipped_lines += 1
                first = self.skipped_lines == 1
            # Warn once per stream; a chatty wrapper would otherwise flood the service log.
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "skipping a stdout line that is not a stream-json object: %.*s",
                _MAX_LOGGED_CHARS,
                text,
            )
            return None
        with self._lock:
            self._apply(event)
        return event

    def _apply(self, event: dict[str, Any]) -> None:
        session = event.get("session_id")
        if isinstance(session, str) and session:
            # The latest id wins: a resumed run may be handed a new id, and the next resume
            # must name the session that holds this run's work.
            self._session_id = session
        kind = event.get("type")
        if kind == "system" and event.get("subtype") == "init":
            model = event.get("model")
            if isinstance(model, str):
                self._model = model
        elif kind == "system" and event.get("subtype") == "permission_denied":
            self._denials_seen.append(
                {"tool_name": event.get("tool_name"), "tool_input": event.get("message")}
            )
        elif kind == "system" and event.get("subtype") == "api_retry":
            self._api_retries += 1
            status = event.get("error_status")
            if isinstance(status, int) and not isinstance(status, bool):
                self._last_retry_status = status
        elif kind == "assistant":
            self._assistant_messages += 1
            message = event.get("message")
            if isinstance(message, dict) and "usage" in message:
                usage = Usage.from_json(message.get("usage"))
                msg_id = message.get("id")
                if isinstance(msg_id, str) and msg_id:
                    self._message_usage[msg_id] = usage
                else:
                    self._anonymous_usage = self._anonymous_usage + usage
        elif kind == "result":
            self._result = event

    # --- accumulated facts -----------------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        with self._lock:
            return self._session_id

    @property
    def model(self) -> str | None:
        with self._lock:
            return self._model

    @property
    def saw_result(self) -> bool:
        with self._lock:
            return self._result is not None

    @property
    def result_subtype(self) -> str | None:
        with self._lock:
            if self._result is None:
                return None
            subtype = self._result.get("subtype")
            return subtype if isinstance(subtype, str) else None

    @property
    def result_is_error(self) -> bool:
        """True when the result line reports a failure.

        Both signals count: the CLI reports some API errors as subtype ``success`` with
        ``is_error: true``.
        """
        with self._lock:
            if self._result is None:
                return False
            subtype = self._result.get("subtype")
            return self._result.get("is_error") is True or (
                isinstance(subtype, str) and subtype.startswith("error")
            )

    @property
    def result_text(self) -> str | None:
        with self._lock:
            if self._result is None:
                return None
            text = self._result.get("result")
            return text if isinstance(text, str) else None

    @property
    def turns(self) -> int | None:
        """``num_turns`` from the result; without one, the assistant messages seen so far."""
        with self._lock:
            if self._result is not None and "num_turns" in self._result:
                return _int(self._result.get("num_turns"))
            return self._assistant_messages or None

    @property
    def usage(self) -> Usage:
        """Usage from the result line; for a run killed before it, the sum of its messages.

        When the result's ``usage`` is all zeros but ``modelUsage`` holds figures (the CLI
        does this on ``error_max_budget_usd``), the per-model figures are the truth.
        """
        with self._lock:
            if self._result is not None and isinstance(self._result.get("usage"), dict):
                usage = Usage.from_json(self._result["usage"])
                if usage == Usage():
                    return self._model_usage_total()
                return usage
            total = self._anonymous_usage
            for usage in self._message_usage.values():
                total = total + usage
            return total

    def _model_usage_total(self) -> Usage:
        total = Usage()
        for figures in self._raw_model_usage().values():
            total = total + Usage(
                input_tokens=_int(figures.get("inputTokens")),
                output_tokens=_int(figures.get("outputTokens")),
                cache_creation_input_tokens=_int(figures.get("cacheCreationInputTokens")),
                cache_read_input_tokens=_int(figures.get("cacheReadInputTokens")),
            )
        return total

    def _raw_model_usage(self) -> dict[str, dict[str, Any]]:
        raw = self._result.get("modelUsage") if self._result is not None else None
        if not isinstance(raw, dict):
            return {}
        return {str(k): v for k, v in raw.items() if isinstance(v, dict)}

    @property
    def model_usage(self) -> dict[str, dict[str, float]]:
        """Per model the CLI used: ``tokens_in`` (cached included), ``tokens_out``, ``cost_usd``."""
        with self._lock:
            out: dict[str, dict[str, float]] = {}
            for name, figures in list(self._raw_model_usage().items())[:20]:
                usage = Usage(
                    input_tokens=_int(figures.get("inputTokens")),
                    output_tokens=_int(figures.get("outputTokens")),
                    cache_creation_input_tokens=_int(figures.get("cacheCreationInputTokens")),
                    cache_read_input_tokens=_int(figures.get("cacheReadInputTokens")),
                )
                out[name[:200]] = {
                    "tokens_in": usage.tokens_in,
                    "tokens_out": usage.tokens_out,
                    "cost_usd": max(_float(figures.get("costUSD")) or 0.0, 0.0),
                }
            return out

    def _result_str(self, key: str) -> str | None:
        value = self._result.get(key) if self._result is not None else None
        return value if isinstance(value, str) else None

    @property
    def stop_reason(self) -> str | None:
        with self._lock:
            return self._result_str("stop_reason")

    @property
    def terminal_reason(self) -> str | None:
        """Why the CLI's loop ended: ``completed``, ``max_turns``, ``budget_exhausted``,
        ``api_error`` (2.1.x)."""
        with self._lock:
            return self._result_str("terminal_reason")

    @property
    def duration_ms(self) -> int | None:
        with self._lock:
            if self._result is None or "duration_ms" not in self._result:
                return None
            return _int(self._result.get("duration_ms"))

    @property
    def errors(self) -> list[str]:
        """The result's ``errors`` list (e.g. "Reached maximum number of turns (2)")."""
        with self._lock:
            raw = self._result.get("errors") if self._result is not None else None
            if not isinstance(raw, list):
                return []
            return [str(e) for e in raw if isinstance(e, (str, int, float))]

    @property
    def permission_denials(self) -> list[dict[str, Any]]:
        """Tool calls the CLI refused: ``{"tool_name", "tool_input"}`` each."""
        with self._lock:
            raw = self._result.get("permission_denials") if self._result is not None else None
            if isinstance(raw, list):
                return [d for d in raw if isinstance(d, dict)]
            return list(self._denials_seen)

    @property
    def api_retries(self) -> int:
        """``system/api_retry`` lines seen: the provider failed and the CLI tried again."""
        with self._lock:
            return self._api_retries

    @property
    def api_error_status(self) -> int | None:
        """The provider's HTTP status when the run ended on an API error, else the last
        status the CLI retried on."""
        with self._lock:
            status = self._result.get("api_error_status") if self._result is not None else None
            if isinstance(status, int) and not isinstance(status, bool):
                return status
            return self._last_retry_status

    @property
    def tokens_in(self) -> int:
        return self.usage.tokens_in

    @property
    def tokens_out(self) -> int:
        return self.usage.tokens_out

    @property
    def cost_usd(self) -> float | None:
        with self._lock:
            if self._result is None:
                return None
            return _float(self._result.get("total_cost_usd"))
