"""shmstream: resumable, cancellable LLM event streams in POSIX shared memory.

Every gunicorn worker (or any process on the host) can produce, replay, look up and cancel
any conversation's stream; Redis carries the same protocol across hosts. This package does
not generate text: it relays an OpenAI-compatible upstream.
"""

from .errors import (
    InvalidConversationId,
    OffsetLost,
    SessionNotFound,
    ShmstreamError,
    StoreUnavailable,
)
from .layout import State
from .registry import ShmStore
from .store import Session, SessionInfo, SessionStore

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
