"""Conversation ids and namespaces: the rules every backend shares.

Ids are capabilities: they are stored, never logged (:func:`short_hash` is the log-safe
handle), and never used as file or key names (backends name things by :func:`digest`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import msgpack

from shmstream.store.errors import InvalidConversationId
from shmstream.store.interface import matches_lookup

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


def digest(data: bytes, hex_length: int, person: bytes = b"shmstream") -> str:
    """A ``hex_length``-digit BLAKE2b digest of ``data``; ``person`` keeps one backend's
    names apart from another's (each keeps the one its stored names were made with)."""
    return hashlib.blake2b(data, digest_size=hex_length // 2, person=person).hexdigest()


def base_id(raw_id: bytes) -> bytes:
    """The part of an id that ``lookup`` matches on: everything before the first ``::``."""
    return raw_id.split(b"::", 1)[0]


def lookup_bases(raw_id: bytes) -> set[bytes]:
    """Every base (:func:`base_id`) that an id matched by a lookup of ``raw_id`` can have.

    Usually just ``base_id(raw_id)``; but when ``raw_id`` ends in ``:`` and has no ``::`` of
    its own, ``raw_id + b"::model"`` has its first ``::`` one byte earlier (``a:`` ->
    ``a:::m``, base ``a``), so ``raw_id[:-1]`` is a base too.
    """
    bases = {base_id(raw_id)}
    if raw_id.endswith(b":") and b"::" not in raw_id:
        bases.add(raw_id[:-1])
    return bases


@dataclass(frozen=True)
class LookupRequest:
    """The ids of one ``lookup`` call that can match anything, and the bases to search.

    Invalid ids are dropped (they match nothing, as in the seed); ``matches`` is the rule
    (:func:`~shmstream.store.interface.matches_lookup`) applied to every requested id.
    """

    requested: tuple[str, ...]
    bases: frozenset[bytes]

    @classmethod
    def parse(cls, conversation_ids: Iterable[str]) -> LookupRequest:
        requested: list[str] = []
        bases: set[bytes] = set()
        for conversation_id in conversation_ids:
            try:
                raw = encode_id(conversation_id)
            except InvalidConversationId:
                continue
            requested.append(conversation_id)
            bases |= lookup_bases(raw)
        return cls(tuple(requested), frozenset(bases))

    def matches(self, conversation_id: str) -> bool:
        return any(matches_lookup(conversation_id, wanted) for wanted in self.requested)


def session_record(conversation_id: str, metadata: dict | None) -> dict:
    """The metadata a backend stores for a new session: the caller's, with ``id`` always the
    session's own (a caller's ``id`` key can never make the record lie about the id)."""
    return {**(metadata or {}), "id": conversation_id}


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
