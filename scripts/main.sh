#!/usr/bin/env bash
# The main job, end to end, on a local database this script sets up itself: installs the PostgreSQL stack
# if missing, builds the client venv, starts the local database (`pgtraj db start`), installs pgtraj into
# it and runs the pipeline (`pgtraj quickstart`). Extra arguments go to `pgtraj quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO ./docker/install-debian.sh
./scripts/venv.sh
exec .venv/bin/pgtraj quickstart "$@"
