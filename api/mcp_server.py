"""``storyline mcp``: a stdio MCP server through which an agent reads and reports on its story.

Served for an epic (``STORYLINE_STORY_ID`` is ``epic-<n>``), it is the planner's instead:
``get_epic``, ``submit_plan`` and ``add_note`` on that epic only. A plan the epic refuses
is an answer (``accepted: false`` and the problems), not a tool error, so the planner reads
what to fix and submits again; each refusal is recorded and counts toward the attempts.

It is a client of a running ``storyline serve`` over HTTP, like the agent it serves: a
runner-spawned agent has exactly the server's URL and its attempt's story-scoped token
(``STORYLINE_URL``, ``STORYLINE_TOKEN``, ``STORYLINE_STORY_ID`` in its environment, never in
argv), and the server stays the one authority on what that token may do. The MCP server
also refuses, by itself, any story but its own, so the scope holds even against a server
that runs without tokens.

Every tool validates its input (pydantic, from the signature) and answers a refusal with
the server's error code and message (``forbidden: ...``, ``illegal_transition: ...``),
never a traceback. Long texts (gate output, event data) are cut to their tail, which is
where compilers and test runners print the decisive line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from api.client import TOKEN_ENV, URL_ENV, ClientError, StorylineClient
from api.mcp_prompts import (
    coder_prompt,
    epic_evaluator_prompt,
    evaluator_prompt,
    mergemaster_prompt,
    planner_prompt,
)
from domain.errors import DomainError
from domain.ids import is_epic_id, validate_story_id
from domain.plan import MAX_FOOTPRINT, MAX_SUBTASKS
from domain.review import MAX_SUMMARY, CriterionJudgement

STORY_ENV = "STORYLINE_STORY_ID"
SERVER_NAME = "storyline"
"""Claude Code names the tools ``mcp__storyline__<tool>`` after this (the allowlist uses it)."""

MAX_STRING = 2_000
"""Event data strings beyond this are cut to their tail in tool answers."""
DEFAULT_GATE_CHARS = 20_000
MAX_GATE_CHARS = 200_000

T = TypeVar("T")

StoryIdArg = Annotated[
    str | None,
    Field(
        default=None,
        max_length=64,
        description="Defaults to this attempt's story; no other story can be read.",
    ),
]
Text = Annotated[str, Field(min_length=1, max_length=10_000)]


class McpSettings(BaseModel):
    """Where the server is and which story this MCP server serves (from the environment)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: Annotated[str, Field(min_length=1, max_length=2_000)]
    story_id: str
    token: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("story_id")
    @classmethod
    def _story(cls, value: str) -> str:
        try:
            return validate_story_id(value)
        except DomainError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def from_env(
        cls, *, url: str | None = None, story_id: str | None = None, env: dict[str, str] | None
    ) -> McpSettings:
        environ = dict(os.environ) if env is None else env
        url = url or environ.get(URL_ENV)
        story = story_id or environ.get(STORY_ENV)
        missing = [name for name, value in ((URL_ENV, url), (STORY_ENV, story)) if not value]
        if missing or url is None or story is None:
            raise ValueError(
                "storyline mcp needs " + " and ".join(missing) + " (set by the runner for "
                "each agent attempt; --url and --story override them)"
            )
        token = environ.get(TOKEN_ENV) or None
        return cls(
            url=url,
            story_id=story,
            token=SecretStr(token) if token else None,
        )


def clip(value: Any, limit: int = MAX_STRING) -> Any:
    """``value`` with every string longer than ``limit`` cut to its tail (marked)."""
    if isinstance(value, str):
        if len(value) <= limit:
            return value
        return f"[... {len(value) - limit} characters cut ...]\n" + value[-limit:]
    if isinstance(value, list):
        return [clip(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: clip(v, limit) for k, v in value.items()}
    return value


def _refusal(exc: ClientError) -> ToolError:
    text = f"{exc.code}: {exc.message}" if exc.code else exc.message
    if exc.details:
        text += " " + json.dumps(exc.details, default=str)[:2_000]
    return ToolError(text)


def _story_attempt() -> int | None:
    value = os.environ.get("STORYLINE_ATTEMPT", "")
    return int(value) if value.isdigit() and int(value) >= 1 else None


class StoryTools:
    """The tools' behaviour, one story, one HTTP client (kept apart from the MCP wiring)."""

    def __init__(
        self,
        settings: McpSettings,
        client: StorylineClient | None = None,
        attempt: int | None = None,
    ) -> None:
        self.settings = settings
        token = settings.token.get_secret_value() if settings.token else ""
        # An empty token (not None) keeps the client from reading $STORYLINE_TOKEN itself.
        self.client = client or StorylineClient(settings.url, token=token, retries=2)
        self.attempt = attempt if attempt is not None else _story_attempt()
        """The agent's own attempt ($STORYLINE_ATTEMPT, set by the runner for each spawn)."""

    def own_story(self, story_id: str | None) -> str:
        if story_id is None or story_id == self.settings.story_id:
            return self.settings.story_id
        raise ToolError(
            f"forbidden: this MCP server serves story {self.settings.story_id} only, "
            f"not story {story_id!r}"
        )

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await anyio.to_thread.run_sync(fn)
        except ClientError as exc:
            raise _refusal(exc) from None

    async def get_story(self, story_id: str | None = None) -> dict[str, Any]:
        sid = self.own_story(story_id)
        story = await self._call(lambda: self.client.get_story(sid))
        return dict(clip(story))

    async def story_history(self, story_id: str | None = None, limit: int = 50) -> dict[str, Any]:
        sid = self.own_story(story_id)
        events = await self._call(lambda: self.client.history(sid))
        shown = events[-limit:]
        return {"story_id": sid, "total": len(events), "events": clip(shown)}

    async def gate_output(
        self, story_id: str | None = None, max_chars: int = DEFAULT_GATE_CHARS
    ) -> dict[str, Any]:
        sid = self.own_story(story_id)
        story = await self._call(lambda: self.client.get_story(sid))
        return {
            "story_id": sid,
            "stage": story["stage"],
            "retry_count": story["retry_count"],
            "last_gate_output": clip(story.get("last_gate_output"), max_chars),
            "merge_failure_kind": story.get("merge_failure_kind"),
            "merge_failure_details": clip(story.get("merge_failure_details"), max_chars),
            "conflicts": story.get("conflicts") or [],
        }

    async def _send(
        self, event: str, reason: str, data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        sid = self.settings.story_id
        story = await self._call(
            lambda: self.client.transition(sid, event, reason=reason, data=data)
        )
        return {
            "story_id": story["id"],
            "event": event,
            "stage": story["stage"],
            "version": story["version"],
            "legal_events": story["legal_events"],
        }

    async def report_merge_resolved(self, summary: str) -> dict[str, Any]:
        return await self._send("merge_resolved", summary)

    async def report_merge_gave_up(self, reason: str) -> dict[str, Any]:
        return await self._send("merge_gave_up", reason)

    async def add_note(self, text: str) -> dict[str, Any]:
        return await self._send("add_note", text)

    async def declare_dropped_hunk(
        self, file: str, side: str, hunk: str, reason: str
    ) -> dict[str, Any]:
        data = {"file": file, "side": side, "hunk": hunk}
        answer = await self._send("declare_dropped_hunk", reason, data)
        return {**answer, "declared": data}

    async def submit_review(
        self, criteria: list[CriterionJudgement], summary: str = ""
    ) -> dict[str, Any]:
        """The evaluator's verdict for its own attempt. Without $STORYLINE_ATTEMPT (a CLI
        that does not pass its environment on to the MCP server) it is the running
        evaluator's attempt: any other attempt's token is revoked by then, and the story
        refuses a verdict from anyone but its running evaluator anyway."""
        sid = self.settings.story_id
        attempt = self.attempt
        if attempt is None:
            story = await self._call(lambda: self.client.get_story(sid))
            running = story.get("running_agent") or {}
            if running.get("role") != "evaluator":
                raise ToolError(
                    f"illegal_transition: story {sid} has no evaluator running, so there is "
                    "no attempt to give a verdict for"
                )
            attempt = int(running["attempt"])
        data = {
            "attempt": attempt,
            "criteria": [c.model_dump(mode="json") for c in criteria],
            "summary": summary,
        }
        answer = await self._send("submit_review", f"verdict of evaluator attempt {attempt}", data)
        story = await self._call(lambda: self.client.get_story(sid))
        verdict: dict[str, Any] = next(
            (r for r in story.get("reviews") or [] if r.get("attempt") == attempt), {}
        )
        return {
            **answer,
            "attempt": attempt,
            "recorded": True,
            "score": verdict.get("score"),
            "all_met": verdict.get("all_met"),
            "next": "Exit now: storyline concludes the review once you have exited.",
        }

    async def story_for_prompt(self) -> dict[str, Any]:
        try:
            return await self.get_story()
        except ToolError as exc:
            # A prompt still helps without the story's details; say why they are missing.
            return {"id": self.settings.story_id, "name": f"(unavailable: {exc})"}


def build_server(tools: StoryTools) -> MCPServer:
    server: MCPServer = MCPServer(
        SERVER_NAME,
        instructions=(
            f"Tools for storyline story {tools.settings.story_id}: read the story, its history "
            "and gate output, add notes, (mergemaster) declare hunks dropped on purpose and "
            "report the merge verdict, (evaluator) submit the review verdict."
        ),
        log_level="WARNING",
    )

    @server.tool(description="The story this attempt works on: stage, counters, conflicts.")
    async def get_story(story_id: StoryIdArg = None) -> dict[str, Any]:
        return await tools.get_story(story_id)

    @server.tool(description="The story's audit trail, oldest first: the last `limit` events.")
    async def story_history(
        story_id: StoryIdArg = None,
        limit: Annotated[int, Field(ge=1, le=1_000)] = 50,
    ) -> dict[str, Any]:
        return await tools.story_history(story_id, limit)

    @server.tool(
        description="What the last gate run printed (its tail), and the merge failure if any."
    )
    async def gate_output(
        story_id: StoryIdArg = None,
        max_chars: Annotated[int, Field(ge=100, le=MAX_GATE_CHARS)] = DEFAULT_GATE_CHARS,
    ) -> dict[str, Any]:
        return await tools.gate_output(story_id, max_chars)

    @server.tool(
        description="Mergemaster verdict: the conflicts are resolved and committed in the merge "
        "workspace; the story goes back to the merge queue."
    )
    async def report_merge_resolved(summary: Text) -> dict[str, Any]:
        return await tools.report_merge_resolved(summary)

    @server.tool(
        description="Mergemaster verdict: the merge cannot be resolved without a person; "
        "`reason` says why. Final for this story's mergemaster."
    )
    async def report_merge_gave_up(reason: Text) -> dict[str, Any]:
        return await tools.report_merge_gave_up(reason)

    @server.tool(description="Add a note to the story's audit trail (you are its actor).")
    async def add_note(text: Text) -> dict[str, Any]:
        return await tools.add_note(text)

    @server.tool(
        description="Mergemaster: declare that your resolution leaves out one side's hunk on "
        "purpose, before report_merge_resolved. `file`, `side` (story or base) and `hunk` (the "
        "`@@ -a,b +c,d @@` header) exactly as the hunk check listed them; `reason` says why "
        "for the people who review the story's history. Undeclared drops send the resolution "
        "back."
    )
    async def declare_dropped_hunk(
        file: Annotated[str, Field(min_length=1, max_length=4_096)],
        side: Annotated[str, Field(pattern=r"^(story|base)$")],
        hunk: Annotated[str, Field(pattern=r"^@@ .* @@$", max_length=200)],
        reason: Text,
    ) -> dict[str, Any]:
        return await tools.declare_dropped_hunk(file, side, hunk, reason)

    @server.tool(
        description="Evaluator verdict, once per attempt: judge every acceptance criterion of "
        "the story by its number (from 0): met or not, a score from 0 to 1, and the evidence "
        "(file and line, test name, or command output); plus a one-paragraph summary. A "
        "malformed or incomplete verdict is refused with the reason and nothing is recorded."
    )
    async def submit_review(
        criteria: Annotated[list[CriterionJudgement], Field(min_length=1, max_length=100)],
        summary: Annotated[str, Field(max_length=MAX_SUMMARY)] = "",
    ) -> dict[str, Any]:
        return await tools.submit_review(criteria, summary)

    @server.prompt(description="How an evaluator judges this story and submits its verdict.")
    async def evaluator() -> str:
        return evaluator_prompt(await tools.story_for_prompt())

    @server.prompt(description="How a mergemaster resolves this story's conflict and reports.")
    async def mergemaster() -> str:
        return mergemaster_prompt(await tools.story_for_prompt())

    @server.prompt(description="How a coder reads gate output and adds notes.")
    async def coder() -> str:
        return coder_prompt(await tools.story_for_prompt())

    return server


class SubtaskArg(BaseModel):
    """One subtask as the planner writes it. Only the shape is checked here: the epic
    checks the rest (blank texts, names, dependencies, overlapping footprints) and answers
    with every problem at once."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(max_length=200, description="Unique within the plan.")]
    description: Annotated[
        str, Field(max_length=20_000, description="What to build, for the story's coder.")
    ]
    acceptance_criteria: Annotated[
        list[Annotated[str, Field(max_length=5_000)]],
        Field(max_length=50, description="How to tell the subtask is done (at least one)."),
    ]
    depends_on: Annotated[
        list[Annotated[str, Field(max_length=200)]],
        Field(
            max_length=MAX_SUBTASKS,
            description="Names of subtasks of this plan that must merge first.",
        ),
    ] = []
    footprint: Annotated[
        list[Annotated[str, Field(max_length=1_000)]],
        Field(
            max_length=MAX_FOOTPRINT,
            description="Paths it expects to touch, relative to the repository (a directory "
            "ends in '/'). Subtasks that may run at the same time must not overlap.",
        ),
    ] = []


class PlanArg(BaseModel):
    model_config = ConfigDict(extra="allow")

    subtasks: Annotated[list[SubtaskArg], Field(max_length=MAX_SUBTASKS)] = []
    prefer_single_session: bool = Field(
        default=False,
        description="True when the goal has no parallelism worth the coordination: it then "
        "runs as one story with the whole goal.",
    )
    rationale: Annotated[str, Field(max_length=10_000)] = ""


ATTEMPT_ENV = "STORYLINE_ATTEMPT"


class CriterionArg(BaseModel):
    """One criterion's judgement as the evaluator writes it (``domain.review`` checks the
    rest: every criterion judged once, by an index that exists)."""

    model_config = ConfigDict(extra="forbid")

    criterion: Annotated[
        int, Field(ge=0, le=99, description="The criterion's number in the epic's list, from 0.")
    ]
    met: bool
    score: Annotated[float, Field(ge=0.0, le=1.0, description="0 (absent) to 1 (fully met).")]
    evidence: Annotated[
        str,
        Field(
            min_length=1,
            max_length=4_000,
            description="What it rests on: a file and line, a test name, a command and its output.",
        ),
    ]


QuestionArg = Annotated[str, Field(min_length=1, max_length=2_000)]


class EpicTools:
    """The tools of an epic's agents (its planner, its evaluator): one epic, one HTTP client
    (kept apart from the MCP wiring). The attempt the questions or the verdict belong to is
    the agent's own (``$STORYLINE_ATTEMPT``, set by the runner): the epic refuses any other."""

    def __init__(
        self,
        settings: McpSettings,
        client: StorylineClient | None = None,
        *,
        attempt: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        token = settings.token.get_secret_value() if settings.token else ""
        self.client = client or StorylineClient(settings.url, token=token, retries=2)
        self._attempt = attempt
        self._env = env

    @property
    def epic_id(self) -> str:
        return self.settings.story_id

    @property
    def attempt(self) -> int:
        if self._attempt is not None:
            return self._attempt
        raw = (os.environ if self._env is None else self._env).get(ATTEMPT_ENV, "")
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ToolError(
                f"bad_request: {ATTEMPT_ENV} is not set to an attempt number ({raw!r}); the "
                "runner sets it for each agent attempt"
            )
        return value

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await anyio.to_thread.run_sync(fn)
        except ClientError as exc:
            raise _refusal(exc) from None

    async def get_epic(self) -> dict[str, Any]:
        epic = await self._call(lambda: self.client.get_epic(self.epic_id))
        return dict(
            clip(
                {
                    "id": epic["id"],
                    "name": epic["name"],
                    "goal": epic["goal"],
                    "acceptance_criteria": epic["acceptance_criteria"],
                    "stage": epic["stage"],
                    "version": epic["version"],
                    "legal_events": epic["legal_events"],
                    "plan": epic.get("plan"),
                    "last_plan_problems": epic["plan_problems"],
                    "planner_attempts": epic["planner"]["attempts"],
                    "failed_plan_attempts": epic["planner"]["failed_attempts"],
                    "single_session_reason": epic.get("single_session_reason"),
                    "questions": epic.get("questions"),
                    "interview": epic.get("interview") or [],
                    "evolution": epic.get("evolution", 0),
                    "evolutions": epic.get("evolutions") or [],
                    "evaluations": epic.get("evaluations") or [],
                    "integration_commit": epic.get("integration_commit"),
                    "fork_point": epic.get("fork_point"),
                },
                10_000,
            )
        )

    async def submit_plan(self, plan: PlanArg) -> dict[str, Any]:
        data = {"plan": plan.model_dump(mode="json")}
        epic = await self._call(
            lambda: self.client.epic_transition(self.epic_id, "submit_plan", data=data)
        )
        return {
            "epic_id": epic["id"],
            "accepted": bool(epic.get("accepted")),
            "problems": list(epic.get("problems") or []),
            "stage": epic["stage"],
            "version": epic["version"],
            "failed_plan_attempts": epic["planner"]["failed_attempts"],
            "single_session_reason": epic.get("single_session_reason"),
        }

    async def ask_questions(self, questions: list[str]) -> dict[str, Any]:
        data = {"attempt": self.attempt, "questions": list(questions)}
        epic = await self._call(
            lambda: self.client.epic_transition(self.epic_id, "ask_questions", data=data)
        )
        return {
            "epic_id": epic["id"],
            "stage": epic["stage"],
            "version": epic["version"],
            "questions": epic.get("questions") or list(questions),
            "next": "Exit now: a person answers, then a new planner attempt gets the answers "
            "in its prompt.",
        }

    async def submit_evaluation(
        self, criteria: list[CriterionArg], summary: str = ""
    ) -> dict[str, Any]:
        data = {
            "attempt": self.attempt,
            "criteria": [c.model_dump(mode="json") for c in criteria],
            "summary": summary,
        }
        epic = await self._call(
            lambda: self.client.epic_transition(self.epic_id, "submit_evaluation", data=data)
        )
        recorded = next(
            (
                e
                for e in reversed(epic.get("evaluations") or [])
                if e.get("attempt") == data["attempt"]
            ),
            None,
        )
        answer: dict[str, Any] = {
            "epic_id": epic["id"],
            "stage": epic["stage"],
            "version": epic["version"],
            "recorded": True,
        }
        if recorded is not None:
            answer["score"] = recorded.get("score")
            answer["all_met"] = recorded.get("all_met")
        return answer

    async def add_note(self, text: str) -> dict[str, Any]:
        epic = await self._call(
            lambda: self.client.epic_transition(self.epic_id, "add_note", reason=text)
        )
        return {
            "epic_id": epic["id"],
            "event": "add_note",
            "stage": epic["stage"],
            "version": epic["version"],
        }

    async def epic_for_prompt(self) -> dict[str, Any]:
        try:
            return await self.get_epic()
        except ToolError as exc:
            return {"id": self.epic_id, "name": f"(unavailable: {exc})"}


def build_planner_server(tools: EpicTools) -> MCPServer:
    """The server of an epic's agents: the planner's tools and the evaluator's (each is
    refused by the epic unless the attempt named is the running one of that kind)."""
    server: MCPServer = MCPServer(
        SERVER_NAME,
        instructions=(
            f"Tools for the agents of storyline epic {tools.epic_id}. The planner: read the "
            "goal and its acceptance criteria, submit a plan (subtasks with dependencies and "
            "footprints) or ask clarifying questions instead. The evaluator: submit the "
            "verdict on the integrated result. Both: add notes."
        ),
        log_level="WARNING",
    )

    @server.tool(
        description="The epic you plan: goal, acceptance criteria, stage, and the problems "
        "of your last refused plan (fix those first)."
    )
    async def get_epic() -> dict[str, Any]:
        return await tools.get_epic()

    @server.tool(
        description="Submit the plan. Answers accepted (true/false) and, when false, every "
        "problem to fix before submitting again; each refusal counts toward the epic's plan "
        "attempts."
    )
    async def submit_plan(plan: PlanArg) -> dict[str, Any]:
        return await tools.submit_plan(plan)

    @server.tool(
        description="Planner: instead of a plan, ask the person who owns the goal clarifying "
        "questions (1 to 10) when the goal is too vague to plan. The epic waits for the "
        "answers; then exit: the next planner attempt gets every question and answer in its "
        "prompt. Only a few rounds are allowed."
    )
    async def ask_questions(
        questions: Annotated[list[QuestionArg], Field(min_length=1, max_length=10)],
    ) -> dict[str, Any]:
        return await tools.ask_questions(questions)

    @server.tool(
        description="Evaluator: submit your verdict on the epic's integrated result, once: "
        "`criteria` has one entry per acceptance criterion of the epic (its number from 0), "
        "each met or not, a score from 0 to 1 and the evidence; `summary` in one paragraph. "
        "Under the threshold, the planner plans follow-up stories from your unmet criteria "
        "and evidence."
    )
    async def submit_evaluation(
        criteria: Annotated[list[CriterionArg], Field(min_length=1, max_length=100)],
        summary: Annotated[str, Field(max_length=4_000)] = "",
    ) -> dict[str, Any]:
        return await tools.submit_evaluation(criteria, summary)

    @server.tool(description="Add a note to the epic's audit trail (you are its actor).")
    async def add_note(text: Text) -> dict[str, Any]:
        return await tools.add_note(text)

    @server.prompt(description="How to plan this epic: subtasks, dependencies, footprints.")
    async def planner() -> str:
        return planner_prompt(await tools.epic_for_prompt())

    @server.prompt(description="How to evaluate this epic's integrated result and report.")
    async def epic_evaluator() -> str:
        return epic_evaluator_prompt(await tools.epic_for_prompt())

    return server


def run(url: str | None, story_id: str | None) -> None:
    """Serve on stdin/stdout until the client closes them."""
    try:
        settings = McpSettings.from_env(url=url, story_id=story_id, env=None)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"storyline mcp: {problems}") from None
    if is_epic_id(settings.story_id):
        build_planner_server(EpicTools(settings)).run("stdio")
    else:
        build_server(StoryTools(settings)).run("stdio")
