"""The Redis backend: sessions shared across hosts through one Redis (see :mod:`.store`).

It implements :class:`shmstream.store.SessionStore` and imports nothing of shmstream but
:mod:`shmstream.store`.
"""

from shmstream.redis.session import RedisSession
from shmstream.redis.store import RedisStore

__all__ = ["RedisSession", "RedisStore"]
