"""The few places where the Redis backend leans on how redis-py works inside.

The streaming calls (append, fetch) and the pub/sub listener drive bare
:class:`redis.Connection` objects instead of going through :class:`redis.Redis`: the client's
pool checkout, retry wrapper and metrics cost 2-3x the round trip (see
:mod:`shmstream.redis.connections`). Everything used on a connection is its public surface
(``connect``, ``disconnect``, ``send_command``, ``send_packed_command``, ``pack_commands``,
``can_read``, ``read_response``, ``is_connected``); what is assumed beyond that is gathered
here and checked by tests/test_redis_backend.py::test_redis_py_internals_we_rely_on, which
fails loudly when a redis-py upgrade changes it.

- A connection is made from a pool's ``connection_class`` and ``connection_kwargs`` (public
  attributes of :class:`redis.ConnectionPool`), so it has the client's address, TLS, auth,
  timeouts and retry policy.
- The pub/sub connection always speaks RESP2: messages then arrive as plain replies from
  ``read_response``, with no RESP3 push handler to install on the private parser (and
  without redis-py 8's RESP3-only "maintenance notifications" settings).
"""

from __future__ import annotations

import redis


def bare_connection(pool: redis.ConnectionPool, **overrides) -> redis.Connection:
    """A new, not yet connected connection with ``pool``'s settings and ``overrides``."""
    return pool.connection_class(**{**pool.connection_kwargs, **overrides})


def pubsub_connection(pool: redis.ConnectionPool) -> redis.Connection:
    """A connection for SUBSCRIBE/UNSUBSCRIBE whose messages come back from
    ``read_response`` as ``[kind, channel, data]`` lists (RESP2, whatever the client uses)."""
    settings = dict(pool.connection_kwargs, protocol=2)
    # redis-py 8 turns on "maintenance notifications" for RESP3 pools, which refuse a RESP2
    # parser; a pub/sub connection has no use for them.
    for name in ("maint_notifications_config", "maint_notifications_pool_handler"):
        settings.pop(name, None)
    return pool.connection_class(**settings)


def is_connected(conn: redis.Connection) -> bool:
    """Whether ``conn`` has a socket now (sending on one without would reconnect silently).

    ``is_connected`` is public in redis-py 8; older releases only had the socket attribute.
    """
    connected = getattr(type(conn), "is_connected", None)
    if connected is None:
        return getattr(conn, "_sock", None) is not None
    return bool(conn.is_connected)
