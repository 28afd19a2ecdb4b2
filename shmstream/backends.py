"""The backend registry: which store a ``SHMSTREAM_BACKEND`` value names.

Only the wiring (``serve``, ``cli``) imports this module; the HTTP and relay layers get a
:class:`~shmstream.store.SessionStore` and never know which backend it is. Each backend is
imported on demand, so a Redis deployment never loads posix_ipc and a shared-memory one
never needs redis-py.
"""

from __future__ import annotations

from shmstream.config import Settings
from shmstream.store.interface import SessionStore

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(settings: Settings) -> SessionStore:
    """The configured backend's store. Raises ValueError for an unknown backend."""
    if settings.backend == "shm":
        from shmstream.shm.store import ShmStore

        return ShmStore(settings.namespace, capacity=settings.max_bytes, ttl=settings.ttl,
                        max_sessions=settings.max_sessions,
                        max_shm_bytes=settings.max_shm_bytes)
    if settings.backend.startswith(REDIS_SCHEMES):
        from shmstream.redis.store import RedisStore

        return RedisStore.from_url(settings.backend, namespace=settings.namespace,
                                   capacity=settings.max_bytes, ttl=settings.ttl,
                                   max_sessions=settings.max_sessions)
    raise ValueError(
        f"SHMSTREAM_BACKEND must be 'shm' or a redis:// URL, not {settings.backend!r}")
