"""A real pipeline for tests: a git repository, the scripted agent, a supervisor.

Everything is the production code path; only the coding agent is the scripted stand-in
(a real executable speaking the Claude Code CLI contract).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from domain.commands import Policy
from domain.config import StorylineConfig
from domain.stages import Stage
from domain.story import Story
from runners.supervisor import Supervisor
from service.application import StorylineApplication
from service.container import Service
from service.settings import Database

GIT_ID = ["-c", "user.name=test", "-c", "user.email=test@example.com"]

APP_PY = "def add(a, b):\n    return a - b\n"
TEST_PY = (
    "import sys\n"
    "from app import add\n"
    "if add(2, 3) != 5:\n"
    "    print('FAILED: add(2, 3) should be 5, got', add(2, 3))\n"
    "    sys.exit(1)\n"
    "print('ok: all checks passed')\n"
)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *GIT_ID, *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def make_repo(path: Path, files: dict[str, str] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    for name, content in (files or {"app.py": APP_PY, "check.py": TEST_PY}).items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


def scripted_agent(
    stage: str, script: Path, record: Path, name: str | None = None
) -> dict[str, Any]:
    return {
        "name": name or stage,
        "stage": stage,
        "runtime": "claude-code",
        "command": sys.executable,
        "args": [
            "-m",
            "runners.scripted_agent",
            "--script",
            str(script),
            "--record",
            str(record),
            "-p",
            "{{prompt}}",
            "--output-format",
            "stream-json",
            "--verbose",
        ],
    }


def make_config(tmp: Path, coder_script: dict[str, Any], **overrides: Any) -> StorylineConfig:
    script = tmp / "coder-script.json"
    script.write_text(json.dumps(coder_script))
    mm_script = tmp / "mergemaster-script.json"
    mm_script.write_text(json.dumps(overrides.pop("mergemaster_script", {"*": [{"say": "hi"}]})))
    raw: dict[str, Any] = {
        "base_branch": "main",
        "max_coders": 2,
        "max_retries": 2,
        "inactivity_timeout_secs": 30,
        "gates": {"commands": [[sys.executable, "check.py"]], "timeout_secs": 60},
        "merge_gates": {"commands": [[sys.executable, "check.py"]], "timeout_secs": 60},
        "agent": [
            scripted_agent("coder", script, tmp / "coder-calls.jsonl"),
            scripted_agent("mergemaster", mm_script, tmp / "mergemaster-calls.jsonl"),
        ],
    }
    raw.update(overrides)
    return StorylineConfig.model_validate(raw)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (an agent's env and secrets)
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(config: StorylineConfig) -> str:
    """The config as ``storyline.toml`` text (enough TOML for our own models)."""
    raw = config.model_dump(mode="json", exclude_none=True)
    lines: list[str] = []
    tables: list[str] = []
    for key, value in raw.items():
        if isinstance(value, dict):
            if not value:
                continue
            tables.append(f"[{key}]")
            for k, v in value.items():
                if isinstance(v, list) and v and isinstance(v[0], dict):
                    continue
                tables.append(f"{k} = {_toml_value(v)}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                tables.append(f"[[{key}]]")
                tables.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines + tables) + "\n"


def calls(tmp: Path, role: str = "coder") -> list[dict[str, Any]]:
    path = tmp / f"{role}-calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Pipeline:
    def __init__(self, service: Service, supervisor: Supervisor) -> None:
        self.service = service
        self.supervisor = supervisor
        self.app: StorylineApplication = service.app

    def add(self, story_id: str, depends_on: list[str] | None = None, **kw: Any) -> str:
        return self.app.create_story(
            story_id=story_id,
            name=kw.pop("name", f"story {story_id}"),
            description=kw.pop("description", "make add() add"),
            acceptance_criteria=["check.py passes"],
            depends_on=depends_on or [],
            actor="user:test",
            **kw,
        ).story.id

    def start(self, story_id: str) -> None:
        self.app.transition(story_id, "start_coding", actor="user:test")

    def story(self, story_id: str) -> Story:
        return self.app.get_story(story_id)

    def wait_for(
        self, story_id: str, predicate: Callable[[Story], bool], timeout: float = 150.0
    ) -> Story:
        deadline = time.monotonic() + timeout
        story = self.story(story_id)
        while time.monotonic() < deadline:
            story = self.story(story_id)
            if predicate(story):
                return story
            time.sleep(0.05)
        history = [(e.type, e.reason) for e in self.app.history(story_id)]
        raise AssertionError(f"story {story_id} stuck in {story.stage}: {history}")

    def wait_stage(self, story_id: str, *stages: Stage, timeout: float = 150.0) -> Story:
        return self.wait_for(story_id, lambda s: s.stage in stages and not s.running_agent, timeout)

    def types(self, story_id: str) -> list[str]:
        return [e.type for e in self.app.history(story_id)]


@contextmanager
def api_server(service: Service) -> Iterator[str]:
    """The real HTTP API on an ephemeral loopback port (agents report through it)."""
    import uvicorn

    from api.app import create_app
    from projections import ReadModels

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    read_models = ReadModels(service.db)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service, read_models), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        read_models.close()


@contextmanager
def running_pipeline(
    project: Path,
    db: Database,
    config: StorylineConfig,
    *,
    with_api: bool = False,
    **supervisor_kw: Any,
) -> Iterator[Pipeline]:
    app = StorylineApplication(db, policy=Policy(max_retries=config.max_retries))
    service = Service(project=project, db=db, config=config, app=app)
    with ExitStack() as stack:
        api_url = stack.enter_context(api_server(service)) if with_api else None
        supervisor = Supervisor(
            service, api_url=api_url, poll_interval=0.2, full_sweep_interval=1.0, **supervisor_kw
        )
        supervisor.start()
        # The application stays open so the test can read the history afterwards; the
        # database fixture drops the database (and its connections) at the end.
        stack.callback(supervisor.stop)
        yield Pipeline(service, supervisor)
