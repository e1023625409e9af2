"""The CLI starts without the web framework and the projections' SQL stack.

Every ``storyline`` command paid about a second of imports (FastAPI, SQLAlchemy) it never
used; a local ``storyline story list`` now takes about 0.4 s. This checks the imports, not
the time: a heavy import creeping back into ``api.cli`` fails here on any machine.
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "projections.runner")


def test_importing_the_cli_loads_no_server_or_projection_modules() -> None:
    probe = f"import sys, api.cli\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def test_the_projections_package_loads_its_parts_on_first_use() -> None:
    probe = (
        "import sys, projections\n"
        "before = 'sqlalchemy' in sys.modules\n"
        "runner = projections.ProjectionRunner\n"
        "after = 'sqlalchemy' in sys.modules\n"
        "print(before, after, runner.__module__, projections.PROJECTION_NAMES)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == (
        "False True projections.runner ('board', 'history', 'agent_runs', 'merge_queue', 'metrics')"
    )
