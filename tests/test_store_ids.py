"""The id and liveness rules both backends share (shmstream/store/ids.py, procs.py)."""

from __future__ import annotations

import os

from shmstream.store import ids, procs


def test_lookup_bases_add_the_shorter_base_of_an_id_ending_in_a_colon():
    assert ids.lookup_bases(b"chat") == {b"chat"}
    assert ids.lookup_bases(b"chat::model") == {b"chat"}
    assert ids.lookup_bases(b"a:") == {b"a:", b"a"}  # "a:" + "::m" is "a:::m", base "a"
    assert ids.lookup_bases(b"a::b:") == {b"a"}  # has its own "::": no second base
    assert ids.lookup_bases(b":") == {b":", b""}


def test_a_lookup_request_drops_invalid_ids_and_matches_the_seed_rule():
    request = ids.LookupRequest.parse(["chat", "", "\ud800", "a:"])
    assert request.requested == ("chat", "a:")
    assert request.bases == {b"chat", b"a:", b"a"}
    assert request.matches("chat") and request.matches("chat::org/model")
    assert request.matches("a:::m")
    assert not request.matches("chatX") and not request.matches("other::chat")


def test_the_stored_record_keeps_the_sessions_own_id():
    assert ids.session_record("real", {"id": "forged", "model": "m"}) == \
        {"id": "real", "model": "m"}
    assert ids.session_record("real", None) == {"id": "real"}


def test_digests_name_what_is_already_stored():
    """Segment names and Redis keys are digests: changing one loses every stored session."""
    assert ids.digest(b"chat-42", 16) == "8767e310b8090e2f"  # shared memory names
    assert ids.digest(b"chat-42", 16, person=b"shmstream-r") == "793a1ef2ab3cc877"  # Redis


def test_producer_doomed_by_death_or_by_name():
    """The one abort rule both backends use (shm: its header's identity; Redis: its key)."""
    alive, dead, unknown = procs.Liveness.ALIVE, procs.Liveness.DEAD, procs.Liveness.UNKNOWN
    me = os.getpid()
    assert procs.producer_doomed(dead, 4242, None)  # died (or its pid was reused)
    assert not procs.producer_doomed(alive, me, None)
    assert procs.producer_doomed(alive, me, {me})  # a worker or relay stopping
    assert not procs.producer_doomed(alive, me, {me + 1})
    # another container's producer: nothing here can prove it dead, never aborted
    assert not procs.producer_doomed(unknown, me, None)
    assert not procs.producer_doomed(unknown, me, {me})


def test_machine_scope_names_this_boot_and_pid_namespace():
    scope = procs.machine_scope()
    with open("/proc/sys/kernel/random/boot_id") as boot:
        assert scope == f"{boot.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
