"""``python -m bench`` runs end to end and prints its table (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_URL, require_postgres

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.postgres
def test_quick_raw_insert_prints_the_table(tmp_path: Path) -> None:
    require_postgres()
    output = tmp_path / "BENCHMARKS.md"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            "raw_insert",
            "--pg-admin-url",
            PG_ADMIN_URL,
            "--output",
            str(output),
            "--write",
            "yes",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| Row | Measurement | DB | Clients | Result |" in run.stdout
    assert "single-row INSERT commits" in run.stdout
    assert "commits/s" in run.stdout
    assert "Ratios and targets:" in run.stdout
    written = output.read_text()
    assert "## Quick run" in written and "single-row INSERT commits" in written
