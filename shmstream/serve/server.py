"""``shmstream serve``: run the service under gunicorn with the packaged configuration."""

from __future__ import annotations

import dataclasses
import os
import sys

from shmstream.backends import open_store
from shmstream.config import Settings

# serve flag -> environment variable read by gunicorn_config (not a Settings field)
_PROCESS_FLAGS = {"bind": "SHMSTREAM_BIND", "workers": "SHMSTREAM_WORKERS",
                  "threads": "SHMSTREAM_THREADS"}


def serve(args) -> int:
    """Validate the settings here (clear errors before gunicorn forks), then exec gunicorn
    so it owns this process id and receives signals directly."""
    settings = Settings.from_env()
    overrides = {
        spec.name: getattr(args, spec.name)
        for spec in dataclasses.fields(Settings)
        if getattr(args, spec.name, None) is not None
    }
    settings = dataclasses.replace(settings, **overrides)
    try:
        open_store(settings).close()
    except ValueError as exc:
        print(f"shmstream serve: {exc}", file=sys.stderr)
        return 2
    env = {**os.environ, **settings.to_env()}
    for flag, variable in _PROCESS_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            env[variable] = str(value)
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:shmstream.serve.gunicorn_config"]
    os.execve(sys.executable, argv, env)
    return 0  # not reached
