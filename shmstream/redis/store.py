"""The Redis backend: the same sessions as :mod:`shmstream.shm.store`, shared across hosts.

Chosen with ``SHMSTREAM_BACKEND=redis://host:port/db``. It implements the
:class:`~shmstream.store.SessionStore` interface; the protocol decisions (what a reader does
at an offset, what is dropped) come from :mod:`shmstream.store.ring`, and the id rules
(lookup bases, the stored record) from :mod:`shmstream.store.ids`, so the two backends
cannot drift apart.

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
- **The ring is a string written with SETRANGE** at ``offset % capacity``, exactly the
  layout of :mod:`shmstream.store.ring`. The alternative, APPEND plus trimming the front,
  needs a copy of the whole held buffer whenever it trims (Redis cannot cut the front of a
  string), and the string index of a byte changes at every trim, so a reader could not
  compute where to read without first reading the header. With the ring a byte never moves:
  a reader asks for the positions of ``[offset, end)`` and, in the same round trip after
  them, for ``total``; the bytes are intact iff ``offset >= dropped_for(total_after,
  capacity)`` (Aeron's check after copy). ``dropped`` is derived (``ring.dropped_for``),
  never stored.
- **Memory in proportion to the bytes held.** The string only grows as far as bytes were
  written, never past ``capacity``; SETRANGE grows it greedily (up to twice its length below
  1 MiB, +1 MiB above), so finishing a session whose ring never wrapped copies it once into
  a string of its exact size. ``SessionInfo.allocated_bytes`` is the ``MEMORY USAGE`` of the
  session's keys.
- **Atomic steps are Lua scripts** (:mod:`shmstream.redis.scripts`). A read is one round
  trip of the ``GETRANGE`` spans Python computed, then the header (the check after copy):
  no protocol logic in Lua on the read side, and no MULTI (refused at maxmemory).
- **Redis full** (maxmemory, noeviction): new sessions and appends are refused whole
  (StoreUnavailable); finishing, cancelling, evicting, lease renewals and reads still work,
  each script's first write being one that cannot grow memory.
- **Lookup** reads the per-base index of each requested id (base = id up to its first ``::``),
  never the keyspace. The index cannot expire field by field, so stale fields (their session
  expired) are skipped, and removed by ``get`` and ``gc``.
- **TTL**: finishing sets ``PEXPIRE ttl`` on the session's keys and its ``all`` score to the
  deadline; Redis removes the keys itself, and ``gc(now)`` removes anything past its deadline
  (so a caller's clock can drive it, as with shared memory) and the index entries.
- **Dead producers**: leases (:mod:`shmstream.redis.leases`). Closing a store (or its process
  dying) stops the renewals.
- **Waking**: :mod:`shmstream.redis.notifier`. An idle reader costs no Redis traffic: it
  re-checks Redis only after a message, after ``RECHECK_INTERVAL`` (to notice an expired
  lease) or after the pub/sub connection came back (messages may have been lost).
- **The streaming calls** (append, fetch) go over a bare per-thread connection
  (:class:`~shmstream.redis.connections.HotPath`).
- **Cancel** publishes ``c`` on the control channel; the producer's handle subscribed to it at
  creation, so ``producer_should_stop`` is a Python attribute read once the subscription is
  confirmed (before that, and while pub/sub is down, it asks Redis). The lease renewal also
  reports cancelled sessions, a fallback if a message was lost.
- **Redis down**: every store call raises :class:`~shmstream.store.errors.StoreUnavailable`
  (503), one log line says it went and one that it is back; nothing needs restarting.

Not supported: Redis Cluster with more than one slot per namespace (a namespace is one slot by
design), and per-store quotas on bytes (``max_shm_bytes`` is accepted and ignored).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Iterable

import msgpack
import redis

from shmstream.redis import scripts
from shmstream.redis.connections import Health, HotPath, client_for_url, store_call
from shmstream.redis.leases import LeaseKeeper, parse_identity, producer_identity
from shmstream.redis.notifier import Notifier
from shmstream.redis.session import RUNNING, RedisSession
from shmstream.store import ids, ring
from shmstream.store.errors import StoreUnavailable
from shmstream.store.interface import (
    DEFAULT_CAPACITY,
    DEFAULT_TTL,
    GCReport,
    SessionInfo,
    SessionStore,
    now_us,
)
from shmstream.store.procs import Liveness, machine_scope, process_alive, producer_doomed
from shmstream.store.states import State

log = logging.getLogger("shmstream.redis")

DEFAULT_LEASE = 10.0  # seconds a producer's lease lasts without renewal
RETIRE_GRACE = 30.0  # seconds an evicted or replaced session stays readable by open handles
_GC_BATCH = 500
# Key names keep the digest the first Redis layout used, so that a rolling upgrade still
# finds the sessions older workers wrote.
_KEY_DIGEST = b"shmstream-r"
_BASE_HASH_HEX = 16
_ID_HASH_HEX = 32


def _digest(data: bytes, hex_length: int) -> str:
    return ids.digest(data, hex_length, person=_KEY_DIGEST)


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
        self._where = _describe(client)
        self._health_of: tuple[int, Health] = (os.getpid(), Health.for_process(self._where))
        self._prefix = f"shmstream:{{{namespace}}}:"
        self._scripts = scripts.register(client)
        self._hot = HotPath(client.connection_pool)
        self._host = socket.gethostname()
        self._scope = machine_scope()
        self._scope_set = self._prefix + "p:" + _digest(self._scope.encode(), 16)
        self._memory_usage = True  # MEMORY USAGE answers (some managed Redis disable it)
        self._threads_lock = threading.Lock()
        self._threads_pid = 0
        self._notifier_obj: Notifier | None = None
        self._keeper_obj: LeaseKeeper | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop_threads, self.__dict__)

    @classmethod
    def from_url(cls, url: str, **options) -> RedisStore:
        """A store on ``url`` (see :func:`~shmstream.redis.connections.client_for_url`);
        ``options`` are the constructor's keywords. Connects lazily: a Redis that is down
        makes the calls raise StoreUnavailable, not this."""
        store = cls(client_for_url(url), **options)
        store._url = url
        return store

    @property
    def _health(self) -> Health:
        # Per process, not per store: a store that survives a fork reports for its child.
        pid, health = self._health_of
        if pid != os.getpid():
            self._health_of = pid, health = os.getpid(), Health.for_process(self._where)
        return health

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

    def _notifier(self) -> Notifier:
        with self._threads_lock:
            self._ensure_threads_pid()
            if self._closed:
                raise RuntimeError("the store is closed")
            if self._notifier_obj is None:
                self._notifier_obj = Notifier(self._redis.connection_pool, self._health)
            return self._notifier_obj

    def _current_notifier(self) -> Notifier | None:
        return self._notifier_obj if self._threads_pid == os.getpid() else None

    def _keeper(self) -> LeaseKeeper:
        with self._threads_lock:
            self._ensure_threads_pid()
            if self._closed:
                raise RuntimeError("the store is closed")
            if self._keeper_obj is None:
                self._keeper_obj = LeaseKeeper(self._scripts["renew"], self._prefix,
                                               self.lease, self._health)
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
        return raw, _digest(ids.base_id(raw), _BASE_HASH_HEX), _digest(raw, _ID_HASH_HEX)

    def _finish_times(self) -> list[str]:
        """now_us, ttl_ms and the expiry deadline (ms) for a session finishing now."""
        now = now_us()
        ttl_ms = max(0, int(self.ttl * 1000))
        return [str(now), str(ttl_ms), str(now // 1000 + ttl_ms)]

    def _queue_info(self, pipe, gen: str) -> None:
        """Queue on ``pipe`` what :meth:`_info_from_replies` needs for one session."""
        prefix = self._prefix
        pipe.hgetall(prefix + "s:" + gen)
        pipe.exists(prefix + "l:" + gen)
        if self._memory_usage:
            for kind in ("s:", "d:", "l:"):
                pipe.memory_usage(prefix + kind + gen)

    def _info_replies(self) -> int:
        return 5 if self._memory_usage else 2

    def _info_from_replies(self, replies: list, waiters: int = 0) -> SessionInfo | None:
        fields, lease = replies[0], replies[1]
        if isinstance(fields, Exception):
            raise fields
        if not fields or b"member" not in fields:
            return None
        allocated = 0
        for usage in replies[2:]:
            if isinstance(usage, redis.ResponseError):
                self._memory_usage = False  # the command is disabled here: stop asking
                log.warning("redis MEMORY USAGE is refused (%s); allocated bytes show 0",
                            usage)
                allocated = 0
                break
            if isinstance(usage, Exception):
                raise usage
            allocated += usage or 0
        return self._info_from(fields, bool(lease), waiters, allocated)

    def _info_from(self, fields: dict, lease: bool, waiters: int = 0,
                   allocated: int = 0) -> SessionInfo:
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
            allocated_bytes=allocated,
        )

    # --- create / replace -----------------------------------------------------------------
    @store_call
    def create_or_replace(self, conversation_id: str,
                          metadata: dict | None = None) -> RedisSession:
        raw, base_hash, id_hash = self._ids(conversation_id)
        record = ids.encode_metadata(ids.session_record(conversation_id, metadata))
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
                      producer_identity(os.getpid()), self._scope_set],
            )
        except BaseException:
            notifier.release(control)
            raise
        if replaced < 0:
            notifier.release(control)
            raise StoreUnavailable(f"session quota reached ({self.max_sessions} sessions)")
        self._keeper().add(gen, control)
        log.debug("session created id=%s gen=%s replaced=%s",  # as the shm store's: DEBUG
                  ids.short_hash(conversation_id), gen, "yes" if replaced else "no")
        session = RedisSession(self, gen, conversation_id, self.capacity, control=control)
        session.replaced = bool(replaced)
        return session

    # --- finding --------------------------------------------------------------------------
    @store_call
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
            self._queue_info(pipe, gen)
        step = self._info_replies()
        replies = pipe.execute(raise_on_error=False)
        infos = []
        for index in range(0, len(replies), step):
            info = self._info_from_replies(replies[index : index + step])
            if info is not None:
                infos.append(info)
        return infos

    @store_call
    def list(self) -> list[SessionInfo]:
        members = self._redis.zrange(self._prefix + "all", 0, -1)
        return self._infos(member.decode().split(":", 1)[0] for member in members)

    @store_call
    def lookup(self, conversation_ids: Iterable[str]) -> list[SessionInfo]:
        request = ids.LookupRequest.parse(conversation_ids)
        if not request.requested:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for base in request.bases:
            pipe.hvals(self._prefix + "i:" + _digest(base, _BASE_HASH_HEX))
        gens = [gen.decode() for values in pipe.execute() for gen in values]
        return [info for info in self._infos(gens) if request.matches(info.conversation_id)]

    # --- removing -------------------------------------------------------------------------
    def evict(self, conversation_id: str) -> bool:
        return self._evict(conversation_id, State.DONE, cancel=False)

    def evict_and_cancel(self, conversation_id: str) -> bool:
        return self._evict(conversation_id, State.CANCELLED, cancel=True)

    @store_call
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

    @store_call
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

    @store_call
    def abort_producers(self, pids: Iterable[int] | None = None, repeated: bool = False
                        ) -> int:
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
        aborted = 0
        stale = []
        for gen, (state, producer) in zip(gens, pipe.execute(), strict=True):
            if state != RUNNING:
                stale.append(gen)  # its keys vanished without a finish (gc of debris)
                continue
            identity = parse_identity(producer.decode(), self._scope) if producer else None
            if identity is None:
                continue  # made on another machine or in another pid namespace
            pid, start_time = identity
            liveness = Liveness.ALIVE if process_alive(pid, start_time) else Liveness.DEAD
            if producer_doomed(liveness, pid, targets):
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

    @store_call
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


def _describe(client: redis.Redis) -> str:
    """Where ``client`` connects, for log lines (never its password)."""
    options = client.connection_pool.connection_kwargs
    if "path" in options:
        return f"unix:{options['path']}"
    return f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"


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
