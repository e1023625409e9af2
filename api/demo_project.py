"""The demo's throwaway project: a small Python package with a real test suite as the gate,
a scripted agent script for six stories, and a ``storyline.toml`` that uses it.

The scripted agent is a real executable speaking the Claude Code CLI contract; only what it
writes comes from the script below instead of a model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIT_ID = ["-c", "user.name=storyline demo", "-c", "user.email=demo@storyline.local"]

FILES: dict[str, str] = {
    "README.md": "# calc\n\nA tiny calculator that storyline's demo agents extend.\n",
    "calc/__init__.py": '"""A tiny calculator."""\n',
    "calc/banner.py": 'BANNER = "calc"\n',
    "tests/__init__.py": "",
    "tests/test_banner.py": (
        "import unittest\n\nfrom calc.banner import BANNER\n\n\n"
        "class BannerTest(unittest.TestCase):\n"
        "    def test_banner_is_text(self):\n"
        "        self.assertIsInstance(BANNER, str)\n"
    ),
}


def _module(name: str, body: str) -> str:
    return f"def {name}(a, b):\n    return {body}\n"


def _test(name: str, cases: list[tuple[Any, Any, Any]]) -> str:
    lines = [
        "import unittest\n",
        f"from calc.{name} import {name}\n\n",
        f"class {name.title()}Test(unittest.TestCase):\n",
    ]
    for i, (a, b, want) in enumerate(cases):
        lines.append(
            f"    def test_{i}(self):\n        self.assertEqual({name}({a}, {b}), {want})\n"
        )
    return "".join(lines)


def _implement(
    name: str, body: str, cases: list[tuple[Any, Any, Any]], msg: str
) -> list[dict[str, Any]]:
    return [
        {"say": f"implementing {name}() with tests"},
        {"write": f"calc/{name}.py", "content": _module(name, body)},
        {"write": f"tests/test_{name}.py", "content": _test(name, cases)},
        {"commit": msg},
    ]


ADD = [(2, 3, 5), (-1, 1, 0)]
SUB = [(5, 3, 2), (0, 4, -4)]
MUL = [(3, 4, 12), (0, 9, 0)]
DIV = [(8, 2, 4), (9, 3, 3)]


@dataclass(frozen=True)
class DemoStory:
    id: str
    name: str
    description: str
    criteria: list[str]
    depends_on: list[str]
    expect: str
    """What the demo shows this story doing (printed with the final board)."""


STORIES = [
    DemoStory(
        "add",
        "Add two numbers",
        "calc.add(a, b) returns the sum.",
        ["add(2, 3) == 5"],
        [],
        "passes its gates first time and merges",
    ),
    DemoStory(
        "subtract",
        "Subtract",
        "calc.subtract(a, b) returns a - b.",
        ["subtract(5, 3) == 2"],
        [],
        "fails its gates once; the retry gets the failure injected and passes",
    ),
    DemoStory(
        "multiply",
        "Multiply",
        "calc.multiply(a, b) returns the product.",
        ["multiply(3, 4) == 12"],
        ["add"],
        "waits for 'add', then starts by itself",
    ),
    DemoStory(
        "banner-en",
        "English banner",
        "Set the banner to 'Hello'.",
        ["BANNER is a string"],
        [],
        "merges; its sibling then conflicts with it",
    ),
    DemoStory(
        "banner-fr",
        "French banner",
        "Set the banner to 'Bonjour'.",
        ["BANNER is a string"],
        [],
        "hits conflict_detected; a mergemaster resolves it through the API",
    ),
    DemoStory(
        "divide",
        "Divide",
        "calc.divide(a, b) returns a / b.",
        ["divide(8, 2) == 4"],
        [],
        "never passes its gates and is blocked",
    ),
]


def coder_script() -> dict[str, Any]:
    """What the scripted coder does, per story and attempt."""
    return {
        "add": _implement("add", "a + b", ADD, "add add()"),
        "subtract": {
            "1": _implement("subtract", "b - a", SUB, "add subtract()"),
            "2": [
                {"expect_in_prompt": "Your previous run's quality gates failed"},
                {"say": "the gate output says subtract is reversed; fixing"},
                {"write": "calc/subtract.py", "content": _module("subtract", "a - b")},
                {"commit": "fix subtract()"},
            ],
        },
        "multiply": _implement("multiply", "a * b", MUL, "add multiply()"),
        "banner-en": [
            {"write": "calc/banner.py", "content": 'BANNER = "Hello"\n'},
            {"commit": "English banner"},
        ],
        "banner-fr": [
            # A little slower, so that banner-en merges first and this one conflicts.
            {"sleep": 1.0, "interval": 0.25},
            {"write": "calc/banner.py", "content": 'BANNER = "Bonjour"\n'},
            {"commit": "French banner"},
        ],
        "divide": {"*": _implement("divide", "a // b + 1", DIV, "add divide()")},
        "*": [{"say": "nothing scripted for this story"}],
    }


def mergemaster_script() -> dict[str, Any]:
    return {
        "*": [
            {"say": "reading the conflict"},
            {"resolve_conflicts": "theirs"},
            {"commit": "resolve the banner conflict"},
            {"api": {"event": "merge_resolved", "reason": "kept the incoming banner"}},
        ]
    }


def _agent(stage: str, script: Path) -> str:
    args = [
        "-m",
        "runners.scripted_agent",
        "--script",
        str(script),
        "-p",
        "{{prompt}}",
        "--output-format",
        "stream-json",
        "--verbose",
    ]
    return (
        f'[[agent]]\nname = "{stage}"\nstage = "{stage}"\nruntime = "claude-code"\n'
        f"command = {json.dumps(sys.executable)}\nargs = {json.dumps(args)}\n"
    )


def config_text(project: Path) -> str:
    gate = json.dumps([sys.executable, "-m", "unittest", "discover", "-s", "tests", "-t", "."])
    return (
        "# storyline.toml written by `storyline demo`: the scripted agent stands in for a\n"
        "# real coding agent; the gates are the project's real test suite.\n"
        'base_branch = "main"\n'
        "max_coders = 3\n"
        "max_retries = 1\n"
        "max_mergemasters = 1\n"
        "inactivity_timeout_secs = 60\n"
        "[gates]\n"
        f"commands = [{gate}]\n"
        "timeout_secs = 60\n"
        "[merge_gates]\n"
        f"commands = [{gate}]\n"
        "timeout_secs = 60\n"
        + _agent("coder", project / ".storyline" / "demo" / "coder.json")
        + _agent("mergemaster", project / ".storyline" / "demo" / "mergemaster.json")
    )


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *GIT_ID, *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def create_project(project: Path) -> Path:
    """Write the demo repository with its config and scripts; returns its path."""
    project.mkdir(parents=True, exist_ok=True)
    if any(project.iterdir()):
        raise FileExistsError(f"{project} is not empty")
    git(project, "init", "-q", "-b", "main")
    for name, content in FILES.items():
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "calc: initial project")
    scripts = project / ".storyline" / "demo"
    scripts.mkdir(parents=True)
    (scripts / "coder.json").write_text(json.dumps(coder_script(), indent=1), encoding="utf-8")
    (scripts / "mergemaster.json").write_text(
        json.dumps(mergemaster_script(), indent=1), encoding="utf-8"
    )
    (project / "storyline.toml").write_text(config_text(project), encoding="utf-8")
    exclude = project / ".git" / "info" / "exclude"
    exclude.write_text(exclude.read_text() + "\n/.storyline/\n/storyline.toml\n")
    return project
