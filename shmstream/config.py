"""Settings from ``SHMSTREAM_*`` environment variables (each also a ``shmstream serve`` flag)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from shmstream.store.interface import DEFAULT_CAPACITY, DEFAULT_GC_INTERVAL, DEFAULT_TTL

DEFAULT_NAMESPACE = "shmstream"


def _optional_int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


@dataclass(frozen=True)
class Settings:
    upstream: str | None = None  # base URL of an OpenAI-compatible server; None: demo
    namespace: str = DEFAULT_NAMESPACE
    max_bytes: int = DEFAULT_CAPACITY
    ttl: float = DEFAULT_TTL
    gc_interval: float = DEFAULT_GC_INTERVAL
    ping_interval: float = 1.0
    api_key: str | None = None
    upstream_api_key: str | None = None
    max_sessions: int | None = None
    max_shm_bytes: int | None = None
    backend: str = "shm"  # "shm" or a redis:// URL
    cors_origins: str = "*"  # "*", "none" or comma-separated origins (shmstream.http.cors)
    demo_tokens_per_second: float = 20.0
    relays: int = 1  # relay processes (each relays thousands of streams on one event loop)
    # seconds a SIGTERM leaves running answers to finish before they end "aborted"
    graceful_timeout: float = 30.0

    @classmethod
    def from_env(cls, environ: dict | None = None) -> Settings:
        """Read ``SHMSTREAM_<FIELD>`` for every field; unset or empty keeps the default.

        Raises ValueError naming the variable when a value does not parse.
        """
        environ = os.environ if environ is None else environ
        values = {}
        for spec in fields(cls):
            variable = "SHMSTREAM_" + spec.name.upper()
            raw = environ.get(variable)
            if raw in (None, ""):
                continue
            convert = {"int": int, "float": float, "int | None": _optional_int}.get(
                str(spec.type), str
            )
            try:
                values[spec.name] = convert(raw)
            except ValueError:
                raise ValueError(f"{variable}={raw!r} is not a valid {spec.type}") from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``SHMSTREAM_*`` variables that reproduce these settings in a child process."""
        out = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value is not None:
                out["SHMSTREAM_" + spec.name.upper()] = str(value)
        return out

