"""Conversation ids and namespaces: the rules every backend shares.

Ids are capabilities: they are stored, never logged (:func:`short_hash` is the log-safe
handle), and never used as file or key names (backends name things by :func:`digest`).
"""

from __future__ import annotations

import hashlib
import re

import msgpack

from shmstream.store.errors import InvalidConversationId

NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_ID_BYTES = 16 * 1024
MAX_META_BYTES = 64 * 1024


def validate_namespace(namespace: str) -> str:
    if not NAMESPACE_PATTERN.fullmatch(namespace):
        raise ValueError(f"namespace must match {NAMESPACE_PATTERN.pattern}: {namespace!r}")
    return namespace


def encode_id(conversation_id: str) -> bytes:
    """The id's UTF-8 bytes. Raises :class:`InvalidConversationId` for empty, huge or
    unencodable (lone surrogate) ids. Any other text, slashes and NUL included, is fine."""
    if not isinstance(conversation_id, str) or not conversation_id:
        raise InvalidConversationId("conversation id must be a non-empty string")
    try:
        raw = conversation_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidConversationId("conversation id is not valid UTF-8") from None
    if len(raw) > MAX_ID_BYTES:
        raise InvalidConversationId(f"conversation id is longer than {MAX_ID_BYTES} bytes")
    return raw


def digest(data: bytes, hex_length: int) -> str:
    return hashlib.blake2b(data, digest_size=hex_length // 2, person=b"shmstream").hexdigest()


def base_id(raw_id: bytes) -> bytes:
    """The part of an id that ``lookup`` matches on: everything before the first ``::``."""
    return raw_id.split(b"::", 1)[0]


def short_hash(conversation_id: str) -> str:
    """A log-safe handle for an id: ids are capabilities and never appear in logs."""
    try:
        return digest(encode_id(conversation_id), 12)
    except InvalidConversationId:
        return "invalid"


def encode_metadata(metadata: dict) -> bytes:
    record = msgpack.packb(metadata, use_bin_type=True)
    if len(record) > MAX_META_BYTES:
        raise ValueError(f"metadata is {len(record)} bytes, the limit is {MAX_META_BYTES}")
    return record
