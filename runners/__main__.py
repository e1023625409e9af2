"""``python -m runners``: run the runners alone (no API) until SIGTERM or SIGINT.

Used by ``storyline runner`` and by the crash tests, which SIGKILL this process.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import threading

from runners.supervisor import Supervisor
from service.cmdline import hide_database_password
from service.config_file import ConfigError
from service.container import open_service
from service.settings import SettingsError


def main(argv: list[str] | None = None) -> int:
    hide_database_password()
    parser = argparse.ArgumentParser(prog="storyline runner")
    parser.add_argument("--project", default=None)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--api-url", default=None, help="STORYLINE_URL given to agents")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        service = open_service(args.project, args.database_url)
    except (ConfigError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    supervisor = Supervisor(
        service, api_url=args.api_url, poll_interval=args.poll_interval, full_sweep_interval=5.0
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    supervisor.start()
    print(f"runner started on {service.db.display} for {service.project}", flush=True)
    stop.wait()
    # A shutdown that hangs is a bug to find, not to wait out: after 20 s every thread's
    # stack goes to stderr (the runner's log), and the shutdown goes on.
    faulthandler.dump_traceback_later(20, exit=False)
    logging.getLogger(__name__).info("shutting down")
    supervisor.stop()
    service.close()
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    sys.exit(main())
