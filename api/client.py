"""A small HTTP client for a running storyline server (the CLI's ``--url``, agents, tests).

Methods mirror the application layer and return the API's JSON. Every failure answer is
raised as :class:`ClientError` carrying the server's error shape. Mutating calls always send
an ``Idempotency-Key`` (a fresh one unless given) and retry a dropped connection with the
same key, so a retry never applies a command twice. A ``409 idempotency_key_in_use`` (an
earlier attempt with the key is still running on the server, or its server died and the
claim is not released yet) is sent again with back-off, a bounded number of times.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

URL_ENV = "STORYLINE_URL"
TOKEN_ENV = "STORYLINE_TOKEN"


class ClientError(Exception):
    """An error answer (or no answer) from the server: ``status`` is 0 when unreachable."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    @classmethod
    def from_response(cls, response: httpx.Response) -> ClientError:
        try:
            error = response.json()["error"]
            return cls(
                response.status_code,
                str(error["code"]),
                str(error["message"]),
                error.get("details"),
            )
        except Exception:
            text = response.text[:500] if response.content else response.reason_phrase
            return cls(response.status_code, "http_error", f"HTTP {response.status_code}: {text}")


class StorylineClient:
    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        in_use_retries: int = 6,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base = url or os.environ.get(URL_ENV)
        if not base:
            raise ValueError(f"no server URL: pass url or set {URL_ENV}")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = base.rstrip("/")
        self.retries = retries
        self.in_use_retries = in_use_retries
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> StorylineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        headers = {}
        mutating = method != "GET"
        if mutating:
            headers["Idempotency-Key"] = idempotency_key or uuid.uuid4().hex
        query = {k: v for k, v in (params or {}).items() if v is not None}
        attempt = 0
        in_use = 0
        while True:
            try:
                response = self._http.request(
                    method, path, json=json, params=query, headers=headers
                )
            except httpx.TransportError as exc:
                # Safe to resend: reads have no effect and writes carry the same key.
                if attempt >= self.retries:
                    raise ClientError(0, "unreachable", f"{self.base_url}: {exc}") from None
                attempt += 1
                time.sleep(0.2 * attempt)
                continue
            if response.status_code == 503 and attempt < self.retries:
                # The server's database was busy or away: nothing was committed, and a
                # write carries the same idempotency key, so sending it again is safe.
                attempt += 1
                time.sleep(0.2 * attempt)
                continue
            if response.status_code == 409 and mutating and in_use < self.in_use_retries:
                error = ClientError.from_response(response)
                if error.code == "idempotency_key_in_use":
                    # The server already waited a few seconds for the first attempt; the key
                    # is freed when that attempt answers or its owner is found gone.
                    in_use += 1
                    time.sleep(min(0.25 * 2 ** (in_use - 1), 2.0))
                    continue
                raise error
            if response.status_code >= 400:
                raise ClientError.from_response(response)
            return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _transition(
        self,
        subject: str,
        event: str,
        expected_version: int | None,
        reason: str | None,
        data: dict[str, Any] | None,
        *,
        idempotency_key: str | None,
        wait: bool = False,
    ) -> dict[str, Any]:
        """Send a story's or an epic's transition (``subject`` is its path): one body for both."""
        body = {
            "event": event,
            "expected_version": expected_version,
            "reason": reason,
            "data": data or {},
        }
        result: dict[str, Any] = self._json(
            "POST",
            f"{subject}/transitions",
            json=body,
            params={"wait": "true" if wait else None},
            idempotency_key=idempotency_key,
        )
        return result

    # ------------------------------------------------------------------ commands

    def create_story(
        self,
        *,
        name: str,
        acceptance_criteria: Sequence[str],
        description: str = "",
        depends_on: Sequence[str] = (),
        epic: str | None = None,
        priority: int = 0,
        story_id: str | None = None,
        reason: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        review: bool | None = None,
    ) -> dict[str, Any]:
        """``review``: True or False to decide for this story, None for the project's."""
        body: dict[str, Any] = {
            "name": name,
            "description": description,
            "acceptance_criteria": list(acceptance_criteria),
            "depends_on": list(depends_on),
            "epic": epic,
            "priority": priority,
            "id": story_id,
            "reason": reason,
        }
        if review is not None:
            body["review"] = review
        result: dict[str, Any] = self._json(
            "POST",
            "/stories",
            json=body,
            params={"wait": "true" if wait else None},
            idempotency_key=idempotency_key,
        )
        return result

    def transition(
        self,
        story_id: str,
        event: str,
        *,
        expected_version: int | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
    ) -> dict[str, Any]:
        return self._transition(
            f"/stories/{_segment(story_id)}",
            event,
            expected_version,
            reason,
            data,
            idempotency_key=idempotency_key,
            wait=wait,
        )

    # ------------------------------------------------------------------ queries

    def get_story(self, story_id: str, *, as_of: int | str | None = None) -> dict[str, Any]:
        params = {"as_of": str(as_of) if as_of is not None else None}
        result: dict[str, Any] = self._json("GET", f"/stories/{_segment(story_id)}", params=params)
        return result

    def history(self, story_id: str) -> list[dict[str, Any]]:
        body = self._json("GET", f"/stories/{_segment(story_id)}/history")
        return list(body["events"])

    def story_reviews(self, story_id: str) -> dict[str, Any]:
        """Every review verdict of the story, oldest first, with ``pending_review`` and
        ``last_review_failure``."""
        result: dict[str, Any] = self._json("GET", f"/stories/{_segment(story_id)}/reviews")
        return result

    def list_stories(
        self, *, stage: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = self._json(
            "GET", "/stories", params={"stage": stage, "limit": limit, "cursor": cursor}
        )
        return result

    def events(self, *, after: int = 0, limit: int = 100) -> dict[str, Any]:
        result: dict[str, Any] = self._json(
            "GET", "/events", params={"after": after, "limit": limit}
        )
        return result

    def board(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/board")
        return result

    def merge_queue(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/merge-queue")["queue"])

    def agent_runs(self, *, story_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        body = self._json("GET", "/agents/runs", params={"story_id": story_id, "limit": limit})
        return list(body["runs"])

    def healthz(self) -> dict[str, Any]:
        response = self._http.get("/healthz")
        if response.status_code not in (200, 503):
            raise ClientError.from_response(response)
        result: dict[str, Any] = response.json()
        return result

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    # ------------------------------------------------------------------ epics

    def create_epic(
        self,
        *,
        name: str,
        goal: str,
        acceptance_criteria: Sequence[str],
        max_budget_usd: float | None = None,
        reason: str | None = None,
        idempotency_key: str | None = None,
        review: bool | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": name,
            "goal": goal,
            "acceptance_criteria": list(acceptance_criteria),
            "max_budget_usd": max_budget_usd,
            "reason": reason,
        }
        if review is not None:
            body["review"] = review
        result: dict[str, Any] = self._json(
            "POST", "/epics", json=body, idempotency_key=idempotency_key
        )
        return result

    def epic_transition(
        self,
        epic_id: str,
        event: str,
        *,
        expected_version: int | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """The epic after the event; ``submit_plan`` adds ``accepted`` and ``problems`` (a
        refused plan is an answer, not a ClientError)."""
        return self._transition(
            f"/epics/{_segment(epic_id)}",
            event,
            expected_version,
            reason,
            data,
            idempotency_key=idempotency_key,
        )

    def answer_questions(
        self,
        epic_id: str,
        answers: Sequence[str],
        *,
        reason: str | None = None,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Answer the planner's questions (one answer each, in order): the epic after it."""
        body: dict[str, Any] = {
            "answers": list(answers),
            "reason": reason,
            "expected_version": expected_version,
        }
        result: dict[str, Any] = self._json(
            "POST",
            f"/epics/{_segment(epic_id)}/answers",
            json=body,
            idempotency_key=idempotency_key,
        )
        return result

    def epic_evaluations(self, epic_id: str) -> dict[str, Any]:
        """The epic's evaluations, evolutions, discarded evolutions, best and final verdict."""
        result: dict[str, Any] = self._json("GET", f"/epics/{_segment(epic_id)}/evaluations")
        return result

    def get_epic(self, epic_id: str, *, as_of: int | str | None = None) -> dict[str, Any]:
        params = {"as_of": str(as_of) if as_of is not None else None}
        result: dict[str, Any] = self._json("GET", f"/epics/{_segment(epic_id)}", params=params)
        return result

    def list_epics(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/epics")["epics"])

    def epic_history(self, epic_id: str) -> list[dict[str, Any]]:
        body = self._json("GET", f"/epics/{_segment(epic_id)}/history")
        return list(body["events"])

    def stream(
        self, *, after: int | None = None, last_event_id: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Follow ``/events/stream``: yields each event's JSON (``position`` included).

        Resumes after ``last_event_id`` (what a reconnecting client sends) or ``after``;
        with neither, only events committed from now on.
        """
        import orjson

        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        params = {"after": after} if after is not None else {}
        timeout = httpx.Timeout(self._http.timeout.connect, read=None)
        with self._http.stream(
            "GET", "/events/stream", params=params, headers=headers, timeout=timeout
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise ClientError.from_response(response)
            for message in parse_sse(response.iter_lines()):
                if "data" in message:
                    yield orjson.loads(message["data"])


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Messages of a server-sent event stream (comments and ``retry:`` dropped)."""
    message: dict[str, str] = {}
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if message:
                yield message
                message = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data" and "data" in message:
            message["data"] += "\n" + value
        elif name in ("id", "event", "data"):
            message[name] = value
    if message:
        yield message


def _segment(story_id: str) -> str:
    from urllib.parse import quote

    return quote(story_id, safe="")


__all__ = ["ClientError", "StorylineClient", "parse_sse"]
