"""The scripted agent as an executable: its CLI contract, git actions and API calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from runners.agents import CliRuntime
from tests.agents.conftest import Scripted, SpecFactory, git

WAIT = 60.0


def run_agent(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "runners.scripted_agent", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


def stream(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def write_script(tmp_path: Path, script: object) -> Path:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script), encoding="utf-8")
    return path


# --- CLI contract -------------------------------------------------------------------------


def test_it_speaks_stream_json_like_the_real_cli(tmp_path: Path) -> None:
    script = write_script(tmp_path, {"*": [{"say": "one"}, {"say": "two"}]})
    proc = run_agent(
        ["-p", "do it", "--output-format", "stream-json", "--verbose", "--script", str(script)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    events = stream(proc.stdout)
    assert [e["type"] for e in events] == ["system", "assistant", "assistant", "result"]
    init, result = events[0], events[-1]
    assert init["subtype"] == "init" and init["session_id"]
    assert result["session_id"] == init["session_id"]
    assert result["subtype"] == "success" and result["num_turns"] == 2
    assert result["total_cost_usd"] == pytest.approx(0.002)
    assert result["usage"]["input_tokens"] == 200


def test_flags_in_both_forms_are_read_and_unknown_flags_ignored(tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    proc = run_agent(
        [
            "--dangerously-skip-permissions",
            "--append-system-prompt=SYS",
            "--max-turns=3",
            "--max-budget-usd",
            "0.5",
            "--model",
            "m1",
            "--resume",
            "sess-9",
            "--weird=1",
            "--record",
            str(record),
            "-p",
            "the prompt",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (entry,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert entry["prompt"] == "the prompt"
    assert entry["system_prompt"] == "SYS"
    assert (entry["max_turns"], entry["max_budget_usd"]) == (3, 0.5)
    assert (entry["model"], entry["resume"]) == ("m1", "sess-9")
    assert stream(proc.stdout)[0]["session_id"] == "sess-9"


def test_attempts_pick_their_entry_and_fall_back_to_the_last(tmp_path: Path) -> None:
    script = write_script(
        tmp_path,
        {
            "s1": {"1": [{"say": "first"}], "2": [{"say": "second"}]},
            "*": [{"say": "default"}],
        },
    )

    def said(story: str, attempt: int) -> str:
        proc = run_agent(
            ["--script", str(script), "-p", "x"],
            tmp_path,
            {"STORYLINE_STORY_ID": story, "STORYLINE_ATTEMPT": str(attempt)},
        )
        return stream(proc.stdout)[1]["message"]["content"][0]["text"]

    assert said("s1", 1) == "first"
    assert said("s1", 2) == "second"
    assert said("s1", 9) == "second"
    assert said("other", 1) == "default"


def test_a_bad_script_fails_before_any_session(tmp_path: Path) -> None:
    script = write_script(tmp_path, {"*": [{"teleport": "mars"}]})
    proc = run_agent(["--script", str(script), "-p", "x"], tmp_path)
    assert proc.returncode == 2
    assert "unknown action 'teleport'" in proc.stderr
    assert proc.stdout == ""


def test_the_budget_flag_stops_the_run(tmp_path: Path) -> None:
    script = write_script(tmp_path, {"*": [{"say": str(i), "cost_usd": 0.3} for i in range(5)]})
    proc = run_agent(["--script", str(script), "--max-budget-usd", "0.5", "-p", "x"], tmp_path)
    assert proc.returncode == 1
    result = stream(proc.stdout)[-1]
    assert result["subtype"] == "error_max_budget_usd" and result["num_turns"] == 2


def test_it_starts_without_importing_anything_heavy() -> None:
    code = (
        "import sys, runners.scripted_agent; "
        "print([m for m in ('httpx', 'pydantic', 'urllib.request', 'runners.agents') "
        "if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert proc.stdout.strip() == "[]"


# --- merge conflicts ----------------------------------------------------------------------


@pytest.fixture
def conflicted(repo: Path) -> Path:
    """``repo`` with a squash merge of a feature branch stopped on a conflict in app.txt."""
    (repo / "app.txt").write_text("start\nbase line\nend\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "app")
    git(repo, "checkout", "-q", "-b", "feature/story-7")
    (repo / "app.txt").write_text("start\nfeature line\nend\n")
    git(repo, "commit", "-q", "-am", "feature change")
    git(repo, "checkout", "-q", "main")
    (repo / "app.txt").write_text("start\nmain line\nend\n")
    git(repo, "commit", "-q", "-am", "main change")
    merge = subprocess.run(
        ["git", "merge", "--squash", "feature/story-7"], cwd=repo, capture_output=True, text=True
    )
    assert merge.returncode != 0 and "CONFLICT" in merge.stdout
    return repo


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("ours", "start\nmain line\nend\n"),
        ("theirs", "start\nfeature line\nend\n"),
        ("union", "start\nmain line\nfeature line\nend\n"),
    ],
)
def test_resolve_conflicts_rewrites_files_and_the_commit_lands(
    scripted: Scripted, make_spec: SpecFactory, conflicted: Path, mode: str, expected: str
) -> None:
    agent = scripted.config(
        {"7": [{"resolve_conflicts": mode}, {"commit": "Resolve story 7 merge"}]}
    )
    spec = make_spec(
        agent,
        conflicted,
        story_id="7",
        role="mergemaster",
        conflict_details="CONFLICT (content): Merge conflict in app.txt",
    )
    result = CliRuntime().start(spec).wait(WAIT)
    assert result.outcome == "completed", spec.log_path.read_text()
    assert git(conflicted, "show", "HEAD:app.txt") == expected
    # Keeping only our side leaves nothing to commit: the commit action skips a clean tree.
    last = "main change" if mode == "ours" else "Resolve story 7 merge"
    assert git(conflicted, "log", "-1", "--format=%s").strip() == last
    assert git(conflicted, "status", "--porcelain") == ""
    assert "CONFLICT (content): Merge conflict in app.txt" in scripted.records()[0]["prompt"]


# --- talking to the storyline API ---------------------------------------------------------


class FakeApi:
    """GET /stories/{id} and POST /stories/{id}/transitions, recording what arrives."""

    def __init__(self, post_status: int = 200) -> None:
        self.calls: list[dict[str, Any]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, payload: object) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                api.calls.append(
                    {"method": "GET", "path": self.path, "auth": self.headers["Authorization"]}
                )
                self._reply(200, {"id": "7", "stage": "merge_failure", "version": 11})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.calls.append(
                    {
                        "method": "POST",
                        "path": self.path,
                        "auth": self.headers["Authorization"],
                        "body": body,
                    }
                )
                if post_status != 200:
                    self._reply(post_status, {"detail": "stale version"})
                else:
                    self._reply(200, {"id": "7", "stage": "merge", "version": 12})

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api() -> Iterator[FakeApi]:
    server = FakeApi()
    yield server
    server.close()


def test_a_mergemaster_reports_through_the_api_with_its_scoped_token(
    scripted: Scripted, make_spec: SpecFactory, repo: Path, api: FakeApi
) -> None:
    agent = scripted.config(
        {"7": [{"api": {"event": "merge_gave_up", "reason": "semantic conflict in schema"}}]}
    )
    base = make_spec(agent, repo, story_id="7", role="mergemaster")
    spec = make_spec(
        agent,
        repo,
        story_id="7",
        role="mergemaster",
        env={**base.env, "STORYLINE_URL": api.url + "/"},
    )
    result = CliRuntime().start(spec).wait(WAIT)
    assert result.outcome == "completed", spec.log_path.read_text()
    get, post = api.calls
    assert get["path"] == "/stories/7" and post["path"] == "/stories/7/transitions"
    assert post["auth"] == f"Bearer {spec.env['STORYLINE_TOKEN']}"
    assert post["body"] == {
        "event": "merge_gave_up",
        "expected_version": 11,
        "reason": "semantic conflict in schema",
        "data": {},
    }
    assert spec.env["STORYLINE_TOKEN"] not in spec.log_path.read_text()


def test_a_refused_api_call_fails_the_agent(
    scripted: Scripted, make_spec: SpecFactory, repo: Path
) -> None:
    refusing = FakeApi(post_status=409)
    try:
        agent = scripted.config({"*": [{"api": {"event": "merge_resolved"}}]})
        base = make_spec(agent, repo)
        spec = make_spec(agent, repo, env={**base.env, "STORYLINE_URL": refusing.url})
        result = CliRuntime().start(spec).wait(WAIT)
    finally:
        refusing.close()
    assert result.outcome == "failed"
    assert result.exit_code == 4
    assert "HTTP 409" in spec.log_path.read_text()
