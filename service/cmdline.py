"""Keep a database password given on the command line out of ``ps``.

Any user on the machine can read a process's command line (``/proc/PID/cmdline``), so a
``--database-url postgresql://user:password@...`` would show the password to all of them
for the process's life. The environment (``STORYLINE_DATABASE_URL``, readable only by the
same user) or a file named by ``STORYLINE_DATABASE_URL_FILE`` are the
right places; when the password comes on argv anyway, the visible command line is rewritten
at start-up with the password masked, and a one-line warning says where to put it instead.
The window between exec and the rewrite (the interpreter's start-up) cannot be closed from
inside the process: hence the warning.
"""

from __future__ import annotations

import sys

from service.settings import DATABASE_URL_ENV, DATABASE_URL_FILE_ENV, redact_url

OPTION = "--database-url"

WARNING = (
    f"warning: a database password on the command line is visible to every user of this "
    f"machine until it is masked; set ${DATABASE_URL_ENV} or ${DATABASE_URL_FILE_ENV} "
    f"(a file holding the URL) instead"
)

_hidden = False


def redacted_argv(argv: list[str]) -> list[str] | None:
    """``argv`` with the password of every ``--database-url`` masked, or None if none has one."""
    result: list[str] = []
    changed = False
    take_value = False
    for arg in argv:
        if take_value:
            masked = redact_url(arg)
            take_value = False
        elif arg.startswith(OPTION + "="):
            masked = OPTION + "=" + redact_url(arg[len(OPTION) + 1 :])
        else:
            masked = arg
            take_value = arg == OPTION
        changed = changed or masked != arg
        result.append(masked)
    return result if changed else None


def hide_database_password(argv: list[str] | None = None) -> bool:
    """Mask a ``--database-url`` password in this process's visible command line (once).

    ``argv``: the command line as the operating system shows it (default ``sys.orig_argv``,
    which still has the interpreter and its options). Returns whether anything was masked.
    """
    global _hidden
    if _hidden:
        return False
    shown = list(argv if argv is not None else sys.orig_argv)
    masked = redacted_argv(shown)
    if masked is None:
        return False
    import setproctitle

    setproctitle.setproctitle(" ".join(masked))
    _hidden = True
    print(WARNING, file=sys.stderr, flush=True)
    return True
