#!/usr/bin/env bash
# The test suite, from a fresh Debian 12 machine or a warm one: installs the PostgreSQL stack if missing
# (docker/install-debian.sh, idempotent), builds the client venv, then runs pytest against a throwaway
# cluster the suite starts itself. Extra arguments go to pytest (e.g. -k install, -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO ./docker/install-debian.sh
./scripts/venv.sh
exec .venv/bin/python -m pytest "$@"
