#!/usr/bin/env bash
# Installs Debian's chromium for the browser tests (tests/browser/) and the board bench.
# Playwright drives this executable; it never downloads a browser of its own (only the
# package registries are reachable, and a pinned browser build would drift from Debian's).
# Idempotent and quick when chromium is already there. As root it installs with apt-get;
# otherwise it says how, and exits 1 (the tests then skip locally and fail under CI).
set -euo pipefail

CHROMIUM="${STORYLINE_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: $CHROMIUM is missing; the browser tests need Debian's chromium:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y chromium fonts-liberation" >&2
  echo "  (or set STORYLINE_CHROMIUM to another Chromium executable)" >&2
  exit 1
fi
echo "install-chromium: installing Debian's chromium (first run only)..." >&2
log="$(mktemp)"
# fonts-liberation: screenshots with real glyphs rather than boxes.
if ! { apt-get update -qq &&
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-liberation; } \
  >"$log" 2>&1; then
  cat "$log" >&2
  rm -f "$log"
  echo "install-chromium: apt-get failed (the log is above)" >&2
  exit 1
fi
rm -f "$log"
if [ ! -x "$CHROMIUM" ]; then
  echo "install-chromium: apt-get succeeded but $CHROMIUM is still missing" >&2
  exit 1
fi
