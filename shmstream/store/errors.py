"""Exceptions that carry the HTTP answer they map to (one handler turns them into bodies)."""

from __future__ import annotations


class ShmstreamError(Exception):
    """Base class. ``status`` and ``error_type`` follow llama-server's error bodies."""

    status = 500
    error_type = "server_error"

    def __init__(self, message: str | None = None):
        super().__init__(message or self.default_message)

    default_message = "Internal server error"

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidRequest(ShmstreamError):
    status = 400
    error_type = "invalid_request_error"
    default_message = "Invalid request"


class MissingConversationId(InvalidRequest):
    default_message = "Missing conversation id in path"


class InvalidConversationId(InvalidRequest):
    default_message = "Invalid conversation id"


class InvalidOffset(InvalidRequest):
    default_message = "Invalid 'from' offset"


class OffsetLost(InvalidRequest):
    """The reader asked for bytes older than the oldest byte still held."""

    default_message = "Stream offset lost, please restart"


class SessionNotFound(ShmstreamError):
    status = 404
    error_type = "not_found_error"
    default_message = "Stream not found or expired"


class Unauthorized(ShmstreamError):
    status = 401
    error_type = "authentication_error"
    default_message = "Invalid API Key"


class PayloadTooLarge(ShmstreamError):
    status = 413
    error_type = "invalid_request_error"
    default_message = "Request body too large"


class StoreUnavailable(ShmstreamError):
    """No room for a new session: /dev/shm full, or a configured quota reached."""

    status = 503
    error_type = "unavailable_error"
    default_message = "Session store is full"
    # True when the store has already logged this outage itself (once per process, when it
    # began): callers then stay quiet instead of logging a second line for the same change.
    logged = False
