"""The first install of storyline prints no deprecation warning about its own metadata."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("domain", "projections", "api", "runners", "service")

pytestmark = pytest.mark.slow


def test_building_the_project_warns_about_nothing_in_its_metadata(tmp_path: Path) -> None:
    source = tmp_path / "storyline"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    # What the first `./storyline demo` does, minus the dependencies: pip builds the
    # project with the build backend pyproject.toml names, in an isolated environment.
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--disable-pip-version-check",
            "-v",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = built.stdout + built.stderr
    assert built.returncode == 0, output[-4000:]
    warnings = [
        line.strip() for line in output.splitlines() if re.search(r"deprecat", line, re.IGNORECASE)
    ]
    assert warnings == [], "\n".join(warnings)
    assert list((tmp_path / "dist").glob("storyline-*.whl"))
