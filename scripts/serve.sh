#!/usr/bin/env bash
# Start shmstream on a fresh clone: make .venv with what serving needs (not the test tools),
# then `shmstream serve` with any flags. With no SHMSTREAM_UPSTREAM / --upstream it serves
# the built-in demo model. The tools are then `.venv/bin/shmstream ls` and so on.
set -euo pipefail
cd "$(dirname "$0")/.."
SHMSTREAM_EXTRAS="" . scripts/_venv.sh
exec "$VENV/bin/shmstream" serve "$@"
