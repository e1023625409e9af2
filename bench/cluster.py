"""A scale-out cluster on one machine: a bare git remote and runner processes, each with its
own clone, sharing one PostgreSQL database (used by ``bench.scale_out`` and the end-to-end
test ``tests/runners/test_scale_out.py``).

Every part is the production one: ``python -m runners --remote ...`` processes, real git,
real gate processes; only the coding agent is the scripted stand-in, which appends one JSON
line per invocation to ``agents.jsonl`` (its story, attempt, worker, pid and start time), so
spawns can be counted from the outside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domain.config import StorylineConfig
from tests.pipeline_support import dump_toml, scripted_agent

ROOT = Path(__file__).resolve().parents[1]
GIT_ID = ["-c", "user.name=storyline-bench", "-c", "user.email=bench@localhost"]

CHECK_PY = "import sys\nprint('ok: checks passed')\n"


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *GIT_ID, *args], cwd=cwd, capture_output=True, text=True, check=True
    )
    return out.stdout


def story_ids(n: int) -> list[str]:
    return [f"s{i:02d}" for i in range(1, n + 1)]


def coder_script(stories: list[str], agent_secs: float) -> dict[str, Any]:
    """Each story's coder works ``agent_secs`` then adds its own module and commits it."""
    script: dict[str, Any] = {}
    for sid in stories:
        actions: list[dict[str, Any]] = []
        if agent_secs > 0:
            actions.append({"sleep": agent_secs, "interval": 0.5})
        actions += [
            {"write": f"mods/{sid}.py", "content": f"NAME = {sid!r}\n"},
            {"commit": f"add {sid}"},
        ]
        script[sid] = actions
    return script


def create_stories(app: Any, stories: list[str], actor: str = "user:bench") -> None:
    """One story per id, each asking for its own module (as :func:`coder_script` codes it)."""
    for sid in stories:
        app.create_story(
            story_id=sid,
            name=f"module {sid}",
            description="add the module",
            acceptance_criteria=["the module exists"],
            actor=actor,
        )


@dataclass
class Cluster:
    root: Path
    database_url: str
    remote: Path
    record: Path
    lease_ttl: float = 3.0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        root: Path,
        database_url: str,
        stories: list[str],
        *,
        agent_secs: float,
        max_coders: int,
        merge_gate_secs: float = 0.0,
        lease_ttl: float = 3.0,
        max_merge_slots: int = 1,
    ) -> Cluster:
        """A seed repository (code, gates, ``storyline.toml``) pushed to a bare remote."""
        root.mkdir(parents=True, exist_ok=True)
        record = root / "agents.jsonl"
        script = root / "coder-script.json"
        script.write_text(json.dumps(coder_script(stories, agent_secs)))
        seed = root / "seed"
        seed.mkdir()
        git(seed, "init", "-q", "-b", "main")
        (seed / "check.py").write_text(CHECK_PY)
        merge_check = (
            f"import time\ntime.sleep({merge_gate_secs!r})\nprint('ok: merge checks passed')\n"
        )
        (seed / "merge_check.py").write_text(merge_check)
        (seed / ".gitignore").write_text(".storyline/\n")
        config = StorylineConfig.model_validate(
            {
                "base_branch": "main",
                "max_coders": max_coders,
                "max_merge_slots": max_merge_slots,
                "max_retries": 2,
                "abort_respawn_cap": 5,
                "inactivity_timeout_secs": 60,
                "gates": {"commands": [[sys.executable, "check.py"]], "timeout_secs": 60},
                "merge_gates": {
                    "commands": [[sys.executable, "merge_check.py"]],
                    "timeout_secs": 60,
                },
                "agent": [scripted_agent("coder", script, record)],
            }
        )
        (seed / "storyline.toml").write_text(dump_toml(config))
        git(seed, "add", "-A")
        git(seed, "commit", "-q", "-m", "initial")
        remote = root / "remote.git"
        subprocess.run(
            ["git", "clone", "-q", "--bare", str(seed), str(remote)], check=True, cwd=root
        )
        return cls(root, database_url, remote, record, lease_ttl)

    @property
    def url(self) -> str:
        return self.remote.as_uri()

    def start(
        self,
        worker_id: str,
        role: str = "worker",
        clone: str | None = None,
        api_url: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """A runner process in its own session, with its own clone directory."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
        env["PYTHONPATH"] = str(ROOT)
        log = self.root / f"{worker_id}.log"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runners",
                "--remote",
                self.url,
                "--clone-dir",
                str(self.root / "clones" / (clone or worker_id)),
                "--role",
                role,
                "--worker-id",
                worker_id,
                "--lease-ttl",
                str(self.lease_ttl),
                "--database-url",
                self.database_url,
                "--poll-interval",
                "0.2",
                *(["--api-url", api_url] if api_url else []),
            ],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        self.procs[worker_id] = proc
        self.logs[worker_id] = log
        return proc

    def agents(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        lines = self.record.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def kill_machine(self, worker_id: str) -> list[int]:
        """As if the worker's machine died: SIGKILL the runner and every agent it spawned
        (agents run in their own process groups, so killing the runner alone would leave
        them running, which a dead machine would not)."""
        proc = self.procs.pop(worker_id)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        killed = []
        for entry in self.agents():
            if entry["env"].get("STORYLINE_WORKER") == worker_id:
                try:
                    os.killpg(int(entry["pgid"]), signal.SIGKILL)
                    killed.append(int(entry["pid"]))
                except ProcessLookupError:
                    pass
        return killed

    def stop_all(self, timeout: float = 60.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def log_tail(self, chars: int = 4000) -> str:
        return "\n".join(
            f"--- {name}\n{path.read_text()[-chars:]}" for name, path in self.logs.items()
        )
