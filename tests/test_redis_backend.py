"""Redis-only behaviour: leases, cross-process cancel latency, replace races, no keyspace
scans, pub/sub recovery. The backend-agnostic behaviour is in test_store_contract.py."""

from __future__ import annotations

import os
import pickle
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from polling import wait_until as _wait_until

from shmstream import State
from shmstream.backends import open_store
from shmstream.config import Settings
from shmstream.redis.store import RedisStore

pytestmark = pytest.mark.usefixtures("redis_url")


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.005) -> bool:
    return _wait_until(predicate, timeout, interval)


# Leases long enough that a renewal thread starved by a loaded machine never misses one
# (renewals run every lease / 4); the tests wait on renewals and expiry, not on a clock.
LEASE = 2.0


def wait_for_renewals(store, count: int = 2, timeout: float = 30.0) -> bool:
    """Whether the lease keys of ``store``'s namespace were renewed ``count`` times (their
    remaining time went up) within ``timeout`` seconds."""
    pattern = f"{store._prefix}l:*"
    seen = {"renewals": 0, "last": None}

    def renewed() -> bool:
        keys = list(store._redis.scan_iter(match=pattern))
        remaining = max((store._redis.pttl(key) for key in keys), default=-2)
        if seen["last"] is not None and remaining > seen["last"]:
            seen["renewals"] += 1
        seen["last"] = remaining
        return seen["renewals"] >= count

    return _wait_until(renewed, timeout, 0.02)


def run_python(code: str, *args: str) -> subprocess.Popen:
    """A fresh interpreter running ``code`` (with ``sys.argv[1:] == args``)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


class Reader(threading.Thread):
    def __init__(self, session, offset: int = 0):
        super().__init__(daemon=True)
        self.session = session
        self.offset = offset
        self.data = bytearray()
        self.error: BaseException | None = None
        self.ended_at: float | None = None

    def run(self):
        try:
            for chunk in self.session.read(self.offset):
                self.data += chunk
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()


# --- leases ---------------------------------------------------------------------------------


def test_expired_lease_aborts_the_session_and_ends_a_blocked_reader(redis_stores):
    producer_store = redis_stores(lease=LEASE)
    reader_store = redis_stores()
    producer = producer_store.create_or_replace("orphan")
    producer.append(b"before the crash")
    reader = Reader(reader_store.get("orphan"))
    reader.start()
    assert wait_until(lambda: bytes(reader.data) == b"before the crash")
    assert wait_for_renewals(producer_store), "the lease was not renewed"
    assert reader.is_alive()
    assert producer.info().state is State.RUNNING and producer.info().producer_alive

    died_at = time.monotonic()
    producer_store.close()  # its lease thread stops: the producer is "dead"
    reader.join(30)
    assert not reader.is_alive(), "the reader kept waiting on a dead producer's session"
    assert reader.error is None
    # lease (2 s) + an idle reader's recheck (1 s) + one wake interval, with slack
    assert reader.ended_at - died_at < 15.0
    info = reader_store.get("orphan").info()
    assert info.state is State.ABORTED and not info.producer_alive
    assert bytes(reader.data) == b"before the crash"


def test_gc_aborts_sessions_of_a_killed_producer_process(redis_stores):
    store = redis_stores()
    child = run_python(
        """
        import sys, time
        from shmstream.redis.store import RedisStore
        store = RedisStore.from_url(sys.argv[1], namespace=sys.argv[2], lease=2.0)
        session = store.create_or_replace("killed")
        session.append(b"x")
        print("ready", flush=True)
        time.sleep(60)
        """,
        redis_stores.url, redis_stores.namespace,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        assert wait_for_renewals(store, count=1), "the child never renewed its lease"
        assert store.gc().aborted == 0  # renewed: alive
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        aborted = []  # gc passes until the lease ran out
        assert wait_until(lambda: aborted.append(store.gc().aborted) or sum(aborted),
                          timeout=30, interval=0.1)
        assert sum(aborted) == 1
        assert store.get("killed").info().state is State.ABORTED
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()


def test_abort_producers_reaps_a_dead_local_process_at_once(redis_stores):
    store = redis_stores(lease=60)
    child = run_python(
        """
        import os, sys
        from shmstream.redis.store import RedisStore
        store = RedisStore.from_url(sys.argv[1], namespace=sys.argv[2], lease=60)
        store.create_or_replace("exited").append(b"x")
        store.create_or_replace("exited-too")
        print(os.getpid(), flush=True)
        os._exit(0)  # no finalize, no close
        """,
        redis_stores.url, redis_stores.namespace,
    )
    pid = int(child.stdout.readline())
    child.wait(10)
    child.stdout.close()
    child.stderr.close()
    mine = store.create_or_replace("alive-here")
    assert store.abort_producers([pid + 100_000]) == 0  # not a producer of anything
    assert store.abort_producers() == 2  # dead: aborted without waiting a minute
    assert store.get("exited").info().state is State.ABORTED
    assert mine.info().state is State.RUNNING
    assert store.abort_producers([os.getpid()]) == 1  # a worker being stopped
    assert mine.producer_should_stop


# --- cancel across processes ----------------------------------------------------------------


def test_cancel_from_another_process_reaches_the_producer_fast(redis_stores):
    """A producer in another process polls producer_should_stop; we cancel from here."""
    store = redis_stores()
    child = run_python(
        """
        import sys, time
        from shmstream.redis.store import RedisStore
        store = RedisStore.from_url(sys.argv[1], namespace=sys.argv[2])
        for round in range(int(sys.argv[3])):
            session = store.create_or_replace(f"stop-{round}")
            while not session.producer_should_stop:  # the flag is local: spin cheaply
                time.sleep(0.0005)
            print(time.monotonic(), flush=True)  # CLOCK_MONOTONIC is system-wide
            session.close()
        """,
        redis_stores.url, redis_stores.namespace, "10",
    )
    latencies = []
    try:
        for round_ in range(10):
            assert wait_until(lambda r=round_: store.get(f"stop-{r}") is not None, timeout=10)
            time.sleep(0.05)  # the producer is polling by now
            cancelled_at = time.monotonic()
            assert store.evict_and_cancel(f"stop-{round_}") is True
            seen_at = float(child.stdout.readline())
            latencies.append(seen_at - cancelled_at)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
    worst = max(latencies)
    assert worst < 1.0, f"cancel latencies {latencies}"
    assert statistics.median(latencies) < 0.25, f"cancel latencies {latencies}"


def test_producer_should_stop_is_a_local_read_once_subscribed(redis_stores):
    store = redis_stores()
    session = store.create_or_replace("cheap")
    calls = []
    original = store._redis.hmget
    store._redis.hmget = lambda *a, **k: calls.append(a) or original(*a, **k)
    assert wait_until(lambda: session._control.confirmed)
    for _ in range(1000):
        assert session.producer_should_stop is False
    assert len(calls) <= 1  # one check after the subscription was confirmed, then none
    store.get("cheap").cancel()
    assert wait_until(lambda: session.producer_should_stop, timeout=1.0)


# --- one live session per id ----------------------------------------------------------------


def test_two_stores_racing_create_or_replace_leave_one_live_session(redis_stores):
    stores = [redis_stores(), redis_stores()]
    rounds = 30
    for round_ in range(rounds):
        conversation_id = f"race-{round_ % 3}"
        barrier = threading.Barrier(2)
        made = [None, None]

        def create(index, conversation_id=conversation_id, barrier=barrier, made=made):
            barrier.wait()
            made[index] = stores[index].create_or_replace(conversation_id)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        states = [session.info().state for session in made]
        assert sorted(states) == [State.RUNNING, State.CANCELLED]
        loser = made[states.index(State.CANCELLED)]
        assert wait_until(lambda loser=loser: loser.producer_should_stop, timeout=1.0)
        live = [info for info in stores[0].lookup([conversation_id])
                if info.state is State.RUNNING]
        assert len(live) == 1
        current = stores[1].get(conversation_id)
        winner = made[states.index(State.RUNNING)]
        assert current.generation == winner.generation
        for session in (*made, current):
            session.close()


def test_processes_racing_create_or_replace_leave_one_live_session(redis_stores):
    code = """
        import sys
        from shmstream.redis.store import RedisStore
        store = RedisStore.from_url(sys.argv[1], namespace=sys.argv[2])
        for _ in range(200):
            store.create_or_replace("contended").append(b"x")
        store.close()
        """
    children = [run_python(code, redis_stores.url, redis_stores.namespace) for _ in range(3)]
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
    store = redis_stores()
    infos = store.list()
    assert len(infos) == 1 and infos[0].conversation_id == "contended"
    assert infos[0].state is State.RUNNING  # its store closed, but the lease still runs


def test_a_replaced_generation_keeps_its_own_bytes(redis_stores):
    store = redis_stores()
    old = store.create_or_replace("gen")
    old.append(b"old")
    old_reader = store.get("gen")
    new = store.create_or_replace("gen")
    new.append(b"brand new")
    assert old.append(b"!") is False
    assert b"".join(old_reader.read(0)) == b"old"
    assert b"".join(store.get("gen").read(0, should_stop=lambda: True)) == b""
    current = store.get("gen")
    assert current.generation == new.generation != old.generation
    new.finalize()
    assert b"".join(current.read(0)) == b"brand new"
    for session in (old, old_reader, new, current):
        session.close()


# --- lookup, expiry ---------------------------------------------------------------------


def test_lookup_never_scans_the_keyspace(redis_stores):
    store = redis_stores()
    sessions = [store.create_or_replace(name) for name in ("scan::a", "scan::b", "other")]

    def refuse(*args, **kwargs):
        raise AssertionError("lookup scanned the keyspace")

    for name in ("scan", "scan_iter", "keys"):
        setattr(store._redis, name, refuse)
    found = sorted(info.conversation_id for info in store.lookup(["scan", "nothing"]))
    assert found == ["scan::a", "scan::b"]
    for session in sessions:
        session.close()


def test_finished_sessions_expire_through_redis_and_gc_cleans_the_index(redis_stores):
    store = redis_stores(ttl=0.3)
    session = store.create_or_replace("short-lived::m")
    session.append(b"bye")
    session.finalize()
    assert store.get("short-lived::m") is not None
    # Redis expires the keys, no gc needed
    assert wait_until(lambda: store.get("short-lived::m") is None, timeout=20)
    assert store.lookup(["short-lived"]) == []
    report = store.gc()
    assert report.expired == 1 and report.kept == 0
    leftovers = list(store._redis.scan_iter(match=f"{store._prefix}*"))
    assert leftovers == []  # index field and zset entry are gone too


def test_quota_counts_live_and_retained_sessions(redis_stores):
    from shmstream.store.errors import StoreUnavailable

    store = redis_stores(max_sessions=2)
    first = store.create_or_replace("q1")
    second = store.create_or_replace("q2")
    with pytest.raises(StoreUnavailable):
        store.create_or_replace("q3")
    replaced = store.create_or_replace("q2")  # a replacement does not need a new slot
    store.evict("q1")
    third = store.create_or_replace("q3")
    for session in (first, second, replaced, third):
        session.close()


# --- readers ----------------------------------------------------------------------------


def test_an_idle_reader_does_not_poll_redis(redis_stores):
    store = redis_stores()
    producer = store.create_or_replace("idle")
    reader_handle = store.get("idle")
    fetches = []
    pipeline = store._hot.pipeline
    store._hot.pipeline = lambda commands: fetches.append(1) or pipeline(commands)
    wakes = []
    sleep = reader_handle._sleep
    reader_handle._sleep = lambda timeout: (sleep(timeout), wakes.append(1))
    reader = Reader(reader_handle)
    reader.start()
    assert wait_until(lambda: len(wakes) >= 10, timeout=30)  # ten 200 ms wake-ups
    assert len(fetches) <= 6, f"{len(fetches)} fetches in {len(wakes)} silent wake-ups"
    producer.append(b"late")
    assert wait_until(lambda: bytes(reader.data) == b"late", timeout=10)
    producer.finalize()
    reader.join(5)
    assert not reader.is_alive()


def test_published_bytes_serve_caught_up_readers_with_the_same_semantics(redis_stores):
    from shmstream.store.errors import OffsetLost

    store = redis_stores(capacity=1024)
    producer = store.create_or_replace("cached")
    reader = store.get("cached")
    fetches = []
    pipeline = store._hot.pipeline
    store._hot.pipeline = lambda commands: fetches.append(1) or pipeline(commands)
    producer.append(b"a" * 100)
    assert reader._poll(0, None) == (b"a" * 100, False)
    assert reader._poll(100, None) == (b"", False)  # waits: subscribes
    assert wait_until(lambda: reader._notify.confirmed)
    stream = bytearray(b"a" * 100)
    for index in range(15):
        chunk = bytes([65 + index]) * 100
        stream += chunk
        producer.append(chunk)
    assert wait_until(lambda: reader._notify.total == 1600)
    fetches.clear()
    with pytest.raises(OffsetLost):  # the bytes are in the cache, but the ring dropped them
        reader._poll(100, None)
    assert reader._poll(600, 50) == (bytes(stream[600:650]), False)
    assert reader._poll(650, None) == (bytes(stream[650:]), False)
    assert fetches == []  # served from the published bytes
    big = bytes(range(256)) * 4  # a chunk of capacity bytes is not published
    producer.append(big)
    small = b"tail"
    producer.append(small)
    assert wait_until(lambda: reader._notify.total == 1600 + 1024 + 4)
    with pytest.raises(OffsetLost):
        reader._poll(1600, None)  # 2628 - 1024 = 1604 is the oldest byte held now
    assert reader._poll(1604, None) == (big[4:] + small, False)  # the gap: from Redis
    assert fetches
    assert reader._poll(2624, None) == (small, False)  # the tail was published
    producer.finalize()
    assert b"".join(reader.read(2628)) == b""
    reader.close()
    producer.close()


def test_readers_recover_when_the_pubsub_connection_is_killed(redis_stores):
    store = redis_stores()
    producer = store.create_or_replace("resilient")
    reader = Reader(store.get("resilient"))
    reader.start()
    producer.append(b"one ")
    assert wait_until(lambda: bytes(reader.data) == b"one ")
    assert store._redis.client_kill_filter(_type="pubsub") >= 1
    producer.append(b"two")
    assert wait_until(lambda: bytes(reader.data) == b"one two", timeout=3.0)
    producer.finalize()
    reader.join(5)
    assert not reader.is_alive() and reader.error is None


def test_a_cancel_during_a_pubsub_outage_still_reaches_the_producer(redis_stores):
    store = redis_stores(lease=60)  # the lease renewal fallback would take 15 s
    other = redis_stores()
    session = store.create_or_replace("outage")
    assert wait_until(lambda: session._control.confirmed)
    assert session.producer_should_stop is False
    assert session.producer_should_stop is False  # verified: a local read from now on
    confirmations = session._control.confirmations
    notifier = store._notifier()
    with notifier._lock:  # hold the listener back from resubscribing while we cancel
        assert store._redis.client_kill_filter(_type="pubsub") >= 1
        assert other.get("outage").cancel() is True  # published while nobody listens
    assert wait_until(lambda: session._control.confirmations > confirmations, timeout=20)
    # Far below the 15 s the lease renewal fallback would take.
    assert wait_until(lambda: session.producer_should_stop, timeout=5)


def test_reader_processes_get_exactly_the_producers_bytes(redis_stores):
    store = redis_stores(capacity=1 << 20)
    producer = store.create_or_replace("multi")
    code = """
        import hashlib, sys
        from shmstream.redis.store import RedisStore
        store = RedisStore.from_url(sys.argv[1], namespace=sys.argv[2])
        session = store.get("multi")
        digest, size = hashlib.sha256(), 0
        for chunk in session.read(0):
            digest.update(chunk)
            size += len(chunk)
        print(size, digest.hexdigest(), flush=True)
        """
    children = [run_python(code, redis_stores.url, redis_stores.namespace) for _ in range(4)]
    expected = bytearray()
    for index in range(3000):
        chunk = f"data: {index} {'x' * (index % 50)}\n\n".encode()
        if index % 500 == 250:  # too big to travel in its notification: a gap to fill
            chunk = os.urandom(70 * 1024)
        expected += chunk
        producer.append(chunk)
    producer.finalize()
    import hashlib

    want = f"{len(expected)} {hashlib.sha256(expected).hexdigest()}"
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert out.strip() == want


def test_streaming_survives_a_script_flush_and_a_dropped_idle_connection(redis_stores):
    store = redis_stores()
    producer = store.create_or_replace("flushed")
    assert producer.append(b"one ")
    store._redis.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
    assert producer.append(b"two ")
    killed = store._redis.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1  # the append/fetch connection among them
    time.sleep(1.1)  # idle long enough to be checked before the next (unretried) append
    assert producer.append(b"three")
    producer.finalize()
    assert b"".join(store.get("flushed").read(0)) == b"one two three"  # each byte once


# --- wiring -------------------------------------------------------------------------------


def test_settings_open_a_redis_store(redis_stores):
    settings = Settings(backend=redis_stores.url, namespace=redis_stores.namespace,
                        max_bytes=4096, ttl=7, max_sessions=5)
    store = open_store(settings)
    try:
        assert isinstance(store, RedisStore)
        assert (store.capacity, store.ttl, store.max_sessions) == (4096, 7, 5)
        session = store.create_or_replace("configured")
        assert session.append(b"ok")
        session.finalize()
    finally:
        store.close()
    other = redis_stores()
    assert b"".join(other.get("configured").read(0)) == b"ok"


def test_a_store_pickles_and_forks(redis_stores):
    store = redis_stores()
    store.create_or_replace("before-fork").append(b"parent")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.namespace == store.namespace and clone.capacity == store.capacity
    clone.close()
    pid = os.fork()
    if pid == 0:  # the child reuses the parent's store object: it must start its own threads
        code = 1
        try:
            session = store.create_or_replace("in-child")
            session.append(b"child")
            session.finalize()
            reader = store.get("before-fork")
            got = []
            for chunk in reader.read(0, should_stop=lambda: bool(got)):
                got.append(chunk)
            code = 0 if got == [b"parent"] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert b"".join(store.get("in-child").read(0)) == b"child"


# --- what the backend assumes of redis-py -------------------------------------------------


def test_redis_py_internals_we_rely_on(redis_stores):
    """Everything shmstream/redis/_redis_internals.py assumes, checked on the installed
    redis-py: if an upgrade breaks one, this names it (and the hot path would break)."""
    import inspect

    import redis

    from shmstream.redis import _redis_internals

    store = redis_stores()
    pool = store._redis.connection_pool
    assert isinstance(pool.connection_class, type) and isinstance(pool.connection_kwargs, dict)
    assert isinstance(inspect.getattr_static(redis.Connection, "is_connected"), property), \
        "redis.Connection.is_connected is no longer a property"
    for method, keyword in (("send_command", None), ("send_packed_command", "check_health"),
                            ("read_response", "disconnect_on_error"), ("can_read", "timeout"),
                            ("pack_commands", None), ("connect", None), ("disconnect", None)):
        assert callable(getattr(redis.Connection, method, None)), f"Connection.{method} gone"
        if keyword is not None:
            assert keyword in inspect.signature(getattr(redis.Connection, method)).parameters, \
                f"Connection.{method} lost its {keyword!r} parameter"

    conn = _redis_internals.bare_connection(pool, socket_read_size=1 << 20)
    assert not _redis_internals.is_connected(conn)
    conn.connect()
    assert _redis_internals.is_connected(conn)
    conn.send_command("PING", check_health=False)
    assert conn.read_response() in (b"PONG", "PONG")
    conn.disconnect()
    assert not _redis_internals.is_connected(conn)

    # The pub/sub connection speaks RESP2 whatever the client does: messages are lists.
    resp3 = redis.Redis.from_url(redis_stores.url, protocol=3)
    listener = _redis_internals.pubsub_connection(resp3.connection_pool)
    listener.connect()
    try:
        listener.send_command("SUBSCRIBE", b"shmstream-probe", check_health=False)
        assert listener.read_response(disconnect_on_error=False)[0] == b"subscribe"
        assert store._redis.publish(b"shmstream-probe", b"hi") == 1
        assert listener.can_read(timeout=5.0)
        assert listener.read_response(disconnect_on_error=False) == \
            [b"message", b"shmstream-probe", b"hi"]
    finally:
        listener.disconnect()
        resp3.close()


# --- asyncio readers ----------------------------------------------------------------------


def test_many_asyncio_readers_share_one_subscription_and_no_threads(redis_stores):
    """300 coroutines on one loop and 50 on another, reading one session: one pub/sub
    subscription for the process, no thread per waiting reader, every byte to each."""
    import asyncio

    store = redis_stores(capacity=1 << 20)
    producer = store.create_or_replace("fan-in")
    producer.append(b"first\n")
    readers = [store.get("fan-in") for _ in range(300)]
    others = [store.get("fan-in") for _ in range(50)]
    expected = b"first\n" + b"".join(b"event %d\n" % index for index in range(500))
    baseline_threads = threading.active_count()

    async def read(session):
        return b"".join([chunk async for chunk in session.aread(0, wake_interval=30.0)])

    async def read_all(sessions):
        return await asyncio.wait_for(asyncio.gather(*map(read, sessions)), 60)

    def waiting() -> int:
        watch = readers[0]._notify
        return 0 if watch is None else sum(map(len, watch._async_waiters.values()))

    other_results = []
    other_loop = threading.Thread(
        target=lambda: other_results.extend(asyncio.run(read_all(others))))

    def produce():
        for index in range(500):
            producer.append(b"event %d\n" % index)
        producer.finalize()

    async def main():
        tasks = asyncio.ensure_future(read_all(readers))
        other_loop.start()
        # Every reader has its bytes and waits for more on a future, not in a thread.
        assert await _eventually(lambda: waiting() == len(readers) + len(others),
                                 timeout=30), waiting()
        assert len(readers[0]._notify._async_waiters) == 2  # one entry per event loop
        threads_while_waiting = threading.active_count()
        channel = readers[0]._notify_channel
        subscriptions = store._redis.pubsub_numsub(channel)[0][1]
        producer_thread = threading.Thread(target=produce)
        producer_thread.start()
        results = await tasks
        producer_thread.join(10)
        return threads_while_waiting, subscriptions, results

    threads_while_waiting, subscriptions, results = asyncio.run(main())
    other_loop.join(60)
    assert subscriptions == 1
    # The loops' default executors may hold a few threads for round trips; never one each.
    assert threads_while_waiting - baseline_threads <= 80, threads_while_waiting
    assert results == [expected] * len(readers)
    assert other_results == [expected] * len(others)
    assert waiting() == 0
    for session in (producer, *readers, *others):
        session.close()


def test_a_cancelled_asyncio_reader_leaves_no_waiter_behind(redis_stores):
    import asyncio

    store = redis_stores()
    producer = store.create_or_replace("leaving")
    reader = store.get("leaving")

    async def main():
        task = asyncio.create_task(_consume(reader))
        assert await _eventually(lambda: reader._notify is not None
                                 and reader._notify._async_waiters)
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert reader._notify._async_waiters == {}
    reader.close()
    assert producer.append(b"still fine")
    producer.close()


async def _consume(session):
    async for _chunk in session.aread(0, wake_interval=30.0):
        pass


async def _eventually(predicate, timeout: float = 10.0) -> bool:
    import asyncio

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --- Redis unavailable ----------------------------------------------------------------------


def _every_store_call(store, session=None):
    """One call of each kind a worker or the supervisor makes, by name."""
    calls = {
        "create_or_replace": lambda: store.create_or_replace("down"),
        "get": lambda: store.get("down"),
        "list": store.list,
        "lookup": lambda: store.lookup(["down"]),
        "evict": lambda: store.evict("down"),
        "evict_and_cancel": lambda: store.evict_and_cancel("down"),
        "gc": store.gc,
        "abort_producers": store.abort_producers,
        "purge": store.purge,
    }
    if session is not None:
        calls.update({
            "append": lambda: session.append(b"lost"),
            "info": session.info,
            "read": lambda: next(iter(session.read(0))),
            "finalize": session.finalize,
        })
    return calls


def test_nothing_listening_makes_every_call_raise_store_unavailable(namespace, caplog):
    from shmstream.store.errors import StoreUnavailable

    store = RedisStore.from_url("redis://127.0.0.1:1/0", namespace=namespace)
    try:
        for name, call in _every_store_call(store).items():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                call()
            assert time.monotonic() - started < 3.0, f"{name} took too long to fail"
            assert raised.value.status == 503 and raised.value.error_type == "unavailable_error"
            assert "127.0.0.1:1" in raised.value.message
    finally:
        store.close()
    down_lines = [r for r in caplog.records
                  if r.name == "shmstream.redis" and "unavailable" in r.getMessage()]
    assert len(down_lines) == 1, [r.getMessage() for r in down_lines]  # once, not per call


def test_a_redis_that_goes_away_and_comes_back(namespace, caplog):
    """Killed: every call raises StoreUnavailable, a waiting reader ends with it, one log
    line says so. Restarted (empty, on the same port): the same store objects work again,
    appends wake readers through pub/sub again, one log line says it is back."""
    import logging

    from redis_server import LocalRedisServer

    from shmstream.store.errors import StoreUnavailable

    if not LocalRedisServer.available():
        pytest.skip("redis-server is not installed")
    caplog.set_level(logging.INFO, logger="shmstream.redis")
    server = LocalRedisServer()
    url = server.start()
    store = RedisStore.from_url(url, namespace=namespace, lease=60)
    try:
        producer = store.create_or_replace("outage")
        producer.append(b"before ")
        waiting = Reader(store.get("outage"), offset=len(b"before "))
        waiting.start()
        assert wait_until(lambda: waiting.session._notify is not None
                          and waiting.session._notify.confirmed)

        server.kill()
        waiting.join(15)
        assert not waiting.is_alive(), "a waiting reader hung on a dead Redis"
        assert isinstance(waiting.error, StoreUnavailable)
        for name, call in _every_store_call(store, producer).items():
            with pytest.raises(StoreUnavailable):
                call()
            assert name  # every call, reads and writes alike
        logged = [r.getMessage() for r in caplog.records if r.name == "shmstream.redis"]
        assert sum("is unavailable" in line for line in logged) == 1, logged
        # The producer's cheap check never raises (the relay's watcher calls it every
        # 50 ms): nothing proves a cancel, and its next append raises StoreUnavailable.
        checked_at = time.monotonic()
        assert [producer.producer_should_stop for _ in range(100)] == [False] * 100
        assert time.monotonic() - checked_at < 2.0

        server.restart()
        assert wait_until(lambda: _answers(store), timeout=15)
        assert store.get("outage") is None  # the restarted Redis is empty: a 404, no 500
        fresh = store.create_or_replace("after")
        reader = Reader(store.get("after"))
        reader.start()
        assert fresh.append(b"back")
        assert wait_until(lambda: bytes(reader.data) == b"back", timeout=10)
        fresh.finalize()
        reader.join(10)
        assert not reader.is_alive() and reader.error is None
        logged = [r.getMessage() for r in caplog.records if r.name == "shmstream.redis"]
        assert sum("reachable again" in line for line in logged) == 1, logged
        for session in (producer, fresh, waiting.session, reader.session):
            session.close()
        store.purge()
    finally:
        store.close()
        server.stop()


def _answers(store) -> bool:
    from shmstream.store.errors import StoreUnavailable

    try:
        store.list()
    except StoreUnavailable:
        return False
    return True


# --- memory in proportion to the bytes held -------------------------------------------------


@pytest.mark.parametrize("answer_bytes", [22_000, 64 * 1024, 200_000])
def test_redis_memory_follows_the_bytes_held(redis_stores, answer_bytes):
    """allocated_bytes is the MEMORY USAGE of the session's keys; a session holding B bytes
    costs at most B + B/4 + 4 KiB (the allocator rounds up by up to a quarter), whether it
    stopped short of its 64 KiB capacity or filled and wrapped it. Without compaction
    SETRANGE's greedy growth left up to 2.5x."""
    capacity = 64 * 1024
    store = redis_stores(capacity=capacity)
    session = store.create_or_replace(f"mem-{answer_bytes}")
    sent = bytearray()
    while len(sent) < answer_bytes:
        event = b"data: %d %s\n\n" % (len(sent), b"t" * 180)
        sent += event
        session.append(event)
    session.finalize()
    held = min(len(sent), capacity)
    info = session.info()
    assert info.total_bytes - info.dropped_bytes == held
    assert held <= info.allocated_bytes <= held + held // 4 + 4096, info.allocated_bytes
    assert [i.allocated_bytes for i in store.lookup([f"mem-{answer_bytes}"])] == \
        [info.allocated_bytes]
    reader = store.get(f"mem-{answer_bytes}")
    assert b"".join(reader.read(len(sent) - held)) == bytes(sent[-held:])  # intact
    for handle in (session, reader):
        handle.close()


def test_redis_errors_that_mean_unavailable():
    import redis

    from shmstream.redis.connections import is_unavailable

    assert is_unavailable(redis.ConnectionError("Connection refused"))
    assert is_unavailable(redis.TimeoutError("Timeout reading"))
    assert is_unavailable(redis.exceptions.OutOfMemoryError("command not allowed when ..."))
    assert is_unavailable(redis.exceptions.ReadOnlyError("You can't write against a replica"))
    assert is_unavailable(redis.ResponseError("MISCONF Redis is configured to save RDB ..."))
    assert is_unavailable(redis.ResponseError("MASTERDOWN Link with MASTER is down"))
    assert not is_unavailable(redis.ResponseError("ERR wrong number of arguments"))
    assert not is_unavailable(redis.exceptions.NoScriptError("No matching script"))


def test_a_full_redis_answers_store_unavailable(namespace):
    """At maxmemory (noeviction) a new session, a replacement or an append is refused with
    StoreUnavailable (503, as a full /dev/shm), never a raw redis error, and leaves nothing
    half-written; finishing and cancelling (which free memory) still work, so readers end."""
    from redis_server import LocalRedisServer

    from shmstream.store.errors import StoreUnavailable

    if not LocalRedisServer.available():
        pytest.skip("redis-server is not installed")
    with LocalRedisServer() as url:
        store = RedisStore.from_url(url, namespace=namespace, capacity=1 << 20)
        try:
            stopped = store.create_or_replace("stopped-when-full")
            stopped.append(b"kept ")
            reader = Reader(store.get("stopped-when-full"))
            reader.start()
            assert wait_until(lambda: bytes(reader.data) == b"kept ")
            client = store._redis
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", client.info("memory")["used_memory"] + 2_000_000)
            written = 0
            session = None
            with pytest.raises(StoreUnavailable) as raised:
                for index in range(100):  # 100 x 1 MiB: far past the limit
                    session, written = store.create_or_replace(f"full-{index}"), 0
                    for _ in range(8):
                        session.append(b"x" * 128 * 1024)
                        written += 128 * 1024
            assert "maxmemory" in raised.value.message and raised.value.status == 503
            if session is not None:  # the refused append left nothing half-written
                assert session.info().total_bytes == written
            before = len(store.list())
            with pytest.raises(StoreUnavailable):
                store.create_or_replace("stopped-when-full")  # a replacement is refused too
            assert stopped.info().state is State.RUNNING and len(store.list()) == before
            with pytest.raises(StoreUnavailable):
                stopped.append(b"lost")
            assert store.evict_and_cancel("stopped-when-full") is True  # the user's Stop
            reader.join(10)
            assert not reader.is_alive() and reader.error is None
            assert bytes(reader.data) == b"kept "
            assert stopped.producer_should_stop
            if session is not None:
                assert session.finalize() is True
            client.config_set("maxmemory", 0)  # room again: the store just works
            assert store.create_or_replace("after-full").append(b"ok")
            store.purge()
        finally:
            store.close()


def test_one_process_logs_an_outage_once_however_many_stores_notice(namespace, caplog):
    # The HTTP worker's store, a session's calls and the pub/sub listener share one
    # Health per process: an operator reads one line per change, not one per object.
    from shmstream.store.errors import StoreUnavailable

    url = f"redis://127.0.0.1:{_closed_port()}/0"
    stores = [RedisStore.from_url(url, namespace=namespace) for _ in range(3)]
    try:
        with caplog.at_level("INFO", logger="shmstream.redis"):
            for store in stores * 2:
                with pytest.raises(StoreUnavailable) as raised:
                    store.lookup(["down"])
                assert raised.value.logged  # so the supervisor does not log it again
        logged = [r.getMessage() for r in caplog.records if r.name == "shmstream.redis"]
        assert sum("is unavailable" in line for line in logged) == 1, logged
        assert sum("session store unavailable" in line for line in logged) == 1, logged
    finally:
        for store in stores:
            store.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:  # bound, never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
