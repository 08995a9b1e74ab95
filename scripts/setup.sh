#!/usr/bin/env bash
# Creates / updates the repo's virtual environment (.venv). Usage: scripts/setup.sh core|dev
#   core: what the main job needs (requirements.txt); dev: + torch, timm and pytest (requirements-dev.txt).
# Re-running is cheap: it reinstalls only when the requirement files changed.
set -euo pipefail
cd "$(dirname "$0")/.."
set_name="${1:-core}"
case "$set_name" in
  core) req=requirements.txt ;;
  dev) req=requirements-dev.txt ;;
  *) echo "usage: $0 core|dev" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=".venv/.installed-$set_name"
want="$(cat requirements*.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing the $set_name requirements into .venv (first time: a few minutes)..."
  log="$(mktemp)"  # pip and setuptools are chatty even with -q: show their output only if they fail
  if ! { .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req" &&
         .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .; } >"$log" 2>&1; then
    cat "$log"; rm -f "$log"; echo "setup failed" >&2; exit 1
  fi
  rm -f "$log"
  echo "done."
  echo "$want" > "$stamp"
fi
