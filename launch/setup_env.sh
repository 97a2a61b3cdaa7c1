#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv at the repository root.
# Idempotent: skips the install when requirements.txt has not changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.requirements-$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned resolve (deepspeed asks for torch) would pull a CUDA build.
  .venv/bin/python -m pip install -q "$(grep '^torch==' requirements.txt)"
  # deepspeed builds from source and must see the installed torch, hence no build isolation.
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  rm -f .venv/.requirements-*
  touch "$stamp"
fi
