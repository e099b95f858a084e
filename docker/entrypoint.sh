#!/usr/bin/env bash
# Container entry point: start (creating on first run) the database in $PGTRAJ_HOME, install or upgrade
# pgtraj in it, print the connection URL, and stop cleanly on SIGTERM (docker stop).
set -euo pipefail
pgtraj db start --port 5432 --listen '*'
pgtraj install
echo "pgtraj ready: $(pgtraj db url | sed 's/@127.0.0.1:/@<this-host>:/')"
trap 'pgtraj db stop; exit 0' TERM INT
tail -F "$PGTRAJ_HOME/pgdata/server.log" &
wait $!
