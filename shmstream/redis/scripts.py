"""The Lua scripts of the Redis backend, shipped as ``lua/*.lua`` package data.

Every atomic step (create/replace, append, finish, evict, get, lease renewal, gc) is one
script. A script whose first line is ``-- include: common.lua`` gets ``common.lua`` (the
helpers ``finish``, ``flag_cancel`` and ``retire``) prepended. Scripts are registered on the
client with :meth:`redis.Redis.register_script`: EVALSHA, loaded again after a NOSCRIPT.
"""

from __future__ import annotations

import functools
from importlib import resources

import redis

INCLUDE = "-- include: "
NAMES = ("create", "append", "finish", "evict", "get", "abort_if_dead", "renew",
         "gc_expire", "gc_running")


@functools.cache
def source(name: str) -> str:
    """The text of script ``name`` with its includes prepended. Raises FileNotFoundError."""
    text = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text("utf-8")
    first_line = text.split("\n", 1)[0]
    if first_line.startswith(INCLUDE):
        included = first_line[len(INCLUDE):].strip().removesuffix(".lua")
        text = source(included) + "\n" + text
    return text


def register(client: redis.Redis) -> dict[str, redis.commands.core.Script]:
    """Every script of the backend, registered on ``client``, by name."""
    return {name: client.register_script(source(name)) for name in NAMES}
