#!/usr/bin/env bash
# Create .venv and install storyline with its test tools, once per change of pyproject.toml.
# Needs only Python >= 3.11 and git on the machine; everything else comes from PyPI.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "storyline needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.storyline-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing storyline into .venv (first run only)..." >&2
  # pip's and the build backend's chatter (index notices, setuptools' note about editable
  # installs) goes to a log, shown only when the install fails.
  log=".venv/install.log"
  if ! { .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip &&
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "installing storyline failed (the log above is kept in $log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
