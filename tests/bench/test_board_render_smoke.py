"""``python -m bench --only board_render`` runs end to end in Chromium (no timing asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.board_render import browser_problem

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_board_render_prints_its_rows(tmp_path: Path) -> None:
    problem = browser_problem()
    if problem is not None:
        if os.environ.get("CI") or os.environ.get("STORYLINE_REQUIRE_BROWSER"):
            pytest.fail(f"the board bench is required here (CI) but cannot run: {problem}")
        pytest.skip(f"no browser: {problem}")
    output = tmp_path / "BENCHMARKS.md"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            "board_render",
            "--output",
            str(output),
            "--write",
            "yes",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for row, what in (
        ("8", "time to DOMContentLoaded"),
        ("8f", "first card in every non-empty column"),
        ("8e", "event commit to card moved"),
    ):
        line = next((x for x in run.stdout.splitlines() if x.startswith(f"| {row} |")), None)
        assert line is not None, run.stdout + run.stderr[-3000:]
        assert what in line and "10,000 stories" in line
        # A figure in ms, not "ERROR" or "PENDING".
        assert re.search(r"\| [\d.,]+ ms \|", line), line
    assert "row 8e median, event commit to card moved" in run.stdout
    assert "## Quick run" in output.read_text()
