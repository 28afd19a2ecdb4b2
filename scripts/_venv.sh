# Sourced by scripts/*.sh: make .venv (or $SHMSTREAM_VENV) and install shmstream into it.
# Set SHMSTREAM_EXTRAS first: "" installs what serving needs (serve.sh), "[test]" adds the
# test tools (test.sh). Each set is installed once, again only when pyproject.toml changes.
VENV="${SHMSTREAM_VENV:-.venv}"
EXTRAS="${SHMSTREAM_EXTRAS:-}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.shmstream-installed${EXTRAS:+-test}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing shmstream${EXTRAS} into $VENV ..." >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".${EXTRAS}"
    touch "$stamp"
fi
