"""The namespace lock (shmstream.serve.namespace_lock): one live service per namespace, and
a lock the kernel drops when its holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from polling import wait_for

from shmstream.serve import namespace_lock
from shmstream.serve.namespace_lock import NamespaceInUse, NamespaceLock

HOLDER = """
import sys, time
from shmstream.serve.namespace_lock import NamespaceLock
lock = NamespaceLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_holder_is_refused_and_the_first_release_frees_it(namespace):
    first = NamespaceLock.acquire(namespace)
    with pytest.raises(NamespaceInUse) as refused:
        NamespaceLock.acquire(namespace)  # another open file description, same process
    assert repr(namespace) in str(refused.value) and f"pid {os.getpid()}" in str(refused.value)
    assert namespace_lock.holder_pid(namespace) == os.getpid()
    first.release()
    assert not os.path.exists(namespace_lock.lock_path(namespace))
    assert namespace_lock.holder_pid(namespace) is None
    NamespaceLock.acquire(namespace).release()


def test_a_killed_holder_frees_the_namespace_at_once(namespace):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, namespace], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(NamespaceInUse) as refused:
            NamespaceLock.acquire(namespace)
        assert f"pid {holder.pid}" in str(refused.value)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        lock = wait_for(lambda: _try_acquire(namespace), timeout=10)
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        holder.stdout.close()


def _try_acquire(namespace):
    try:
        return NamespaceLock.acquire(namespace)
    except NamespaceInUse:
        return None


def test_a_lock_passed_through_exec_is_adopted_not_taken_twice(namespace):
    lock = NamespaceLock.acquire(namespace)
    env: dict = {}
    lock.pass_through_exec(env)
    adopted = NamespaceLock.adopt(namespace, int(env[namespace_lock.FD_ENV]))
    assert adopted is not None and adopted.fd == lock.fd
    assert NamespaceLock.adopt(namespace + "x", lock.fd) is None  # another namespace's file
    lock.release()


def test_only_the_process_that_took_it_releases_it(namespace):
    lock = NamespaceLock.acquire(namespace)
    lock.owner_pid = -1  # as a forked gunicorn worker sees the object it inherited
    lock.release()
    assert os.path.exists(namespace_lock.lock_path(namespace))
    lock.owner_pid = os.getpid()
    lock.release()
    assert not os.path.exists(namespace_lock.lock_path(namespace))
