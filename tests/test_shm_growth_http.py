"""/dev/shm full while an answer grows, through the real service (gunicorn workers, the
relay producer) over a private 4 MiB tmpfs: the answer streams on, no worker dies."""

from __future__ import annotations

import contextlib
import os
import uuid

import httpx
import pytest
from polling import wait_until
from sse_upstream import expected_body
from test_hardening_http import (  # noqa: F401 - own_service is a fixture
    AUTH,
    TIMEOUT,
    SmallShmService,
    WorkersUnchanged,
    _unshare_problem,
    chat,
    own_service,
    parse_metrics,
)

from shmstream.shm import segment


@pytest.mark.timeout(180)
def test_a_tmpfs_filling_up_mid_answer_caps_the_ring_and_the_answer_streams_on(
        own_service):  # noqa: F811 - the fixture imported above
    problem = _unshare_problem()
    if problem:
        pytest.skip(problem)
    service = own_service(SmallShmService, max_bytes=8 * 1024 * 1024)
    tag = f"big-{uuid.uuid4().hex[:8]}"
    events, pad = 1200, 4000  # ~4.9 MB of SSE: more than the tmpfs has left
    expected = expected_body(tag, events, pad)
    with WorkersUnchanged(service), httpx.Client(timeout=TIMEOUT, headers=AUTH) as client:
        answer = client.post(service.url + "/v1/chat/completions",
                             json=chat(tag=tag, events=events, pad=pad, interval=0),
                             headers={"X-Conversation-Id": "big"})
        assert answer.status_code == 200
        # The caller read live: all of it if it kept up, else a prefix (lapped readers end
        # quietly and re-attach to an "offset lost"), never other bytes.
        assert expected.startswith(answer.content) and len(answer.content) > 0
        [entry] = client.post(service.url + "/v1/streams/lookup",
                              json={"conversation_ids": ["big"]}).json()
        assert entry["is_done"] and entry["total_bytes"] == len(expected)
        assert entry["dropped_bytes"] > 0  # the ring was capped below the answer's size
        tail = client.get(service.url + f"/v1/stream/big?from={entry['dropped_bytes']}")
        assert tail.status_code == 200 and tail.content == expected[entry["dropped_bytes"]:]
        lost = client.get(service.url + "/v1/stream/big?from=0")
        assert lost.status_code == 400
        values = parse_metrics(client.get(service.url + "/metrics").text)
        assert values["shmstream_sessions_ring_capped"] == 1
        assert values["shmstream_session_allocated_bytes"] < 4 * 1024 * 1024
        assert "ring capped" in service.log_text()
        # Other sessions still work once room is freed.
        assert client.delete(service.url + "/v1/stream/big").status_code == 204
        fresh = client.post(service.url + "/v1/chat/completions", json=chat(),
                            headers={"X-Conversation-Id": "after"})
        assert fresh.status_code == 200 and fresh.content.endswith(b"data: [DONE]\n\n")
        # Nobody of the service maps the deleted session any more (a retired segment would
        # hold its pages until then).
        deleted = segment.segment_name(service.namespace, "big")[len(service.namespace) + 1:]
        assert wait_until(lambda: mappers(service, deleted) == [], 10), mappers(service, deleted)


def mappers(service: SmallShmService, name_part: str) -> list[int]:
    """The pids of the service's process group that map an object named with ``name_part``
    (the segment under its own or its retired name)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{entry}/stat") as stat:
                pgid = int(stat.read().rpartition(")")[2].split()[2])
            if pgid != service.process.pid:
                continue
            with open(f"/proc/{entry}/maps") as maps:
                if any(name_part in line for line in maps):
                    found.append(int(entry))
    return found
