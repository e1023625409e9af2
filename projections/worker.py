"""A standalone projection follower: ``python -m projections.worker --project P``.

Runs :meth:`ProjectionRunner.start` until SIGTERM or SIGINT, then stops after the batch in
hand (killing it harder is safe too: every batch commits with its position, exactly once).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from projections.definitions import PROJECTION_NAMES
from projections.runner import ProjectionRunner
from service.container import ensure_schema
from service.settings import SettingsError, project_dir, resolve_database

logger = logging.getLogger("projections.worker")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m projections.worker", description="Follow the event log into projections."
    )
    parser.add_argument("--project", default=None, help="project directory (default: cwd)")
    parser.add_argument("--database-url", default=None, help="default: $STORYLINE_DATABASE_URL")
    parser.add_argument(
        "--projection",
        action="append",
        choices=PROJECTION_NAMES,
        help="run only this projection (repeatable; default: all)",
    )
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        db = resolve_database(project_dir(args.project), args.database_url)
        ensure_schema(db)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runner = ProjectionRunner(
        db,
        names=args.projection,
        batch_size=args.batch_size,
        poll_interval=args.poll_interval,
    )
    runner.start()
    logger.info("following %s for %s", db.display, ", ".join(runner.names))
    try:
        while not stop.wait(0.5):
            pass
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
