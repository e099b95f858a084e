#!/usr/bin/env bash
# The client environment: .venv made with the system python3 (Python >= 3.11), pgtraj installed in editable
# mode with its test extras (ORM, training). Re-running is instant unless pyproject.toml changed.
# PGTRAJ_TORCH_SPEC picks the torch build (default: torch==2.13.0; for the CPU-only build from PyTorch's own
# index use e.g. PGTRAJ_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PGTRAJ_PYTHON:-/usr/bin/python3}
stamp=.venv/.pgtraj-pyproject
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && cmp -s pyproject.toml "$stamp"; then exit 0; fi
[ -x .venv/bin/python ] || { "$PYTHON" -m venv .venv && .venv/bin/pip install -q --disable-pip-version-check --upgrade pip; }
.venv/bin/python -c 'import torch' 2>/dev/null \
  || .venv/bin/pip install -q --disable-pip-version-check ${PGTRAJ_TORCH_SPEC:-torch==2.13.0}
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
cp pyproject.toml "$stamp"
