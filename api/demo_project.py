"""The demo's throwaway project: a small Python package with a real test suite as the gate,
a scripted agent script for seven stories and one epic, and a ``storyline.toml`` that uses it.

The epic's union gate is ``checks/operators.py``: an integration check the stories' own
gates do not run, so two stories can each pass theirs and still clash when put together.

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

OPERATORS_CHECK = """\
\"\"\"Integration check: every operator symbol in calc/*.py is claimed by one module only.\"\"\"
import pathlib
import re
import sys

owners = {}
for module in sorted(pathlib.Path("calc").glob("*.py")):
    found = re.search(r'^SYMBOL = "(.+)"$', module.read_text(), re.MULTILINE)
    if found:
        owners.setdefault(found.group(1), []).append(module.as_posix())
clashes = {symbol: paths for symbol, paths in owners.items() if len(paths) > 1}
for symbol, paths in sorted(clashes.items()):
    print(f"FAILED: operator symbol {symbol!r} is claimed by " + " and ".join(paths))
if not clashes:
    print(f"ok: {len(owners)} operator symbols, each claimed once:", *sorted(owners))
sys.exit(1 if clashes else 0)
"""

FILES: dict[str, str] = {
    "README.md": "# calc\n\nA tiny calculator that storyline's demo agents extend.\n",
    "calc/__init__.py": '"""A tiny calculator."""\n',
    "calc/banner.py": 'BANNER = "calc"\n',
    "checks/operators.py": OPERATORS_CHECK,
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
    review: bool | None = None
    """Reviewed by the evaluator before merging (the project leaves review off)."""


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
    DemoStory(
        "mean",
        "Mean",
        "calc.mean(a, b) returns the arithmetic mean of a and b.",
        ["mean(2, 4) == 3", "mean(1, 2) == 1.5 (the mean is not rounded)"],
        [],
        "passes its gates, but review finds a criterion unmet; the retry gets the "
        "evaluator's evidence and passes review",
        review=True,
    ),
]

MEAN_EVIDENCE = "calc/mean.py divides with //: mean(1, 2) returns 1, not 1.5"
"""What the evaluator finds in the first attempt, which is right for the tests it wrote."""


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
        "mean": {
            "1": _implement("mean", "(a + b) // 2", [(2, 4, 3)], "add mean()"),
            "2": [
                # The evaluator's evidence, injected by the review that sent the story back.
                {"expect_in_prompt": MEAN_EVIDENCE},
                {"say": "review says the mean is rounded down; dividing with /"},
                {"write": "calc/mean.py", "content": _module("mean", "(a + b) / 2")},
                {"write": "tests/test_mean.py", "content": _test("mean", [(2, 4, 3), (1, 2, 1.5)])},
                {"commit": "mean(): no rounding"},
            ],
        },
        **epic_coder_script(),
        "*": [{"say": "nothing scripted for this story"}],
    }


EPIC_ID = "epic-1"
"""The demo's epic: the first in its empty database (scripts are keyed by its stories' ids)."""


@dataclass(frozen=True)
class DemoEpic:
    name: str
    goal: str
    criteria: list[str]


EPIC = DemoEpic(
    "Operator symbols",
    "Add power, xor and modulo to calc: each a function in its own module with its own "
    "tests, and the operator symbol a parser will use for it (SYMBOL in the module).",
    [
        "power(2, 3) == 8, xor(6, 3) == 5, modulo(7, 3) == 1",
        "checks/operators.py passes: no symbol is claimed twice",
    ],
)
POW = [(2, 3, 8), (5, 0, 1)]
XOR = [(6, 3, 5), (1, 1, 0)]
MOD = [(7, 3, 1), (9, 3, 0)]


def _operator(
    name: str, body: str, symbol: str, cases: list[tuple[Any, Any, Any]]
) -> list[dict[str, Any]]:
    return [
        {
            "write": f"calc/{name}.py",
            "content": f"SYMBOL = {json.dumps(symbol)}\n\n\n" + _module(name, body),
        },
        {"write": f"tests/test_{name}.py", "content": _test(name, cases)},
    ]


def _subtask(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "acceptance_criteria": [f"{name}() is tested", f"calc/{name}.py sets SYMBOL"],
        "depends_on": [],
        "footprint": [f"calc/{name}.py", f"tests/test_{name}.py"],
    }


PLAN: dict[str, Any] = {
    "subtasks": [
        _subtask("power", "calc.power(a, b) returns a to the power b; pick its SYMBOL."),
        _subtask("xor", "calc.xor(a, b) returns the bitwise xor; pick its SYMBOL."),
        _subtask("modulo", "calc.modulo(a, b) returns a modulo b; pick its SYMBOL."),
    ],
    "rationale": "three independent modules; nothing shared but the symbol table",
}


def planner_script() -> dict[str, Any]:
    return {"*": [{"say": "three independent operations: one story each"}, {"submit_plan": PLAN}]}


def epic_coder_script() -> dict[str, Any]:
    """The epic's stories: power and xor both pick '^' (each passes its own tests; together
    they break the union's check); the replan story redoes that region with '**' for power."""
    story = {name: f"{EPIC_ID}.{n}" for n, name in enumerate(["power", "xor", "modulo"], 1)}
    return {
        story["power"]: [
            {"say": "power is ^ on most calculators"},
            *_operator("power", "a ** b", "^", POW),
            {"commit": "add power() with symbol ^"},
        ],
        story["xor"]: [
            {"say": "xor is ^ in Python"},
            *_operator("xor", "a ^ b", "^", XOR),
            {"commit": "add xor() with symbol ^"},
        ],
        story["modulo"]: [
            *_operator("modulo", "a % b", "%", MOD),
            {"commit": "add modulo() with symbol %"},
        ],
        f"{EPIC_ID}.r1": [
            {"expect_in_prompt": "is claimed by calc/power.py and calc/xor.py"},
            {"say": "power and xor both took ^: power gets ** as in Python, xor keeps ^"},
            *_operator("power", "a ** b", "**", POW),
            *_operator("xor", "a ^ b", "^", XOR),
            {"commit": "power is **, xor is ^"},
        ],
    }


def _judged(criterion: int, met: bool, score: float, evidence: str) -> dict[str, Any]:
    return {"criterion": criterion, "met": met, "score": score, "evidence": evidence}


def evaluator_script() -> dict[str, Any]:
    """What the scripted evaluator finds, per story and review attempt."""
    return {
        "mean": {
            "1": [
                {"say": "reading the diff against main and checking each criterion"},
                {
                    "submit_review": {
                        "criteria": [
                            _judged(0, True, 1.0, "tests/test_mean.py test_0: mean(2, 4) == 3"),
                            _judged(1, False, 0.1, MEAN_EVIDENCE),
                        ],
                        "summary": "right for even sums only",
                    }
                },
            ],
            "2": [
                {
                    "submit_review": {
                        "criteria": [
                            _judged(0, True, 1.0, "tests/test_mean.py test_0"),
                            _judged(1, True, 0.95, "tests/test_mean.py test_1: 1.5"),
                        ],
                        "summary": "both criteria met, with tests",
                    }
                }
            ],
        },
        "*": [{"say": "nothing scripted for this review"}],
    }


def mergemaster_script() -> dict[str, Any]:
    return {
        "*": [
            {"say": "reading the conflict"},
            {"resolve_conflicts": "theirs"},
            {"commit": "resolve the banner conflict"},
            # The English banner goes: declared, or the resolution is sent back unlanded.
            {
                "api": {
                    "event": "declare_dropped_hunk",
                    "reason": "one banner: the incoming French one replaces the English one",
                    "data": {"file": "calc/banner.py", "side": "base", "hunk": "@@ -1 +1 @@"},
                }
            },
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
    union = json.dumps([sys.executable, "checks/operators.py"])
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
        + _agent("planner", project / ".storyline" / "demo" / "planner.json")
        + _agent("evaluator", project / ".storyline" / "demo" / "evaluator.json")
        + "[review]\n"
        "# Off for the project: only the story that asks for review (mean) is reviewed.\n"
        "enabled = false\n"
        "min_score = 0.8\n" + "[epic]\n"
        "# The union gate: judges the integration branch once every story of the epic merged.\n"
        f"union_gates = {{ commands = [{union}], timeout_secs = 60 }}\n"
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
    (scripts / "planner.json").write_text(json.dumps(planner_script(), indent=1), encoding="utf-8")
    (scripts / "evaluator.json").write_text(
        json.dumps(evaluator_script(), indent=1), encoding="utf-8"
    )
    (project / "storyline.toml").write_text(config_text(project), encoding="utf-8")
    exclude = project / ".git" / "info" / "exclude"
    exclude.write_text(exclude.read_text() + "\n/.storyline/\n/storyline.toml\n")
    return project
