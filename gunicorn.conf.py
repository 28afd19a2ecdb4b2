# The full shmstream service: `gunicorn -c gunicorn.conf.py` (settings from SHMSTREAM_*).
# The configuration lives in the package so `shmstream serve` uses the same one.
from shmstream.serve.gunicorn_config import *  # noqa: F403
