"""The one place shmstream relies on prometheus_client beyond its documented API.

Two assumptions, both checked by ``tests/test_prometheus_internals.py`` on the installed
version, so an upgrade that breaks one fails by name:

- Multiprocess mode is chosen when ``prometheus_client.values`` is imported (documented:
  set ``PROMETHEUS_MULTIPROC_DIR`` first). A custom gunicorn config may import it earlier;
  then the value class is picked again with ``values.get_value_class()``.
- Each process writes ``<kind>_<pid>.db`` files in that directory (``MultiProcessValue``'s
  naming). shmstream reserves their pages with ``posix_fallocate`` before prometheus_client
  maps them, because a tmpfs page first touched while ``/dev/shm`` is full kills the
  process with SIGBUS.
"""

from __future__ import annotations

import os

# prometheus_client names each process's files <kind>_<pid>.db; our metrics use these kinds.
FILE_KINDS = ("counter", "gauge_livesum", "histogram")


def value_file(directory: str, kind: str, pid: int) -> str:
    """The file prometheus_client's multiprocess mode writes for ``kind`` in ``pid``."""
    return os.path.join(directory, f"{kind}_{pid}.db")


def ensure_multiprocess_values() -> None:
    """Make prometheus_client use its multiprocess value class when the directory variable
    was set after it was first imported."""
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()
