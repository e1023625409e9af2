"""An epic's plan as a planner submits it, and the rules that make a plan usable.

A plan is refused when it cannot be run as written: no subtasks, two subtasks with one name,
a dependency on a subtask the plan does not have, a dependency cycle, or two subtasks that
may run at the same time (neither depends on the other) and expect to touch the same paths:
their merges would conflict, and the planner is the one who can fix that (add a dependency,
or merge them). A plan whose subtasks *all* overlap has no parallelism worth the
coordination; it is valid but runs as one session (the seed's coupled-work fallback), as
does a plan with one subtask or one whose planner says ``prefer_single_session``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_SUBTASKS = 20
MAX_FOOTPRINT = 200
MAX_PATH = 4096


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _no_control(value: str, *, newlines: bool) -> str:
    for ch in value:
        if ch in "\n\t" and newlines:
            continue
        if ord(ch) < 32 or ord(ch) == 127:
            raise ValueError(f"contains a control character ({ord(ch):#04x})")
    return value


def normal_path(value: str) -> str:
    """A footprint path: relative, inside the repository, ``/``-separated, no ``..``."""
    _no_control(value, newlines=False)
    path = value.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    if not path or path in (".", "/"):
        raise ValueError("a footprint path must name a file or directory")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise ValueError(f"{value!r} is absolute; give paths relative to the repository")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{value!r} leaves the repository ('..')")
    return "/".join(parts) + ("/" if path.endswith("/") else "")


class Subtask(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: Annotated[str, Field(min_length=1, max_length=20_000)]
    acceptance_criteria: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=5_000)]],
        Field(min_length=1, max_length=50),
    ]
    # Bounded like names: an unknown dependency is quoted in the rejection's stored problems.
    depends_on: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=MAX_SUBTASKS)
    ] = Field(default_factory=list)
    """Names of other subtasks of the same plan."""
    footprint: Annotated[
        list[Annotated[str, Field(max_length=MAX_PATH)]], Field(max_length=MAX_FOOTPRINT)
    ] = Field(default_factory=list)
    """Paths (files, or directories ending in ``/``) the subtask expects to touch."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        _no_control(value, newlines=False)
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    @field_validator("description")
    @classmethod
    def _description(cls, value: str) -> str:
        _no_control(value, newlines=True)
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("acceptance_criteria")
    @classmethod
    def _criteria(cls, value: list[str]) -> list[str]:
        for item in value:
            _no_control(item, newlines=True)
            if not item.strip():
                raise ValueError("an acceptance criterion must not be blank")
        return value

    @field_validator("footprint")
    @classmethod
    def _footprint(cls, value: list[str]) -> list[str]:
        return sorted({normal_path(p) for p in value})


class Plan(_Strict):
    subtasks: Annotated[list[Subtask], Field(max_length=MAX_SUBTASKS)] = Field(default_factory=list)
    prefer_single_session: bool = False
    """The planner's judgement that the goal has no parallelism worth the coordination."""
    rationale: Annotated[str, Field(max_length=10_000)] = ""

    @field_validator("rationale")
    @classmethod
    def _rationale(cls, value: str) -> str:
        # Shown to people (CLI, board) like a description: no terminal escapes.
        return _no_control(value, newlines=True)


def _overlap(a: str, b: str) -> bool:
    if a == b:
        return True
    a_dir, b_dir = a.endswith("/"), b.endswith("/")
    return (a_dir and b.startswith(a)) or (b_dir and a.startswith(b))


def _shared(a: Subtask, b: Subtask) -> list[str]:
    return sorted({p for p in a.footprint for q in b.footprint if _overlap(p, q)})


def _ancestors(plan: Plan) -> dict[str, set[str]]:
    """For each subtask, every subtask it waits for, directly or not (cycles already refused)."""
    deps = {s.name: set(s.depends_on) for s in plan.subtasks}
    memo: dict[str, set[str]] = {}

    def walk(name: str) -> set[str]:
        if name not in memo:
            memo[name] = set()
            found: set[str] = set()
            for dep in deps.get(name, ()):
                found |= {dep} | walk(dep)
            memo[name] = found
        return memo[name]

    return {name: walk(name) for name in deps}


def _cycle(plan: Plan) -> list[str] | None:
    deps = {s.name: [d for d in s.depends_on] for s in plan.subtasks}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for dep in deps.get(name, []):
            if dep not in deps:
                continue
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if state.get(dep) is None:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[name] = 2
        return None

    for name in deps:
        if state.get(name) is None:
            found = visit(name)
            if found:
                return found
    return None


def plan_problems(plan: Plan) -> list[str]:
    """Why ``plan`` cannot be run as written (empty when it can), one sentence each."""
    problems: list[str] = []
    if not plan.subtasks and not plan.prefer_single_session:
        problems.append(
            "the plan has no subtasks (set prefer_single_session to run the goal whole)"
        )
    names = [s.name for s in plan.subtasks]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"two subtasks are named {name!r}; names must be unique")
    known = set(names)
    for s in plan.subtasks:
        for dep in s.depends_on:
            if dep == s.name:
                problems.append(f"subtask {s.name!r} depends on itself")
            elif dep not in known:
                problems.append(f"subtask {s.name!r} depends on {dep!r}, which the plan lacks")
        if len(set(s.depends_on)) != len(s.depends_on):
            problems.append(f"subtask {s.name!r} lists a dependency twice")
    cycle = _cycle(plan)
    if cycle:
        problems.append("dependency cycle: " + " -> ".join(cycle))
    if problems or plan.prefer_single_session or len(plan.subtasks) < 2:
        return problems
    if all_coupled(plan):
        return problems
    before = _ancestors(plan)
    subtasks = plan.subtasks
    for i, a in enumerate(subtasks):
        for b in subtasks[i + 1 :]:
            if a.name in before[b.name] or b.name in before[a.name]:
                continue
            shared = _shared(a, b)
            if shared:
                problems.append(
                    f"subtasks {a.name!r} and {b.name!r} may run at the same time and both "
                    f"expect to touch {', '.join(shared[:5])}: make one depend on the other, "
                    "or merge them"
                )
    return problems


def all_coupled(plan: Plan) -> bool:
    """Every pair of subtasks shares a footprint path: no parallelism worth the coordination."""
    subtasks = plan.subtasks
    if len(subtasks) < 2:
        return False
    return all(_shared(a, b) for i, a in enumerate(subtasks) for b in subtasks[i + 1 :])


def single_session_reason(plan: Plan) -> str | None:
    """Why a valid plan runs as one whole-goal session, or None when it farms out."""
    if plan.prefer_single_session:
        return "the planner found no parallelism worth the coordination (prefer_single_session)"
    if len(plan.subtasks) == 1:
        return "the plan has a single subtask"
    if all_coupled(plan):
        return (
            "every pair of subtasks expects to touch the same paths (footprints overlap throughout)"
        )
    return None


def parse_plan(data: object) -> tuple[Plan | None, list[str]]:
    """``(plan, [])`` for a usable plan, else ``(plan or None, problems)``; never raises."""
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'plan'}: {err['msg']}"
            for err in exc.errors()
        ]
        return None, problems[:50]
    return plan, plan_problems(plan)
