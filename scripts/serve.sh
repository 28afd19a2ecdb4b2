#!/usr/bin/env bash
# Start shmstream on a fresh clone: make the venv, then `shmstream serve` with any flags.
# With no SHMSTREAM_UPSTREAM / --upstream it serves the built-in demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
exec "$VENV/bin/shmstream" serve "$@"
