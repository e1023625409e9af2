#!/usr/bin/env bash
# Installs the pinned agent CLIs that the real-CLI tests drive into .tools/npm (gitignored).
# Idempotent: a prefix that already holds the pinned version is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

CLAUDE_CODE_VERSION="2.1.332"
CODEX_VERSION="0.171.0"
prefix="$PWD/.tools/npm"

if ! command -v npm >/dev/null 2>&1; then
  echo "install-agent-clis: npm is not installed; the real-CLI tests need it" >&2
  exit 1
fi

installed_version() {
  local manifest="$prefix/lib/node_modules/$1/package.json"
  [ -f "$manifest" ] && node -e 'process.stdout.write(require(process.argv[1]).version)' "$manifest"
}

if [ "$(installed_version @anthropic-ai/claude-code || true)" != "$CLAUDE_CODE_VERSION" ]; then
  echo "install-agent-clis: installing @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION into $prefix"
  # No post-install downloads, no update checks: the tests run offline.
  npm install --global --prefix "$prefix" --no-audit --no-fund --loglevel=error \
    "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION"
fi
if [ "$(installed_version @openai/codex || true)" != "$CODEX_VERSION" ]; then
  echo "install-agent-clis: installing @openai/codex@$CODEX_VERSION into $prefix"
  npm install --global --prefix "$prefix" --no-audit --no-fund --loglevel=error \
    "@openai/codex@$CODEX_VERSION"
fi
"$prefix/bin/claude" --version
"$prefix/bin/codex" --version
