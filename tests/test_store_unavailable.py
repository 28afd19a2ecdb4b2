"""A shared-memory store that cannot write (a read-only or foreign-owned /dev/shm) raises
StoreUnavailable (503 unavailable_error), never a bare OSError (500) (issue 14, item 3).

The real read-only /dev/shm at start is tested through `shmstream serve` in
test_cli_serve.py; a tmpfs cannot be remounted read-only while the service holds files open,
so the errors at run time are injected at the two OS calls that meet them."""

from __future__ import annotations

import errno
import os

import posix_ipc
import pytest

from shmstream.shm import segment, sync
from shmstream.shm.store import ShmStore
from shmstream.store.errors import StoreUnavailable


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_creating_a_segment_on_a_read_only_dev_shm_is_store_unavailable(namespace, monkeypatch,
                                                                         code):
    store = ShmStore(namespace)

    def refuse(name, flags=0, **options):
        if flags & posix_ipc.O_CREAT:
            raise OSError(code, os.strerror(code))
        return real(name, flags, **options)

    real = posix_ipc.SharedMemory
    monkeypatch.setattr(segment.posix_ipc, "SharedMemory", refuse)
    with pytest.raises(StoreUnavailable) as error:
        store.create_or_replace("chat-1")
    assert error.value.status == 503 and error.value.error_type == "unavailable_error"
    monkeypatch.setattr(segment.posix_ipc, "SharedMemory", real)
    store.create_or_replace("chat-1").close()  # back: it works again, nothing to reset


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_lock_file_that_cannot_be_opened_is_store_unavailable(namespace, monkeypatch, code):
    store = ShmStore(namespace)
    real_open = os.open

    def refuse(path, flags, *args):
        if str(path).startswith(segment.SHM_DIR) and str(path).endswith(".lock"):
            raise OSError(code, os.strerror(code))
        return real_open(path, flags, *args)

    monkeypatch.setattr(sync.os, "open", refuse)
    with pytest.raises(StoreUnavailable):
        store.create_or_replace("chat-1")
    monkeypatch.setattr(sync.os, "open", real_open)
    store.create_or_replace("chat-1").close()
    assert [info.conversation_id for info in store.lookup(["chat-1"])] == ["chat-1"]
