"""The Redis backend: the same sessions as :mod:`shmstream.shm.store`, shared across hosts.

Chosen with ``SHMSTREAM_BACKEND=redis://host:port/db``. It implements the
:class:`~shmstream.store.SessionStore` interface; the protocol decisions (what a reader does at
an offset, what is dropped) come from :mod:`shmstream.store.ring` and :mod:`shmstream.store`, so the
two backends cannot drift apart.

Data model (every key of a namespace carries the hash tag ``{<namespace>}``, so one namespace
lives in one Cluster slot and the multi-key Lua scripts stay legal)::

    shmstream:{ns}:i:<base hash>   hash   <id hash> -> <generation>     lookup index + pointer
    shmstream:{ns}:all             zset   "<gen>:<base hash>:<id hash>" -> expiry (ms; +inf
                                          while running)                 gc, list, quota
    shmstream:{ns}:s:<gen>         hash   id, rec (msgpack metadata), state, cancel, total,
                                          cap, started, completed (unix µs), host, pid, member
    shmstream:{ns}:d:<gen>         string the ring: the byte at offset o lives at o % cap
    shmstream:{ns}:l:<gen>         string the producer's lease (PX), renewed while it lives
    shmstream:{ns}:p:<scope hash>  set    running generations produced in one pid namespace
                                          of one boot of one machine (abort_producers)
    shmstream:{ns}:n:<gen>         channel  "t<total>" per append, "e<state>" at the end
    shmstream:{ns}:k:<gen>         channel  "c" on cancel, "e<state>" at the end

- **Generations.** Every ``create_or_replace`` makes a fresh random generation; the per-base
  index maps the id's hash to it. A replaced session keeps its own keys (cancelled, finalized,
  detached from the index, expiring after a grace period), so a handle on it can never see the
  new session's bytes, and open handles keep working as an unlinked shm segment does.
- **The ring is a fixed-size string written with SETRANGE** at ``offset % capacity``, exactly
  the layout of :mod:`shmstream.store.ring`. The alternative, APPEND plus trimming the front,
  needs a copy of the whole held buffer whenever it trims (Redis cannot cut the front of a
  string), and
  the string index of a byte changes at every trim, so a reader could not compute where to read
  without first reading the header. With the ring a byte never moves: a reader asks for the
  positions of ``[offset, end)`` and, in the same atomic script call, for ``total``; the bytes
  are intact iff ``offset >= dropped_for(total_after, capacity)`` (Aeron's check after copy).
  Appends cost O(len), the string never exceeds ``capacity`` bytes and, like tmpfs, only grows
  as far as bytes were written. ``dropped`` is derived (``ring.dropped_for``), never stored.
- **Atomic steps are Lua scripts** (append with the state check, create/replace, finish,
  evict, lease renewal, gc). A read is a MULTI/EXEC of the header and the ``GETRANGE`` spans
  Python computed: no protocol logic in Lua on the read side.
- **Lookup** reads the per-base index of each requested id (base = id up to its first ``::``),
  never the keyspace. The index cannot expire field by field, so stale fields (their session
  expired) are skipped, and removed by ``get`` and ``gc``.
- **TTL**: finishing sets ``PEXPIRE ttl`` on the session's keys and its ``all`` score to the
  deadline; Redis removes the keys itself, and ``gc(now)`` removes anything past its deadline
  (so a caller's clock can drive it, as with shared memory) and the index entries.
- **Dead producers**: the creating store renews a lease key (``PX lease``) of each session it
  produces from a background thread every ``lease / 4``. A running session without a lease is
  finalized ``aborted`` by ``gc`` or by any reader that finds it while waiting, which ends
  every reader. Closing a store (or its process dying) stops the renewals.
- **Waking**: one pub/sub connection per store and process, one listener thread, and a
  reference-counted subscription per session and channel kind, handed to local threads
  through a :class:`threading.Condition`: a process gets one message per event however many
  reader threads wait (the shm backend's "one waiter per process" rule). The messages carry
  the new ``total`` and, for appends up to 64 KiB, the appended bytes: each process keeps
  the latest 256 KiB, contiguous by offset, so a caught-up reader takes its bytes from
  memory with no round trip (a gap, e.g. a bigger chunk or a reconnect, resets the cache and
  the reader fetches from the ring; a lapped reader still gets OffsetLost). An idle
  reader costs no Redis traffic: it re-checks Redis only after a message, after
  ``RECHECK_INTERVAL`` (to notice an expired lease) or after the pub/sub connection came back
  (messages may have been lost); its ``_sleep`` still returns every ``wake_interval``.
- **The streaming calls** (append, fetch) go over a bare per-thread connection: through
  redis-py 8's client the same EVALSHA cost 2-3x the round trip (see :class:`_HotPath`).
  ``from_url`` speaks RESP2 unless told otherwise (RESP3 added ~40 µs per command here).
- **Cancel** publishes ``c`` on the control channel; the producer's handle subscribed to it at
  creation, so ``producer_should_stop`` is a Python attribute read once the subscription is
  confirmed (before that, and while pub/sub is down, it asks Redis). The lease renewal also
  reports cancelled sessions, a fallback if a message was lost.

Not supported: Redis Cluster with more than one slot per namespace (a namespace is one slot by
design), and per-store quotas on bytes (``max_shm_bytes`` is accepted and ignored).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable

import msgpack
import redis
from redis.exceptions import NoScriptError

from shmstream.store import ids, ring
from shmstream.store.errors import (
    InvalidConversationId,
    OffsetLost,
    SessionNotFound,
    StoreUnavailable,
)
from shmstream.store.interface import (
    DEFAULT_CAPACITY,
    DEFAULT_TTL,
    GCReport,
    Session,
    SessionInfo,
    SessionStore,
    matches_lookup,
    now_us,
)
from shmstream.store.procs import machine_scope as _machine_scope
from shmstream.store.procs import process_alive, process_start_time
from shmstream.store.states import State

log = logging.getLogger("shmstream.redis")

DEFAULT_LEASE = 10.0  # seconds a producer's lease lasts without renewal
RETIRE_GRACE = 30.0  # seconds an evicted or replaced session stays readable by open handles
RECHECK_INTERVAL = 1.0  # an idle reader looks at Redis at least this often (lease expiry)
_GC_BATCH = 500
_PUBLISH_BYTES = 64 * 1024  # appends up to this size travel in their notification

_RUNNING = b"0"

# --- Lua ----------------------------------------------------------------------------------
# Numbers cross into Redis as strings made by Python or by string.format('%d'): Lua's own
# number-to-string conversion uses "%.14g" and would round microsecond timestamps.

_LUA_COMMON = """
local prefix = ARGV[1]
local all = prefix .. 'all'

-- End a running session: state, completion time, expiry, wake-up. 1 if this call ended it.
local function finish(gen, state, now_us, ttl_ms, deadline)
  local meta = prefix .. 's:' .. gen
  local fields = redis.call('HMGET', meta, 'state', 'member', 'pset')
  if fields[1] ~= '0' then return 0 end
  redis.call('HSET', meta, 'state', state, 'completed', now_us)
  if fields[3] then redis.call('SREM', fields[3], gen) end
  redis.call('DEL', prefix .. 'l:' .. gen)
  redis.call('ZADD', all, 'XX', deadline, fields[2])
  redis.call('PEXPIRE', meta, ttl_ms)
  redis.call('PEXPIRE', prefix .. 'd:' .. gen, ttl_ms)
  local message = 'e' .. state
  redis.call('PUBLISH', prefix .. 'n:' .. gen, message)
  redis.call('PUBLISH', prefix .. 'k:' .. gen, message)
  return 1
end

-- Flag a session cancelled (its producer stops). 0 if it is gone.
local function flag_cancel(gen)
  local meta = prefix .. 's:' .. gen
  if redis.call('EXISTS', meta) == 0 then return 0 end
  redis.call('HSET', meta, 'cancel', '1')
  redis.call('PUBLISH', prefix .. 'k:' .. gen, 'c')
  return 1
end

-- Finish (cancelling first if asked) and detach from the index; open handles keep the keys
-- for at most grace_ms. The caller removes the index field. 1 if the session was there.
local function retire(gen, state, cancel, now_us, ttl_ms, deadline, grace_ms)
  local meta = prefix .. 's:' .. gen
  local member = redis.call('HGET', meta, 'member')
  if not member then return 0 end
  if cancel == '1' then flag_cancel(gen) end
  finish(gen, state, now_us, ttl_ms, deadline)
  redis.call('ZREM', all, member)
  for _, key in ipairs({meta, prefix .. 'd:' .. gen}) do
    local left = redis.call('PTTL', key)
    if left == -1 or left > tonumber(grace_ms) then redis.call('PEXPIRE', key, grace_ms) end
  end
  return 1
end
"""

# KEYS: index, new meta, new lease. ARGV: prefix, id hash, gen, member, id, record, capacity,
# now_us, ttl_ms, deadline, grace_ms, lease_ms, max_sessions (0: none), now_ms, host, pid,
# producer identity (see _producer_identity), the producer scope's set.
_LUA_CREATE = _LUA_COMMON + """
local index, meta, lease = KEYS[1], KEYS[2], KEYS[3]
local id_hash, gen = ARGV[2], ARGV[3]
local replaced = 0
local old = redis.call('HGET', index, id_hash)
if old then
  replaced = retire(old, '2', '1', ARGV[8], ARGV[9], ARGV[10], ARGV[11])
  redis.call('HDEL', index, id_hash)
end
local limit = tonumber(ARGV[13])
if limit > 0 and redis.call('ZCOUNT', all, '(' .. ARGV[14], '+inf') >= limit then
  return -1
end
redis.call('HSET', meta, 'id', ARGV[5], 'rec', ARGV[6], 'state', '0', 'cancel', '0',
           'total', '0', 'cap', ARGV[7], 'started', ARGV[8], 'completed', '0',
           'host', ARGV[15], 'pid', ARGV[16], 'producer', ARGV[17], 'pset', ARGV[18],
           'member', ARGV[4])
redis.call('SADD', ARGV[18], gen)
redis.call('SET', lease, '1', 'PX', ARGV[12])
redis.call('HSET', index, id_hash, gen)
redis.call('ZADD', all, '+inf', ARGV[4])
return replaced
"""

# KEYS: meta, data. ARGV: bytes, notify channel, largest chunk to publish. Returns the new
# total, or -1 if finished. Mirrors ring.write: a chunk of capacity bytes or more keeps its
# last capacity bytes. The notification carries the chunk when it is small and whole.
_LUA_APPEND = """
local meta, ring = KEYS[1], KEYS[2]
local fields = redis.call('HMGET', meta, 'state', 'total', 'cap')
if fields[1] ~= '0' then return -1 end
local data = ARGV[1]
local length = #data
local capacity = tonumber(fields[3])
local total = redis.call('HINCRBY', meta, 'total', length)
local start = total - length
if length < capacity and length <= tonumber(ARGV[3]) then
  redis.call('PUBLISH', ARGV[2], string.format('t%d:', total) .. data)
else
  redis.call('PUBLISH', ARGV[2], string.format('t%d', total))
end
if length >= capacity then
  data = string.sub(data, length - capacity + 1)
  start = total - capacity
  length = capacity
end
local position = start % capacity
local first = capacity - position
if length <= first then
  redis.call('SETRANGE', ring, position, data)
else
  redis.call('SETRANGE', ring, position, string.sub(data, 1, first))
  redis.call('SETRANGE', ring, 0, string.sub(data, first + 1))
end
return total
"""

# ARGV: prefix, gen, state, cancel ('1'/'0'), now_us, ttl_ms, deadline.
# Returns {ended by this call, session exists}.
_LUA_FINISH = _LUA_COMMON + """
local gen = ARGV[2]
local exists = redis.call('EXISTS', prefix .. 's:' .. gen)
if ARGV[4] == '1' then flag_cancel(gen) end
return {finish(gen, ARGV[3], ARGV[5], ARGV[6], ARGV[7]), exists}
"""

# KEYS: index. ARGV: prefix, id hash, state, cancel, now_us, ttl_ms, deadline, grace_ms.
_LUA_EVICT = _LUA_COMMON + """
local gen = redis.call('HGET', KEYS[1], ARGV[2])
if not gen then return 0 end
redis.call('HDEL', KEYS[1], ARGV[2])
return retire(gen, ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
"""

# KEYS: index. ARGV: prefix, id hash. Returns {gen, id, cap, total} or nil; drops a stale
# index field.
_LUA_GET = """
local gen = redis.call('HGET', KEYS[1], ARGV[2])
if not gen then return nil end
local fields = redis.call('HMGET', ARGV[1] .. 's:' .. gen, 'id', 'cap', 'total')
if not fields[1] then
  redis.call('HDEL', KEYS[1], ARGV[2])
  return nil
end
return {gen, fields[1], fields[2], fields[3]}
"""

# ARGV: prefix, gen, now_us, ttl_ms, deadline. Aborts a running session whose lease expired.
_LUA_ABORT_IF_DEAD = _LUA_COMMON + """
local gen = ARGV[2]
if redis.call('EXISTS', prefix .. 'l:' .. gen) == 1 then return 0 end
return finish(gen, '4', ARGV[3], ARGV[4], ARGV[5])
"""

# ARGV: prefix, lease_ms, gens... Renews the lease of each running one.
# Returns per gen: 0 running, 1 cancelled (still running), 2 finished or gone.
_LUA_RENEW = """
local prefix, lease_ms = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV do
  local gen = ARGV[i]
  local fields = redis.call('HMGET', prefix .. 's:' .. gen, 'state', 'cancel')
  if fields[1] == '0' then
    redis.call('SET', prefix .. 'l:' .. gen, '1', 'PX', lease_ms)
    out[#out + 1] = (fields[2] == '1') and 1 or 0
  else
    out[#out + 1] = 2
  end
end
return out
"""

# ARGV: prefix, now_ms, batch. Removes up to batch sessions past their deadline, with their
# index fields. Returns how many.
_LUA_GC_EXPIRE = """
local prefix = ARGV[1]
local all = prefix .. 'all'
local members = redis.call('ZRANGEBYSCORE', all, '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(members) do
  local gen, base, id_hash = string.match(member, '^(%x+):(%x+):(%x+)$')
  if gen then
    redis.call('DEL', prefix .. 's:' .. gen, prefix .. 'd:' .. gen, prefix .. 'l:' .. gen)
    local index = prefix .. 'i:' .. base
    if redis.call('HGET', index, id_hash) == gen then redis.call('HDEL', index, id_hash) end
  end
  redis.call('ZREM', all, member)
end
return #members
"""

# ARGV: prefix, now_us, ttl_ms, deadline. Aborts running sessions without a lease and drops
# running entries whose keys vanished. Returns {aborted, removed}.
_LUA_GC_RUNNING = _LUA_COMMON + """
local aborted, removed = 0, 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', all, '+inf', '+inf')) do
  local gen = string.match(member, '^(%x+):')
  if not gen or redis.call('EXISTS', prefix .. 's:' .. gen) == 0 then
    redis.call('ZREM', all, member)
    removed = removed + 1
  elseif redis.call('EXISTS', prefix .. 'l:' .. gen) == 0 then
    aborted = aborted + finish(gen, '4', ARGV[2], ARGV[3], ARGV[4])
  end
end
return {aborted, removed}
"""


def _producer_identity(pid: int) -> str:
    """A producer process, named so that no other host's or container's can match it."""
    return f"{_machine_scope()}/{pid}/{process_start_time(pid)}"


def _digest(data: bytes, hex_length: int) -> str:
    return hashlib.blake2b(data, digest_size=hex_length // 2, person=b"shmstream-r").hexdigest()


def _lookup_bases(raw_id: bytes) -> set[bytes]:
    """Every base (id up to its first ``::``) that an id matching ``raw_id`` can have.

    Usually just ``base_id(raw_id)``; but when ``raw_id`` ends in ``:`` (and has no ``::``),
    ``raw_id + "::m"`` has its first ``::`` one byte earlier, so its base is ``raw_id[:-1]``.
    """
    bases = {ids.base_id(raw_id)}
    if raw_id.endswith(b":") and b"::" not in raw_id:
        bases.add(raw_id[:-1])
    return bases


def _spans(capacity: int, offset: int, total: int, limit: int | None) -> list[int]:
    """Inclusive GETRANGE positions holding stream bytes ``[offset, end)``, where ``end`` is
    ``total`` capped at ``limit`` bytes from ``offset`` (at most capacity of them), as a
    flat ``[start, stop, ...]`` list: the ring layout of :func:`ring.read`."""
    end = total if limit is None else min(total, offset + limit)
    position = offset % capacity
    length = end - offset
    if position + length <= capacity:
        return [position, position + length - 1]
    return [position, capacity - 1, 0, length - (capacity - position) - 1]


# --- pub/sub ------------------------------------------------------------------------------


def _same(response):
    return response


class _Watch:
    """What one process knows about one session channel, fed by the listener thread.

    ``seq`` moves on every message and on (re)subscription; a waiter compares it with the
    ticket it took before looking at Redis, as the shm reader does with the futex word.
    ``cache`` holds the latest published bytes, contiguous from stream offset
    ``cache_start`` (at most ``CACHE_BYTES``): caught-up readers of this process read them
    without asking Redis. Guarded by ``cond``.
    """

    __slots__ = ("channel", "cond", "seq", "total", "stopped", "ended", "confirmed",
                 "confirmations", "refs", "cache", "cache_start")
    CACHE_BYTES = 256 * 1024

    def __init__(self, channel: bytes):
        self.channel = channel
        self.cond = threading.Condition(threading.Lock())
        self.seq = 0
        self.total = 0  # the highest total announced (a lower bound of the real one)
        self.stopped = False  # cancelled or finished
        self.ended = False  # finished
        self.confirmed = False  # the subscription is active: no message can be missed
        self.confirmations = 0  # how many times it became active (again, after reconnects)
        self.refs = 0
        self.cache = bytearray()
        self.cache_start = 0

    def remember(self, total: int, chunk: bytes | None) -> None:
        """Record an append that ended at ``total`` (its bytes, if published) and wake."""
        with self.cond:
            if chunk is not None:
                cache = self.cache
                start = total - len(chunk)
                if self.cache_start + len(cache) != start:  # a gap: keep only what follows
                    cache.clear()
                    self.cache_start = start
                cache += chunk
                excess = len(cache) - self.CACHE_BYTES
                if excess > 0:
                    del cache[:excess]  # cheap: bytearray deletes from the front in place
                    self.cache_start += excess
            if total > self.total:
                self.total = total
            self.seq += 1
            self.cond.notify_all()

    def cached(self, offset: int, limit: int | None) -> bytes:
        """Published bytes from ``offset`` on (at most ``limit``), or b"" if not cached."""
        with self.cond:
            start = self.cache_start
            end = start + len(self.cache)
            if not start <= offset < end:
                return b""
            if limit is not None and offset + limit < end:
                end = offset + limit
            return bytes(self.cache[offset - start : end - start])

    def forget(self) -> None:
        with self.cond:
            self.cache.clear()

    def bump(self) -> None:
        with self.cond:
            self.seq += 1
            self.cond.notify_all()

    def wait(self, ticket: int, timeout: float) -> None:
        with self.cond:
            if self.seq == ticket:
                self.cond.wait(timeout)


class _Notifier:
    """One pub/sub connection and listener thread per store and process.

    Callers subscribe and unsubscribe from their own threads (sends are serialized by
    ``_lock``); only the listener reads. Confirmations arrive in the order the SUBSCRIBE
    commands were sent, so a FIFO of watches tells which watch each one confirms. After a
    reconnect every watch is resubscribed and bumped: messages may have been lost meanwhile.
    """

    IDLE_UNSUBSCRIBE = 5.0  # seconds an unreferenced live watch stays subscribed for reuse

    def __init__(self, pool: redis.ConnectionPool):
        self._pool = pool
        # Reentrant: a handle's __del__ (which releases) may run in any thread, this one too.
        self._lock = threading.RLock()
        self._watches: dict[bytes, _Watch] = {}
        self._idle: dict[bytes, float] = {}
        self._pending: collections.deque[_Watch] = collections.deque()
        self._conn = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="shmstream-redis-pubsub",
                                        daemon=True)
        self._thread.start()

    # --- callers ---------------------------------------------------------------------------
    def acquire(self, channel: bytes) -> _Watch:
        with self._lock:
            watch = self._watches.get(channel)
            if watch is None:
                watch = self._watches[channel] = _Watch(channel)
                self._subscribe(watch)
            watch.refs += 1
            self._idle.pop(channel, None)
            return watch

    def release(self, watch: _Watch) -> None:
        with self._lock:
            watch.refs -= 1
            if watch.refs > 0 or self._watches.get(watch.channel) is not watch:
                return
            if watch.ended:
                self._unsubscribe(watch)
            else:
                self._idle[watch.channel] = time.monotonic()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._send("PING")  # wakes the listener out of its read
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        with self._lock:
            if self._conn is not None:
                self._conn.disconnect()
                self._conn = None
            for watch in self._watches.values():
                watch.confirmed = False
                watch.bump()

    # --- with _lock held -------------------------------------------------------------------
    def _send(self, *args) -> None:
        conn = self._conn
        # No socket: the listener is reconnecting and will subscribe every watch. Sending
        # now would make redis-py reconnect silently, without those subscriptions.
        if conn is None or getattr(conn, "_sock", None) is None:
            return
        try:
            conn.send_command(*args, check_health=False)
        except Exception as exc:  # redis-py closed the socket: the listener's read fails
            log.warning("redis pub/sub send failed (%s); the listener reconnects", exc)

    def _subscribe(self, watch: _Watch) -> None:
        if self._conn is not None:
            self._pending.append(watch)
            self._send("SUBSCRIBE", watch.channel)

    def _unsubscribe(self, watch: _Watch) -> None:
        del self._watches[watch.channel]
        self._idle.pop(watch.channel, None)
        self._send("UNSUBSCRIBE", watch.channel)

    # --- the listener thread ---------------------------------------------------------------
    def _connect(self):
        conn = self._pool.connection_class(**self._pool.connection_kwargs)
        conn.connect()
        # Under RESP3 (redis-py 8's default) messages are push frames, passed through a
        # handler that formats each one for a debug log; hand them back untouched instead.
        set_handler = getattr(conn._parser, "set_pubsub_push_handler", None)
        if set_handler is not None:
            set_handler(_same)
        with self._lock:
            self._conn = conn
            self._pending.clear()
            watches = list(self._watches.values())
            for watch in watches:
                self._subscribe(watch)
        return conn

    def _run(self) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                conn = self._connect()
                backoff = 0.05
                while not self._stopping:
                    if conn.can_read(timeout=1.0):
                        self._dispatch(conn.read_response(disconnect_on_error=False,
                                                          push_request=True))
                    else:
                        self._sweep()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if self._stopping:
                    break
                log.warning("redis pub/sub connection lost (%s); reconnecting", exc)
            except Exception:  # keep waking readers whatever happens; they fall back to polls
                log.exception("redis pub/sub listener failed; reconnecting")
            with self._lock:
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        self._conn.disconnect()
                    self._conn = None
                watches = list(self._watches.values())
            for watch in watches:
                watch.confirmed = False
                watch.forget()  # messages may have been lost: no gap may hide in a cache
                watch.bump()
            if not self._stopping:
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    def _dispatch(self, response) -> None:
        kind = response[0]
        if kind == b"message":
            watch = self._watches.get(response[1])
            if watch is None:
                return
            data = response[2]
            head = data[:1]
            if head == b"t":
                colon = data.find(b":", 1)
                if colon < 0:
                    watch.remember(int(data[1:]), None)
                else:
                    watch.remember(int(data[1:colon]), data[colon + 1 :])
                return
            if head == b"e":
                watch.ended = True
            watch.stopped = True
            watch.bump()
            if watch.ended:
                with self._lock:
                    if watch.refs <= 0 and self._watches.get(watch.channel) is watch:
                        self._unsubscribe(watch)
        elif kind == b"subscribe":
            with self._lock:
                watch = self._pending.popleft() if self._pending else None
            if watch is not None:
                watch.confirmations += 1
                watch.confirmed = True
                watch.bump()

    def _sweep(self) -> None:
        cutoff = time.monotonic() - self.IDLE_UNSUBSCRIBE
        with self._lock:
            for channel, since in list(self._idle.items()):
                watch = self._watches.get(channel)
                if since <= cutoff and watch is not None and watch.refs <= 0:
                    self._unsubscribe(watch)


class _LeaseKeeper:
    """Renews the leases of the sessions this store produces, from one background thread.

    A session leaves the set when it finishes. The answers also reach the producers' control
    watches, a fallback for a cancel message lost while pub/sub was down.
    """

    def __init__(self, store: RedisStore):
        self._renew = store._scripts["renew"]
        self._prefix = store._prefix
        self._lease_ms = str(int(store.lease * 1000))
        self._interval = store.lease / 4
        self._lock = threading.Lock()
        self._gens: dict[str, list[_Watch]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmstream-redis-lease",
                                        daemon=True)
        self._thread.start()

    def add(self, gen: str, watch: _Watch | None) -> None:
        with self._lock:
            watches = self._gens.setdefault(gen, [])
            if watch is not None:
                watches.append(watch)

    def discard(self, gen: str) -> None:
        with self._lock:
            self._gens.pop(gen, None)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                gens = list(self._gens)
            if not gens:
                continue
            try:
                answers = self._renew(args=[self._prefix, self._lease_ms, *gens])
            except redis.RedisError as exc:
                log.warning("lease renewal failed (%s); retrying", exc)
                continue
            with self._lock:
                for gen, answer in zip(gens, answers, strict=True):
                    if answer == 0:
                        continue
                    for watch in self._gens.get(gen, ()):
                        watch.stopped = True
                        watch.bump()
                    if answer == 2:
                        self._gens.pop(gen, None)


class _HotPath:
    """Per-thread bare connections for the two calls on the streaming path: append and fetch.

    Measured on loopback with redis-py 8.1: one EVALSHA through ``Redis``/``Script`` costs
    63-74 µs, the same command on a bare :class:`redis.Connection` 28 µs. The client's pool
    checkout (which polls the socket), retry wrapper and metrics recorders cost more than
    the round trip. Everything else goes through the ordinary client.

    A call that fails on the connection is retried once only when ``idempotent``: an append
    whose reply was lost may have happened, and appending it again would corrupt offsets.
    So that this stays rare, a connection idle for ``IDLE_CHECK`` seconds is first checked
    for a close by the server (idle timeout, restart), as redis-py's pool does at checkout.
    """

    IDLE_CHECK = 1.0

    READ_SIZE = 1 << 20  # redis-py reads 64 KiB per recv by default: slow for a 4 MiB replay

    def __init__(self, pool: redis.ConnectionPool):
        self._pool = pool
        self._options = dict(pool.connection_kwargs, socket_read_size=self.READ_SIZE)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: weakref.WeakSet = weakref.WeakSet()

    def _connection(self):
        local = self._local
        conn = getattr(local, "conn", None)
        now = time.monotonic()
        if conn is None or local.pid != os.getpid():  # a forked child never shares a socket
            conn = self._pool.connection_class(**self._options)
            local.conn, local.pid = conn, os.getpid()
            with self._lock:
                self._connections.add(conn)
        elif now - local.used > self.IDLE_CHECK and getattr(conn, "_sock", None) is not None:
            try:
                stale = conn.can_read(timeout=0)  # EOF, or bytes nobody asked for
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                stale = True
            if stale:
                conn.disconnect()  # the next send connects afresh
        local.used = now
        return conn

    def evalsha(self, script, keys: list, args: list, idempotent: bool):
        conn = self._connection()
        failures = 0
        while True:
            try:
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args,
                                  check_health=False)
                return conn.read_response()
            except NoScriptError:  # not run: load it (server restarted or flushed)
                conn.send_command("SCRIPT", "LOAD", script.script, check_health=False)
                conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()
                failures += 1
                if not idempotent or failures > 1:
                    raise

    def transaction(self, commands: list[tuple]) -> list:
        """Run ``commands`` in one MULTI/EXEC round trip (read-only: retried once)."""
        conn = self._connection()
        packed = conn.pack_commands([("MULTI",), *commands, ("EXEC",)])
        failures = 0
        while True:
            try:
                conn.send_packed_command(packed, check_health=False)
                for _ in range(len(commands) + 1):
                    conn.read_response()  # +OK, then +QUEUED each
                return conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()
                failures += 1
                if failures > 1:
                    raise
            except BaseException:
                conn.disconnect()  # replies may be left unread: never reuse the socket
                raise

    def close(self) -> None:
        with self._lock:
            connections = list(self._connections)
            self._connections = weakref.WeakSet()
        for conn in connections:
            with contextlib.suppress(Exception):
                conn.disconnect()


# --- sessions -----------------------------------------------------------------------------


class RedisSession(Session):
    """A handle on one generation of a session. Not thread-safe: one handle per thread."""

    def __init__(self, store: RedisStore, gen: str, conversation_id: str, capacity: int,
                 control: _Watch | None = None):
        self.conversation_id = conversation_id
        self.store = store
        self.generation = gen
        self.capacity = capacity
        prefix = store._prefix
        self._meta = prefix + "s:" + gen
        self._data = prefix + "d:" + gen
        self._lease = prefix + "l:" + gen
        self._notify_channel = (prefix + "n:" + gen).encode()
        self._control_channel = (prefix + "k:" + gen).encode()
        self._notify: _Watch | None = None
        self._control = control
        self._verified = -1  # the control subscription's confirmation Redis was checked after
        self._stopped = False  # this handle finished or cancelled the session
        self._total = 0  # the highest total this handle saw
        self._ticket = 0
        self._seen_seq = -1  # the notify seq when Redis last said "nothing new"
        self._seen_at = 0.0
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisSession(generation={self.generation!r})"

    def reopen(self) -> RedisSession:
        # A generation's keys outlive a replace or evict by a grace period for open handles.
        return RedisSession(self.store, self.generation, self.conversation_id, self.capacity)

    # --- producing ------------------------------------------------------------------------
    def append(self, data) -> bool:
        if len(data) == 0:
            return True
        store = self.store
        total = store._hot.evalsha(store._scripts["append"], [self._meta, self._data],
                                   [bytes(data), self._notify_channel, _PUBLISH_BYTES],
                                   idempotent=False)
        if total < 0:
            return False
        self._total = total
        return True

    def _finish(self, state: State, cancel: bool) -> bool:
        if state is State.RUNNING:
            raise ValueError("finalize needs a terminal state")
        store = self.store
        ended, _exists = store._scripts["finish"](
            args=[store._prefix, self.generation, int(state), "1" if cancel else "0",
                  *store._finish_times()]
        )
        self._stopped = True
        if ended:
            store._keeper_discard(self.generation)
        return bool(ended)

    @property
    def producer_should_stop(self) -> bool:
        if self._stopped:
            return True
        control = self._control
        if control is None:
            control = self._control = self.store._notifier().acquire(self._control_channel)
        if control.stopped:
            return True
        if control.confirmed and self._verified == control.confirmations:
            return False
        # Not subscribed yet, or subscribed again after a reconnect: what happened before
        # the subscription took effect is only in Redis. One round trip, then the flag does.
        epoch = control.confirmations if control.confirmed else -1
        fields = self.store._redis.hmget(self._meta, "state", "cancel")
        if fields[0] != _RUNNING or fields[1] == b"1":
            control.stopped = True
            return True
        self._verified = epoch
        return False

    # --- reading --------------------------------------------------------------------------
    def info(self) -> SessionInfo:
        pipe = self.store._redis.pipeline(transaction=False)
        pipe.hgetall(self._meta)
        pipe.exists(self._lease)
        pipe.pubsub_numsub(self._notify_channel)
        fields, lease, numsub = pipe.execute()
        if not fields:
            raise SessionNotFound()
        waiters = numsub[0][1] if numsub else 0
        return self.store._info_from(fields, bool(lease), waiters)

    def _fetch(self, spans: list[int]):
        """Header and span bytes in one atomic MULTI/EXEC: ``(total, finished, pieces)``, or
        None when the session is gone (expired, or evicted past its grace period).

        A transaction, not a script: Lua would copy every byte twice more (measured: a 4 MiB
        read took 11-18 ms through Lua, 4-8 ms in MULTI/EXEC on the same connection).
        """
        store = self.store
        data = self._data
        commands = [("HMGET", self._meta, "state", "total"), ("EXISTS", self._lease)]
        commands += [("GETRANGE", data, spans[i], spans[i + 1]) for i in range(0, len(spans), 2)]
        reply = store._hot.transaction(commands)
        (state, total), lease = reply[0], reply[1]
        if state is None:
            return None
        total = int(total)
        if total > self._total:
            self._total = total
        if state == _RUNNING and not lease:
            if store._scripts["abort_if_dead"](
                args=[store._prefix, self.generation, *store._finish_times()]
            ):
                log.warning("session generation %s: producer lease expired; aborted",
                            self.generation)
            return self._fetch(spans)  # finished now, or the producer renewed just in time
        return total, state != _RUNNING, reply[2:]

    def _poll(self, offset: int, limit: int | None) -> tuple[bytes, bool]:
        capacity = self.capacity
        watch = self._notify
        if watch is not None:
            self._ticket = watch.seq  # before looking at Redis: no wake-up can be missed
            if watch.total > self._total:
                self._total = watch.total
            if offset < self._total:
                # Lapped by what was announced: lost, as the shm reader would find it.
                ring.next_step(self._total, capacity, False, offset)
                chunk = watch.cached(offset, limit)
                if chunk:
                    return chunk, False
            if (offset >= self._total and watch.confirmed and self._ticket == self._seen_seq
                    and time.monotonic() - self._seen_at < RECHECK_INTERVAL):
                return b"", watch.ended  # nothing was announced since Redis said so

        known = self._total
        spans: list[int] = []
        if offset < known:
            ring.next_step(known, capacity, False, offset)  # raises OffsetLost if lapped
            spans = _spans(capacity, offset, known, limit)
        header = self._fetch(spans)
        if header is None:
            return b"", True
        total, finished, pieces = header
        step = ring.next_step(total, capacity, finished, offset)
        if step is ring.Step.DATA:
            if not spans:  # the header was the news: fetch the bytes it announced
                spans = _spans(capacity, offset, total, limit)
                header = self._fetch(spans)
                if header is None:
                    return b"", True
                total, finished, pieces = header
            # The copy is good only if the producer did not lap it meanwhile (same call).
            if offset < ring.dropped_for(total, capacity):
                raise OffsetLost()
            return b"".join(pieces), finished
        if step is ring.Step.END:
            return b"", True
        if watch is None:
            watch = self._notify = self.store._notifier().acquire(self._notify_channel)
            self._ticket = watch.seq  # its confirmation will bump seq: we re-poll then
        self._seen_seq = self._ticket
        self._seen_at = time.monotonic()
        return b"", False

    def _sleep(self, timeout: float) -> None:
        watch = self._notify
        if watch is None:
            time.sleep(timeout)
        else:
            watch.wait(self._ticket, timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for attribute in ("_notify", "_control"):
            watch = getattr(self, attribute)
            if watch is not None:
                setattr(self, attribute, None)
                notifier = self.store._current_notifier()
                if notifier is not None:
                    notifier.release(watch)

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


# --- the store ----------------------------------------------------------------------------


class RedisStore(SessionStore):
    """Sessions in Redis under one namespace, shared by every process and host using it.

    Thread-safe. Construct one per process (after fork, it makes its own threads again).
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        capacity: int = DEFAULT_CAPACITY,
        ttl: float = DEFAULT_TTL,
        max_sessions: int | None = None,
        lease: float = DEFAULT_LEASE,
        retire_grace: float = RETIRE_GRACE,
        max_shm_bytes: int | None = None,  # accepted for symmetry with ShmStore; no meaning
    ):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        if lease <= 0:
            raise ValueError("lease must be positive")
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("the Redis client must not decode responses (streams are bytes)")
        self.namespace = ids.validate_namespace(namespace)
        self.capacity = capacity
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.lease = lease
        self.retire_grace = retire_grace
        self._redis = client
        self._prefix = f"shmstream:{{{namespace}}}:"
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("create", _LUA_CREATE), ("append", _LUA_APPEND), ("finish", _LUA_FINISH),
                ("evict", _LUA_EVICT), ("get", _LUA_GET),
                ("abort_if_dead", _LUA_ABORT_IF_DEAD), ("renew", _LUA_RENEW),
                ("gc_expire", _LUA_GC_EXPIRE), ("gc_running", _LUA_GC_RUNNING),
            )
        }
        self._hot = _HotPath(client.connection_pool)
        self._host = socket.gethostname()
        self._scope_set = self._prefix + "p:" + _digest(_machine_scope().encode(), 16)
        self._threads_lock = threading.Lock()
        self._threads_pid = 0
        self._notifier_obj: _Notifier | None = None
        self._keeper_obj: _LeaseKeeper | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop_threads, self.__dict__)

    @classmethod
    def from_url(cls, url: str, **options) -> RedisStore:
        """A store on ``url`` (``redis://``, ``rediss://`` or ``unix://``); ``options`` are
        the constructor's keywords. RESP2 unless the URL asks for ``protocol=3``: measured
        here, redis-py 8's RESP3 path adds about 40 µs to every command."""
        extra = {} if "protocol=" in url else {"protocol": 2}
        client = redis.Redis.from_url(url, decode_responses=False, **extra)
        store = cls(client, **options)
        store._url = url
        return store

    def __repr__(self) -> str:
        return f"RedisStore(namespace={self.namespace!r}, capacity={self.capacity})"

    def __reduce__(self):
        # Picklable for multiprocessing: the child connects anew with the same settings.
        url = getattr(self, "_url", None)
        if url is None:
            raise TypeError("only stores made with RedisStore.from_url can be pickled")
        return _unpickle_store, (url, dict(
            namespace=self.namespace, capacity=self.capacity, ttl=self.ttl,
            max_sessions=self.max_sessions, lease=self.lease, retire_grace=self.retire_grace,
        ))

    # --- background threads (started on first need, again after fork) --------------------
    def _ensure_threads_pid(self) -> None:
        pid = os.getpid()
        if self._threads_pid != pid:
            # A forked child inherits the objects but not the threads: start afresh.
            self._notifier_obj = None
            self._keeper_obj = None
            self._threads_pid = pid

    def _notifier(self) -> _Notifier:
        with self._threads_lock:
            self._ensure_threads_pid()
            if self._closed:
                raise RuntimeError("the store is closed")
            if self._notifier_obj is None:
                self._notifier_obj = _Notifier(self._redis.connection_pool)
            return self._notifier_obj

    def _current_notifier(self) -> _Notifier | None:
        return self._notifier_obj if self._threads_pid == os.getpid() else None

    def _keeper(self) -> _LeaseKeeper:
        with self._threads_lock:
            self._ensure_threads_pid()
            if self._closed:
                raise RuntimeError("the store is closed")
            if self._keeper_obj is None:
                self._keeper_obj = _LeaseKeeper(self)
            return self._keeper_obj

    def _keeper_discard(self, gen: str) -> None:
        keeper = self._keeper_obj
        if keeper is not None and self._threads_pid == os.getpid():
            keeper.discard(gen)

    def close(self) -> None:
        """Stop this store's threads and connections. Sessions it produces stop being
        renewed: unless finished, they are aborted once their lease runs out."""
        with self._threads_lock:
            self._closed = True
        self._finalizer()
        self._hot.close()
        self._redis.close()

    # --- helpers ---------------------------------------------------------------------------
    def _ids(self, conversation_id: str) -> tuple[bytes, str, str]:
        """The id's bytes (validated as the shm backend does), base hash and id hash."""
        raw = ids.encode_id(conversation_id)
        return raw, _digest(ids.base_id(raw), 16), _digest(raw, 32)

    def _finish_times(self) -> list[str]:
        """now_us, ttl_ms and the expiry deadline (ms) for a session finishing now."""
        now = now_us()
        ttl_ms = max(0, int(self.ttl * 1000))
        return [str(now), str(ttl_ms), str(now // 1000 + ttl_ms)]

    def _info_from(self, fields: dict, lease: bool, waiters: int = 0) -> SessionInfo:
        total = int(fields[b"total"])
        capacity = int(fields[b"cap"])
        try:
            metadata = msgpack.unpackb(fields.get(b"rec", b"\x80"), raw=False)
        except Exception:  # msgpack raises several unrelated types
            metadata = {}
        return SessionInfo(
            conversation_id=fields[b"id"].decode("utf-8"),
            state=State(int(fields[b"state"])),
            total_bytes=total,
            dropped_bytes=ring.dropped_for(total, capacity),
            capacity=capacity,
            started_at=int(fields[b"started"]) / 1e6,
            completed_at=int(fields[b"completed"]) / 1e6,
            producer_pid=int(fields.get(b"pid", 0)),
            producer_alive=lease,
            waiters=waiters,
            metadata=metadata if isinstance(metadata, dict) else {},
        )

    # --- create / replace -----------------------------------------------------------------
    def create_or_replace(self, conversation_id: str,
                          metadata: dict | None = None) -> RedisSession:
        raw, base_hash, id_hash = self._ids(conversation_id)
        record = ids.encode_metadata({"id": conversation_id, **(metadata or {})})
        gen = secrets.token_hex(8)
        prefix = self._prefix
        member = f"{gen}:{base_hash}:{id_hash}"
        now, ttl_ms, deadline = self._finish_times()
        notifier = self._notifier()
        # Subscribe before the session exists: a cancel right after creation is not missed.
        control = notifier.acquire((prefix + "k:" + gen).encode())
        try:
            replaced = self._scripts["create"](
                keys=[prefix + "i:" + base_hash, prefix + "s:" + gen, prefix + "l:" + gen],
                args=[prefix, id_hash, gen, member, raw, record, self.capacity, now, ttl_ms,
                      deadline, int(self.retire_grace * 1000), int(self.lease * 1000),
                      self.max_sessions or 0, int(now) // 1000, self._host, os.getpid(),
                      _producer_identity(os.getpid()), self._scope_set],
            )
        except BaseException:
            notifier.release(control)
            raise
        if replaced < 0:
            notifier.release(control)
            raise StoreUnavailable(f"session quota reached ({self.max_sessions} sessions)")
        self._keeper().add(gen, control)
        log.info("session created id=%s gen=%s replaced=%s",
                 ids.short_hash(conversation_id), gen, "yes" if replaced else "no")
        session = RedisSession(self, gen, conversation_id, self.capacity, control=control)
        session.replaced = bool(replaced)
        return session

    # --- finding --------------------------------------------------------------------------
    def get(self, conversation_id: str) -> RedisSession | None:
        _raw, base_hash, id_hash = self._ids(conversation_id)
        found = self._scripts["get"](keys=[self._prefix + "i:" + base_hash],
                                     args=[self._prefix, id_hash])
        if found is None:
            return None
        gen, stored, capacity, total = found
        if stored.decode("utf-8") != conversation_id:
            return None  # a 128-bit hash collision: not this session
        session = RedisSession(self, gen.decode(), conversation_id, int(capacity))
        session._total = int(total)  # a fresh reader goes straight to the bytes
        return session

    def _infos(self, gens: Iterable[str]) -> list[SessionInfo]:
        gens = list(dict.fromkeys(gens))
        if not gens:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for gen in gens:
            pipe.hgetall(self._prefix + "s:" + gen)
            pipe.exists(self._prefix + "l:" + gen)
        replies = pipe.execute()
        infos = []
        for index in range(0, len(replies), 2):
            fields, lease = replies[index], replies[index + 1]
            if fields and b"member" in fields:
                infos.append(self._info_from(fields, bool(lease)))
        return infos

    def list(self) -> list[SessionInfo]:
        members = self._redis.zrange(self._prefix + "all", 0, -1)
        return self._infos(member.decode().split(":", 1)[0] for member in members)

    def lookup(self, conversation_ids: Iterable[str]) -> list[SessionInfo]:
        requested = []
        bases: set[bytes] = set()
        for conversation_id in conversation_ids:
            try:
                raw = ids.encode_id(conversation_id)
            except InvalidConversationId:
                continue
            requested.append(conversation_id)
            bases |= _lookup_bases(raw)
        if not requested:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for base in bases:
            pipe.hvals(self._prefix + "i:" + _digest(base, 16))
        gens = [gen.decode() for values in pipe.execute() for gen in values]
        return [
            info for info in self._infos(gens)
            if any(matches_lookup(info.conversation_id, rid) for rid in requested)
        ]

    # --- removing -------------------------------------------------------------------------
    def evict(self, conversation_id: str) -> bool:
        return self._evict(conversation_id, State.DONE, cancel=False)

    def evict_and_cancel(self, conversation_id: str) -> bool:
        return self._evict(conversation_id, State.CANCELLED, cancel=True)

    def _evict(self, conversation_id: str, state: State, cancel: bool) -> bool:
        _raw, base_hash, id_hash = self._ids(conversation_id)
        found = self._scripts["evict"](
            keys=[self._prefix + "i:" + base_hash],
            args=[self._prefix, id_hash, int(state), "1" if cancel else "0",
                  *self._finish_times(), int(self.retire_grace * 1000)],
        )
        if found:
            log.info("session %s id=%s", "cancelled" if cancel else "evicted",
                     ids.short_hash(conversation_id))
        return bool(found)

    def gc(self, now: float | None = None) -> GCReport:
        """One pass: remove sessions past their expiry (Redis usually did already), abort
        running sessions whose producer's lease ran out, drop stale index entries."""
        now = time.time() if now is None else now
        report = GCReport()
        now_ms = str(int(now * 1000))
        while True:
            removed = self._scripts["gc_expire"](args=[self._prefix, now_ms, _GC_BATCH])
            report.expired += removed
            if removed < _GC_BATCH:
                break
        aborted, removed = self._scripts["gc_running"](args=[self._prefix,
                                                             *self._finish_times()])
        report.aborted += aborted
        report.corrupt_removed += removed
        report.kept = self._redis.zcard(self._prefix + "all")
        if report.aborted:
            log.warning("gc: %d session(s) aborted: their producer's lease expired",
                        report.aborted)
        return report

    def abort_producers(self, pids: Iterable[int] | None = None) -> int:
        """Abort the running sessions produced on this machine (same boot, same pid
        namespace) by a process that is dead (``pids`` None) or one of ``pids``, without
        waiting for their leases to run out. Returns how many were aborted."""
        targets = None if pids is None else set(pids)
        gens = [gen.decode() for gen in self._redis.smembers(self._scope_set)]
        if not gens:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for gen in gens:
            pipe.hmget(self._prefix + "s:" + gen, "state", "producer")
        scope = _machine_scope() + "/"
        aborted = 0
        stale = []
        for gen, (state, producer) in zip(gens, pipe.execute(), strict=True):
            if state != _RUNNING:
                stale.append(gen)  # its keys vanished without a finish (gc of debris)
                continue
            if not producer or not producer.decode().startswith(scope):
                continue
            pid_text, _, start_text = producer.decode()[len(scope):].partition("/")
            pid, start_time = int(pid_text), int(start_text or 0)
            doomed = not process_alive(pid, start_time) if targets is None else pid in targets
            if doomed:
                ended, _exists = self._scripts["finish"](
                    args=[self._prefix, gen, int(State.ABORTED), "0", *self._finish_times()]
                )
                if ended:
                    aborted += 1
                    self._keeper_discard(gen)
                    log.warning("session gen=%s aborted: producer pid %d %s", gen, pid,
                                "died" if targets is None else "stopped")
        if stale:
            self._redis.srem(self._scope_set, *stale)
        return aborted

    def purge(self) -> int:
        """Delete every key of the namespace (tests, operators). Returns how many."""
        removed = 0
        batch = []
        for key in self._redis.scan_iter(match=_glob_escape(self._prefix) + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                removed += self._redis.delete(*batch)
                batch.clear()
        if batch:
            removed += self._redis.delete(*batch)
        return removed


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _stop_threads(state: dict) -> None:
    """Stop a store's threads (called by close() or when the store is garbage)."""
    if state.get("_threads_pid") != os.getpid():
        return
    for name in ("_notifier_obj", "_keeper_obj"):
        worker = state.get(name)
        state[name] = None
        if worker is not None:
            worker.stop()


def _unpickle_store(url: str, options: dict) -> RedisStore:
    return RedisStore.from_url(url, **options)


# --- a throwaway server for tests and benchmarks ------------------------------------------


class LocalRedisServer:
    """A ``redis-server`` on a free loopback port with persistence off, for tests and
    benchmarks. ``with LocalRedisServer() as url: ...`` or ``start()``/``stop()``."""

    def __init__(self, executable: str = "redis-server"):
        self.executable = shutil.which(executable) or executable
        self.process: subprocess.Popen | None = None
        self.url = ""
        self._dir = ""

    @staticmethod
    def available(executable: str = "redis-server") -> bool:
        return shutil.which(executable) is not None

    def start(self, timeout: float = 10.0) -> str:
        """Start it and wait until it answers PING; returns its URL. Raises RuntimeError."""
        self._dir = tempfile.mkdtemp(prefix="shmstream-redis-")
        last_error = None
        for _attempt in range(5):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            self.process = subprocess.Popen(
                [self.executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self._dir, "--daemonize", "no",
                 "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
            deadline = time.monotonic() + timeout
            try:
                while time.monotonic() < deadline and self.process.poll() is None:
                    try:
                        client.ping()
                        self.url = url
                        return url
                    except redis.ConnectionError as exc:
                        last_error = exc
                        time.sleep(0.02)
            finally:
                client.close()
            self._kill()  # the port was taken meanwhile, or the server failed: try again
        raise RuntimeError(f"redis-server did not start: {last_error}")

    def _kill(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def stop(self) -> None:
        self._kill()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
