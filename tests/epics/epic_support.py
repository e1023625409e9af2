"""A real epic pipeline for tests: a git repository, scripted planner and coders, the API.

Stories write marker files; the union gate (``union_check.py``) judges their combination the
way a project's integration tests would, so a union can fail although every story passed
its own gates: ``x.txt`` and ``y.txt`` together clash unless ``fix.txt`` reconciles them,
and ``goal.txt`` must exist when ``NEED_GOAL`` is set in ``union.cfg``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from domain.config import StorylineConfig
from domain.epic import Epic
from domain.epic_events import EpicStage
from service.epics import EpicService
from tests.pipeline_support import Pipeline, git, make_repo, scripted_agent

CHECK_PY = "print('ok: story gates pass')\n"
UNION_CHECK_PY = """\
import os, sys
def has(p):
    return os.path.exists(p)
problems = []
if has("x.txt") and has("y.txt") and not has("fix.txt"):
    problems.append("x.txt and y.txt clash (nothing reconciles them)")
if has("union.cfg") and "NEED_GOAL" in open("union.cfg").read() and not has("goal.txt"):
    problems.append("goal.txt is missing")
for p in problems:
    print("FAILED:", p)
sys.exit(1 if problems else 0)
"""


def epic_repo(path: Path, *, need_goal: bool = False) -> Path:
    files = {"check.py": CHECK_PY, "union_check.py": UNION_CHECK_PY, "README.md": "demo\n"}
    if need_goal:
        files["union.cfg"] = "NEED_GOAL\n"
    return make_repo(path, files)


def write(path: str, content: str | None = None) -> list[dict[str, Any]]:
    return [{"write": path, "content": content or f"{path}\n"}, {"commit": f"add {path}"}]


def subtask(name: str, footprint: list[str], depends_on: list[str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"Write {', '.join(footprint)}.",
        "acceptance_criteria": [f"{name} is written"],
        "depends_on": depends_on or [],
        "footprint": footprint,
    }


THREE = {
    "subtasks": [subtask("x", ["x.txt"]), subtask("y", ["y.txt"]), subtask("c", ["c.txt"])],
    "rationale": "three independent files",
}


def epic_config(
    tmp: Path,
    coder_script: dict[str, Any],
    planner_script: dict[str, Any] | None,
    **overrides: Any,
) -> StorylineConfig:
    coder = tmp / "coder-script.json"
    coder.write_text(json.dumps(coder_script))
    agents = [scripted_agent("coder", coder, tmp / "coder-calls.jsonl")]
    if planner_script is not None:
        planner = tmp / "planner-script.json"
        planner.write_text(json.dumps(planner_script))
        agents.append(scripted_agent("planner", planner, tmp / "planner-calls.jsonl"))
    epic = {
        "union_gates": {"commands": [[sys.executable, "union_check.py"]], "timeout_secs": 60},
        **overrides.pop("epic", {}),
    }
    raw: dict[str, Any] = {
        "base_branch": "main",
        "max_coders": 3,
        "max_retries": 1,
        "inactivity_timeout_secs": 30,
        "gates": {"commands": [[sys.executable, "check.py"]], "timeout_secs": 60},
        "merge_gates": {"commands": [[sys.executable, "check.py"]], "timeout_secs": 60},
        "agent": agents,
        "epic": epic,
    }
    raw.update(overrides)
    return StorylineConfig.model_validate(raw)


def add_epic(epics: EpicService, **kw: Any) -> str:
    return epics.create(
        name=kw.pop("name", "Markers"),
        goal=kw.pop("goal", "Write the marker files so that the union check passes."),
        acceptance_criteria=kw.pop("acceptance_criteria", ["union_check.py passes"]),
        actor="user:test",
        **kw,
    ).epic.id


def wait_epic(
    epics: EpicService,
    epic_id: str,
    predicate: Callable[[Epic], bool],
    timeout: float = 180.0,
) -> Epic:
    deadline = time.monotonic() + timeout
    epic = epics.get(epic_id)
    while time.monotonic() < deadline:
        epic = epics.get(epic_id)
        if predicate(epic):
            return epic
        if epic.stage is EpicStage.RUNNING and any(
            epics.app.get_story(s).stage.value == "blocked" for s in epic.round_stories
        ):
            break  # a story of the round is blocked: nothing will move without a person
        time.sleep(0.1)
    history = [(e.type, e.reason) for e in epics.history(epic_id)]
    stories = {s: epics.app.get_story(s).stage.value for s in epic.stories}
    raise AssertionError(f"epic {epic_id} stuck in {epic.stage}: {history}; stories {stories}")


def wait_epic_stage(
    epics: EpicService, epic_id: str, *stages: EpicStage, timeout: float = 180.0
) -> Epic:
    return wait_epic(
        epics, epic_id, lambda e: e.stage in stages and e.running_planner is None, timeout
    )


def files_on(repo: Path, ref: str) -> set[str]:
    return set(git(repo, "ls-tree", "-r", "--name-only", ref).split())


def epics_of(pipeline: Pipeline) -> EpicService:
    return EpicService(pipeline.app)
