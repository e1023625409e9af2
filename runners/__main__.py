"""``python -m runners``: run the runners alone (no API) until SIGTERM or SIGINT.

Used by ``storyline runner`` and by the crash tests, which SIGKILL this process.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

from runners.git_base import GitError
from runners.remote import GitRemote
from runners.supervisor import Supervisor
from runners.worker_seat import ScaleOut
from service.cmdline import hide_database_password
from service.config_file import ConfigError
from service.container import open_service
from service.settings import DATABASE_URL_ENV, DATABASE_URL_FILE_ENV, SettingsError
from service.workers import default_worker_id

_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}$")


def default_clone_dir(url: str) -> Path:
    """Where a worker keeps its clone when not told: one directory per remote URL."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", url.rstrip("/").rsplit("/", 1)[-1])[:60] or "repo"
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    return base / "storyline" / "clones" / f"{name}-{digest}"


def main(argv: list[str] | None = None) -> int:
    hide_database_password()
    parser = argparse.ArgumentParser(prog="storyline runner")
    parser.add_argument("--project", default=None)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--api-url", default=None, help="STORYLINE_URL given to agents")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument(
        "--remote",
        default=None,
        help="git URL of the shared repository: run as a worker on several machines",
    )
    parser.add_argument("--clone-dir", default=None, help="this worker's clone of --remote")
    parser.add_argument("--role", choices=("worker", "merger", "all"), default="all")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--lease-ttl", type=float, default=15.0)
    parser.add_argument(
        "--shared-sessions",
        action="store_true",
        help="agent sessions live on storage every worker shares: resume across workers",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    scale_out = None
    project = args.project
    try:
        if args.remote is not None:
            scale_out, project = _scale_out(args)
        service = open_service(project, args.database_url)
    except (ConfigError, SettingsError, ValueError, GitError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    supervisor = Supervisor(
        service,
        api_url=args.api_url,
        poll_interval=args.poll_interval,
        full_sweep_interval=5.0,
        scale_out=scale_out,
    )
    # The handler only appends to a list, and the main thread polls it: a signal the
    # kernel hands to another thread wakes no blocking wait in the main thread (so a bare
    # ``Event.wait()`` could sleep through SIGTERM for good; seen in 1 run in 8 under load),
    # and a handler that takes a lock can deadlock with the code it interrupted.
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    supervisor.start()
    who = "" if scale_out is None else f" as {scale_out.role} {scale_out.worker_id}"
    print(f"runner started{who} on {service.db.display} for {service.project}", flush=True)
    while not stopping:
        time.sleep(0.2)
    # A shutdown that hangs is a bug to find, not to wait out: after 20 s every thread's
    # stack goes to stderr (the runner's log), and the shutdown goes on.
    faulthandler.dump_traceback_later(20, exit=False)
    logging.getLogger(__name__).info("shutting down")
    supervisor.stop()
    service.close()
    faulthandler.cancel_dump_traceback_later()
    return 0


def _scale_out(args: argparse.Namespace) -> tuple[ScaleOut, Path]:
    """Check the scale-out options and open (cloning if needed) this worker's clone."""
    if args.project is not None:
        raise ValueError("--remote and --project exclude each other: the clone is the project")
    if not (args.database_url or os.environ.get(DATABASE_URL_ENV)) and not os.environ.get(
        DATABASE_URL_FILE_ENV
    ):
        raise ValueError(
            "--remote needs the shared database: give --database-url (PostgreSQL) or set "
            f"${DATABASE_URL_ENV}; a worker's own SQLite file would share nothing"
        )
    worker_id = args.worker_id or default_worker_id()
    if not _WORKER_ID.match(worker_id):
        raise ValueError(
            f"--worker-id {worker_id!r}: use 1-200 letters, digits and . _ : @ / -, "
            "starting with a letter or digit"
        )
    if not 1.0 <= args.lease_ttl <= 3600.0:
        raise ValueError("--lease-ttl must be between 1 and 3600 seconds")
    clone = Path(args.clone_dir) if args.clone_dir else default_clone_dir(args.remote)
    remote = GitRemote.open_clone(args.remote, clone.resolve())
    options = ScaleOut(
        worker_id=worker_id,
        remote=remote,
        role=args.role,
        lease_ttl=args.lease_ttl,
        shared_sessions=args.shared_sessions,
    )
    return options, remote.repo


if __name__ == "__main__":
    sys.exit(main())
