# Sourced by scripts/*.sh: make .venv with shmstream and its test extra installed.
VENV="${SHMSTREAM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.shmstream-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
