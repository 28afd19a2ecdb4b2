"""shmstream: resumable, cancellable LLM event streams in POSIX shared memory.

Every gunicorn worker (or any process on the host) can produce, replay, look up and cancel
any conversation's stream; Redis carries the same protocol across hosts. This package does
not generate text: it relays an OpenAI-compatible upstream.

Layers, top to bottom: ``serve`` and ``cli`` (wiring) > ``http`` > ``relay`` > ``store`` (the
interface); ``shm`` and ``redis`` implement the store and are known only to the wiring
(``shmstream.backends``).
"""

from shmstream.store import (
    InvalidConversationId,
    OffsetLost,
    Session,
    SessionInfo,
    SessionNotFound,
    SessionStore,
    ShmstreamError,
    State,
    StoreUnavailable,
)

__all__ = [
    "InvalidConversationId",
    "OffsetLost",
    "Session",
    "SessionInfo",
    "SessionNotFound",
    "SessionStore",
    "ShmStore",
    "ShmstreamError",
    "State",
    "StoreUnavailable",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # ShmStore is imported on first use so that importing any part of shmstream (the HTTP
    # layer on a Redis deployment, say) does not load posix_ipc and the futex probe.
    if name == "ShmStore":
        from shmstream.shm.store import ShmStore

        return ShmStore
    raise AttributeError(f"module 'shmstream' has no attribute {name!r}")
