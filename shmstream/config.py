"""Every setting of shmstream, defined once: type, unit, range, default and help text.

Each :class:`Settings` field carries its :class:`Spec`; from it come the ``SHMSTREAM_<NAME>``
environment variable, the ``shmstream serve --<name>`` flag (with its help), the README's
settings table (``shmstream.cli.settings_doc`` writes it, a test checks it) and the one-line
errors. Sizes take ``4MiB``, ``512KiB``, ``1M`` or plain bytes; durations take ``300s``,
``5m``, ``1h``, ``250ms`` or plain seconds.

A bad value raises :class:`SettingError`, a ``ValueError`` whose message is one line naming
the variable (or the flag) and the form expected.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from shmstream.store.ids import NAMESPACE_PATTERN
from shmstream.store.interface import DEFAULT_CAPACITY, DEFAULT_GC_INTERVAL, DEFAULT_TTL

DEFAULT_NAMESPACE = "shmstream"
ENV_PREFIX = "SHMSTREAM_"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class SettingError(ValueError):
    """A setting's value does not parse or is out of range; the message is one line."""


# --- kinds of values ------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2,
               "g": 1024**3, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER_WITH_UNIT = re.compile(r"\s*(-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def format_size(count: int) -> str:
    """``4 MiB``, ``512 KiB``, ``1000 B``: the largest binary unit that divides exactly."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count and count % factor == 0:
            return f"{count // factor} {unit}"
    return f"{count} B"


def format_seconds(seconds: float) -> str:
    """``300 s``, ``0.5 s``: how the README and ``--help`` show a duration."""
    return f"{seconds:g} s"


@dataclass(frozen=True)
class Kind:
    """How a setting's text becomes a value. ``form`` is what an error says is expected."""

    form: str = "text"
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, raw: str):
        return raw

    def check_range(self, value, shown) -> None:
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"at least {shown(self.minimum)} ({self.form})")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"at most {shown(self.maximum)} ({self.form})")

    def show(self, value) -> str:
        return str(value)


@dataclass(frozen=True)
class Size(Kind):
    form: str = "a size like 4MiB, 512KiB or 1M; a plain number is bytes"

    def parse(self, raw: str) -> int:
        match = _NUMBER_WITH_UNIT.fullmatch(raw)
        unit = match and _SIZE_UNITS.get(match[2].lower())
        if not unit:
            raise ValueError(self.form)
        value = float(match[1]) * unit
        if value != int(value):
            raise ValueError(f"a whole number of bytes ({self.form})")
        value = int(value)
        self.check_range(value, format_size)
        return value

    def show(self, value) -> str:
        return format_size(value)


@dataclass(frozen=True)
class Duration(Kind):
    form: str = "a duration like 300s, 5m, 1h or 250ms; a plain number is seconds"

    def parse(self, raw: str) -> float:
        match = _NUMBER_WITH_UNIT.fullmatch(raw)
        unit = match and _DURATION_UNITS.get(match[2].lower())
        if not unit:
            raise ValueError(self.form)
        value = float(match[1]) * unit
        if not math.isfinite(value):
            raise ValueError(self.form)
        self.check_range(value, format_seconds)
        return value

    def show(self, value) -> str:
        return format_seconds(value)


@dataclass(frozen=True)
class Integer(Kind):
    form: str = "a whole number"

    def parse(self, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(self.form) from None
        self.check_range(value, lambda bound: f"{bound:g}")
        return value


@dataclass(frozen=True)
class Number(Kind):
    form: str = "a number"

    def parse(self, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(self.form) from None
        if not math.isfinite(value):
            raise ValueError(self.form)
        self.check_range(value, lambda bound: f"{bound:g}")
        return value

    def show(self, value) -> str:
        return f"{value:g}"


@dataclass(frozen=True)
class Choice(Kind):
    choices: tuple[str, ...] = ()

    def parse(self, raw: str) -> str:
        value = raw.strip().lower()
        if value not in self.choices:
            raise ValueError("one of " + ", ".join(self.choices))
        return value


@dataclass(frozen=True)
class Pattern(Kind):
    pattern: str = ".*"

    def parse(self, raw: str) -> str:
        if not re.fullmatch(self.pattern, raw):
            raise ValueError(self.form)
        return raw


@dataclass(frozen=True)
class UpstreamUrl(Kind):
    """An http(s) base URL with a host. A trailing ``/v1`` (what OpenAI clients call
    ``base_url``) is dropped: shmstream forwards the client's whole path, ``/v1`` included."""

    form: str = "an http:// or https:// URL with a host, like http://127.0.0.1:8081"

    def parse(self, raw: str) -> str:
        try:
            parts = urllib.parse.urlsplit(raw.strip())
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise ValueError(self.form) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(self.form)
        if parts.query or parts.fragment:
            raise ValueError(f"{self.form}, without a query or fragment")
        path = parts.path.rstrip("/")
        path = path.removesuffix("/v1")
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


@dataclass(frozen=True)
class Backend(Kind):
    form: str = "'shm' or a redis://, rediss:// or unix:// URL"

    def parse(self, raw: str) -> str:
        value = raw.strip()
        if value == "shm":
            return value
        if not value.startswith(REDIS_SCHEMES):
            raise ValueError(self.form)
        parts = urllib.parse.urlsplit(value)
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError(self.form)
        return value

    def show(self, value) -> str:
        return value


@dataclass(frozen=True)
class Spec:
    """One setting's definition; the field it sits on gives its name."""

    kind: Kind
    help: str
    default_text: str | None = None  # when the default is not a value (computed, "none")
    optional: bool = False  # unset, empty or "none" means None
    secret: bool = False  # never shown (help, logs)
    process: bool = False  # read by the gunicorn configuration, not by the app
    metavar: str | None = None  # the flag's placeholder in --help (default: from the kind)


def setting(kind: Kind, default, help: str, **options):
    """A :class:`Settings` field with its :class:`Spec`."""
    return field(default=default, metadata={"spec": Spec(kind, help, **options)})


# --- the settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    upstream: str | None = setting(
        UpstreamUrl(), None, "base URL of the OpenAI-compatible server (a trailing /v1 is "
        "dropped)", default_text="built-in demo", optional=True)
    namespace: str = setting(
        Pattern(form=f"letters, digits, '_' or '-' matching {NAMESPACE_PATTERN.pattern}",
                pattern=NAMESPACE_PATTERN.pattern),
        DEFAULT_NAMESPACE, "prefix of every object in /dev/shm (and of the Redis keys)",
        metavar="NAME")
    max_bytes: int = setting(
        Size(minimum=4096, maximum=1024**3), DEFAULT_CAPACITY,
        "bytes held per session; older bytes drop from the front")
    ttl: float = setting(
        Duration(minimum=0), DEFAULT_TTL, "how long a finished session stays readable")
    gc_interval: float = setting(
        Duration(minimum=0.01), DEFAULT_GC_INTERVAL, "how often the supervisor collects")
    ping_interval: float = setting(
        Duration(minimum=0.01), 1.0, "a `:` comment line is sent while the upstream is "
        "silent this long")
    api_key: str | None = setting(
        Kind(), None, "require `Authorization: Bearer <key>` (llama-server's --api-key)",
        default_text="none", optional=True, secret=True, metavar="KEY")
    upstream_api_key: str | None = setting(
        Kind(), None, "replaces the client's Authorization towards the upstream",
        default_text="none", optional=True, secret=True, metavar="KEY")
    max_sessions: int | None = setting(
        Integer(minimum=1), None, "quota of sessions; past it a completion gets 503",
        default_text="none", optional=True)
    max_shm_bytes: int | None = setting(
        Size(minimum=4096), None, "quota of /dev/shm bytes for sessions; past it a completion "
        "gets 503", default_text="none", optional=True)
    backend: str = setting(
        Backend(), "shm", "`shm`, or `redis://host:port/db` to share sessions across hosts")
    cors_origins: str = setting(
        Pattern(form="'*', 'none' or comma-separated origins like https://a.example",
                pattern=r"\*|none|[^\s,]+(\s*,\s*[^\s,]+)*"),
        "*", "origins allowed by CORS: `*`, `none` or a comma-separated list", metavar="ORIGINS")
    demo_tokens_per_second: float = setting(
        Number(form="a number of tokens per second", minimum=0.1, maximum=100000), 20.0,
        "speed of the built-in demo model (no upstream)")
    # Process settings: read by shmstream.serve.gunicorn_config.
    bind: str = setting(
        Pattern(form="HOST:PORT (like 127.0.0.1:8080 or [::1]:8080) or unix:PATH",
                pattern=r"unix:.+|(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]*):[0-9]{1,5}"),
        "127.0.0.1:8080", "listen address", process=True, metavar="HOST:PORT")
    workers: int | None = setting(
        Integer(minimum=1, maximum=256), None, "HTTP worker processes",
        default_text="2 per CPU (2..8)", optional=True, process=True)
    relays: int | None = setting(
        Integer(minimum=1, maximum=64), None, "relay processes; each relays thousands of "
        "streams on one event loop", default_text="1 per CPU (1..4)", optional=True,
        metavar="N")
    graceful_timeout: float = setting(
        Duration(minimum=0, maximum=3600), 30.0, "on SIGTERM, running answers get this long "
        "to finish before they end aborted")
    access_log: str | None = setting(
        Kind(form="a file path, or - for standard output"), None, "gunicorn access log",
        default_text="none", optional=True, process=True, metavar="FILE")
    log_level: str = setting(
        Choice(form="a log level", choices=("debug", "info", "warning", "error")), "info",
        "level of shmstream's own log lines", process=True, metavar="LEVEL")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``SHMSTREAM_<FIELD>`` for every field; unset or empty keeps the default.

        Raises :class:`SettingError` naming the variable when a value does not parse.
        """
        return cls.load(os.environ if environ is None else environ)

    @classmethod
    def load(cls, environ: Mapping[str, str], flags: Mapping[str, str | None] | None = None
             ) -> Settings:
        """Settings from ``environ``, each overridden by ``flags[name]`` (raw flag text)
        when that is not None. Raises :class:`SettingError` naming the variable or flag."""
        values = {}
        for spec_field in fields(cls):
            name = spec_field.name
            raw, source = (flags or {}).get(name), flag_name(name)
            if raw is None:
                raw, source = environ.get(env_name(name)), env_name(name)
                if raw in (None, ""):
                    continue
            values[name] = parse_value(spec_field, raw, source)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``SHMSTREAM_*`` variables that reproduce these settings in a child process."""
        out = {}
        for spec_field in fields(self):
            value = getattr(self, spec_field.name)
            if value is not None:
                out[env_name(spec_field.name)] = _canonical(value)
        return out

    def describe(self) -> str:
        """The settings an operator checks at start, one line, secrets hidden."""
        return (f"upstream={self.upstream or 'built-in demo'} backend={redact_url(self.backend)} "
                f"namespace={self.namespace} max_bytes={format_size(self.max_bytes)} "
                f"ttl={format_seconds(self.ttl)}")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def spec_of(spec_field: dataclasses.Field) -> Spec | None:
    return spec_field.metadata.get("spec")


def specs() -> list[tuple[str, Spec]]:
    """``(field name, spec)`` of every defined setting, in definition order."""
    return [(f.name, spec) for f in fields(Settings) if (spec := spec_of(f)) is not None]


def parse_value(spec_field: dataclasses.Field, raw: str, source: str):
    """``raw`` as the field's value. Raises :class:`SettingError` (one line, naming
    ``source`` and the form expected)."""
    spec = spec_of(spec_field)
    if spec is None:  # a field added without a Spec: convert by its annotation
        return _parse_by_annotation(spec_field, raw, source)
    if spec.optional and raw.strip().lower() in ("", "none"):
        return None
    try:
        return spec.kind.parse(raw)
    except ValueError as exc:
        shown = "<hidden>" if spec.secret else repr(raw)
        raise SettingError(f"{source}={shown}: expected {exc}") from None


def _parse_by_annotation(spec_field: dataclasses.Field, raw: str, source: str):
    convert = {"int": int, "float": float, "int | None": int, "float | None": float}.get(
        str(spec_field.type), str)
    try:
        return convert(raw)
    except ValueError:
        raise SettingError(f"{source}={raw!r}: expected a {spec_field.type}") from None


def default_text(name: str, spec: Spec) -> str:
    """The default as the README and ``--help`` show it."""
    if spec.default_text is not None:
        return spec.default_text
    default = next(f.default for f in fields(Settings) if f.name == name)
    return spec.kind.show(default)


def _canonical(value) -> str:
    # Whole floats without ".0", so older readers that call int() accept them.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def redact_url(url: str) -> str:
    """``url`` with its password (if any) shown as ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
