"""The session store: the backend interface, session states, the pure ring and the errors.

This package imports nothing else of shmstream; every backend (``shmstream.shm``,
``shmstream.redis``) implements :class:`SessionStore`, and the relay and HTTP layers use
only what is exported here.
"""

from shmstream.store.errors import (
    InvalidConversationId,
    OffsetLost,
    SessionNotFound,
    ShmstreamError,
    StoreUnavailable,
)
from shmstream.store.interface import (
    DEFAULT_CAPACITY,
    DEFAULT_GC_INTERVAL,
    DEFAULT_TTL,
    WAKE_INTERVAL,
    GCReport,
    Session,
    SessionInfo,
    SessionStore,
    matches_lookup,
    now_us,
)
from shmstream.store.states import State

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_GC_INTERVAL",
    "DEFAULT_TTL",
    "WAKE_INTERVAL",
    "GCReport",
    "InvalidConversationId",
    "OffsetLost",
    "Session",
    "SessionInfo",
    "SessionNotFound",
    "SessionStore",
    "ShmstreamError",
    "State",
    "StoreUnavailable",
    "matches_lookup",
    "now_us",
]
