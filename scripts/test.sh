#!/usr/bin/env bash
# Install everything the test suite needs on a fresh clone (Python venv, Debian packages
# when run as root), then run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
exec "$VENV/bin/python" -m pytest "$@"
