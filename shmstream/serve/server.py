"""``shmstream serve``: run the service under gunicorn with the packaged configuration."""

from __future__ import annotations

import os
import sys

from shmstream.config import SettingError, Settings, specs
from shmstream.serve.startup import StartupError, check_bind, prepare

EXIT_USAGE = 2
EXIT_REFUSED = 1


def serve(args) -> int:
    """Validate the settings, hold the namespace and check the store and the address here
    (one-line errors, before gunicorn forks), then exec gunicorn so it owns this process id
    and receives signals directly."""
    flags = {name: getattr(args, name, None) for name, _ in specs()}
    try:
        settings = Settings.load(os.environ, flags)
    except SettingError as exc:
        print(f"shmstream serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    env = {**os.environ, **settings.to_env()}
    try:
        check_bind(settings.bind)
        lock = prepare(settings)
    except StartupError as exc:
        print(f"shmstream serve: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    lock.pass_through_exec(env)
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:shmstream.serve.gunicorn_config"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
    return 0  # not reached
