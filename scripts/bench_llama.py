#!/usr/bin/env python3
"""The HTTP benchmark against the real llama-server (``bench_http.py --llama``): what
shmstream adds over talking to llama-server directly, and how fast a Stop frees the slot.

It starts llama-server (the build of scripts/llama_server.py, with the tiny random model of
tests/llama_model.py) and the service (gunicorn, 4 workers) in front of it, runs, and stops
both.

1. Latency, in one run: S streamed chat completions through the service (with a
   conversation id, so every byte goes through a session) and S straight to llama-server,
   one at a time, alternating (after a warm-up of both paths). Each token's event carries
   llama-server's own clock (``timings.prompt_ms + timings.predicted_ms`` since its task
   started, with ``timings_per_token``), so for every event ``arrival - sent - server
   time`` is the time spent outside llama-server: the request's way in plus the event's way out. The
   difference of that delay between the two paths is what the service adds.
2. Stop: a long answer through the service, ``DELETE /v1/stream?conv_id=`` on a fresh
   connection (any worker) mid-answer, and the time until llama-server's ``GET /slots``
   shows its slot idle; beside it the same for a direct client that hangs up, which is how
   fast llama-server itself notices.

    .venv/bin/python scripts/bench_http.py --llama                # 4 + 4 streams, 500 tokens
    .venv/bin/python scripts/bench_http.py --llama --streams 1 --tokens 100 --stops 3
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import httpx  # noqa: E402
from llama_model import VOCAB_FILE, write_model  # noqa: E402
from llama_server import PREPARE_COMMAND, LlamaServer, prepare, vocab  # noqa: E402
from service import Service  # noqa: E402

from shmstream.shm.store import ShmStore  # noqa: E402


def _post(port: int, body: dict, conversation_id: str | None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Content-Type": "application/json"}
    if conversation_id:
        headers["X-Conversation-Id"] = conversation_id
    sent = time.monotonic()
    connection.request("POST", "/v1/chat/completions", json.dumps(body).encode(), headers)
    return connection, connection.getresponse(), sent


def timed_stream(port: int, tokens: int, conversation_id: str | None, delays: list[list[float]],
                 errors: list[str]) -> None:
    """One streamed answer; appends the list of ``arrival - sent - server time`` (ms) of
    its tokens, in order, to ``delays``."""
    body = {"messages": [{"role": "user", "content": "benchmark"}], "stream": True,
            "max_tokens": tokens, "ignore_eos": True, "timings_per_token": True}
    try:
        connection, response, sent = _post(port, body, conversation_id)
        if response.status != 200:
            errors.append(f"status {response.status}")
            return
        pending = b""
        mine: list[float] = []
        delays.append(mine)
        while True:
            chunk = response.read1(65536)
            if not chunk:
                break
            arrival = time.monotonic()
            pending += chunk
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                timings = json.loads(event[6:]).get("timings")
                if timings and timings.get("predicted_n"):
                    server_ms = timings["prompt_ms"] + timings["predicted_ms"]
                    mine.append((arrival - sent) * 1000 - server_ms)
        connection.close()
    except Exception as exc:  # reported in the results
        errors.append(repr(exc))


def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)  # noqa: E731
    return {"n": len(ordered), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def latency_phase(args, service: Service, llama: LlamaServer) -> dict:
    run = uuid.uuid4().hex[:8]
    # Warm up both paths (every worker's first upstream connection, llama-server's caches).
    for index in range(2 * args.workers):
        timed_stream(service.port, 4, f"warm-{run}-{index}", [], [])
    timed_stream(llama.port, 4, None, [], [])
    sides = {"direct": ([], []), "service": ([], [])}
    # One stream at a time, alternating the paths: a task queued behind another's prompt
    # would count its wait as time outside llama-server.
    for index in range(args.streams):
        for side in ("service", "direct"):
            port = service.port if side == "service" else llama.port
            conversation_id = f"bench-{run}-{index}" if side == "service" else None
            timed_stream(port, args.tokens, conversation_id, *sides[side])
    result = {}
    for side, (streams, errors) in sides.items():
        # The first token's delay holds the request's way in (and any queueing before the
        # task starts); the later ones are the events' way out.
        result[side] = {"first_token": _percentiles([s[0] for s in streams if s]),
                        "later_tokens": _percentiles([d for s in streams for d in s[1:]]),
                        "errors": len(errors), "first_errors": errors[:3]}
    for part in ("first_token", "later_tokens"):
        direct, relayed = result["direct"][part], result["service"][part]
        if direct["n"] and relayed["n"]:
            result.setdefault("added_ms", {})[part] = {
                q: round(relayed[q] - direct[q], 3) for q in ("p50", "p90", "p99")}
    return result


def _task_idle_after(llama: LlamaServer, task: int, started: float, timeout: float = 60) -> float:
    while time.monotonic() - started < timeout:
        slot = next((s for s in llama.slots() if s.get("id_task") == task), None)
        if slot is None or not slot.get("is_processing"):
            return time.monotonic() - started
        time.sleep(0.002)
    return float("inf")


def _busy_task(llama: LlamaServer, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [s for s in llama.busy() if s.get("next_token")]
        if len(busy) == 1:
            return busy[0]["id_task"]
        time.sleep(0.01)
    raise RuntimeError("no single busy slot")


def stop_phase(args, service: Service, llama: LlamaServer) -> dict:
    body = {"messages": [{"role": "user", "content": "stop me"}], "stream": True,
            "max_tokens": 12000, "ignore_eos": True, "timings_per_token": True}
    results: dict[str, list[float]] = {"service_delete": [], "direct_hangup": []}
    for _ in range(args.stops):
        for side in results:
            conversation_id = f"stop-{uuid.uuid4().hex[:8]}" if side == "service_delete" else None
            port = service.port if conversation_id else llama.port
            connection, response, _ = _post(port, body, conversation_id)
            received = 0
            while received < 20_000:
                received += len(response.read1(65536))
            task = _busy_task(llama)
            started = time.monotonic()
            if conversation_id:
                status = httpx.delete(f"{service.url}/v1/stream",
                                      params={"conv_id": conversation_id}).status_code
                assert status == 204, status
            else:
                with contextlib.suppress(OSError):
                    connection.sock.shutdown(2)
            results[side].append(_task_idle_after(llama, task, started) * 1000)
            with contextlib.suppress(OSError):
                connection.close()
    return {side: {"ms": [round(v, 1) for v in values],
                   "median_ms": round(statistics.median(values), 1)}
            for side, values in results.items() if values}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama", action="store_true", help="(the mode's flag in bench_http)")
    parser.add_argument("--streams", type=int, default=4, help="streams per side (4)")
    parser.add_argument("--tokens", type=int, default=500, help="tokens per stream (500)")
    parser.add_argument("--stops", type=int, default=5, help="Stop measurements (5)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--skip", action="append", default=[], choices=["latency", "stop"])
    args = parser.parse_args(argv)
    if not prepare.is_ready(prepare.cache_dir()):
        print(f"llama-server is not prepared: run `{PREPARE_COMMAND}` first", file=sys.stderr)
        return 2

    namespace = f"benchllama{uuid.uuid4().hex[:8]}"
    results: dict = {"workers": args.workers, "cpus": os.cpu_count(),
                     "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as logs:
        model = write_model(vocab(VOCAB_FILE), Path(logs) / "tiny-random.gguf")
        llama = LlamaServer(model, Path(logs), parallel=max(4, 2 * args.streams))
        service = Service(namespace, llama.url, logs, workers=args.workers)
        try:
            llama.start()
            service.start()
            if "latency" not in args.skip:
                print(f"latency: {args.streams} + {args.streams} streams x {args.tokens} "
                      f"tokens, through the service and direct ...", flush=True)
                results["latency"] = latency_phase(args, service, llama)
                print(json.dumps(results["latency"], indent=2), flush=True)
            if "stop" not in args.skip:
                print(f"stop: {args.stops} x (DELETE through the service, hang-up direct) "
                      f"-> slot idle ...", flush=True)
                results["stop"] = stop_phase(args, service, llama)
                print(json.dumps(results["stop"], indent=2), flush=True)
        finally:
            service.stop()
            llama.stop()
            ShmStore(namespace).purge()
    print(f"\nload average before {results['loadavg_before'][0]:.2f}, after "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    added = results.get("latency", {}).get("added_ms", {})
    for part, label in (("first_token", "to the first token"), ("later_tokens", "per token")):
        if part in added:
            direct = results["latency"]["direct"][part]
            print(f"service adds {label}: p50 {added[part]['p50']:.2f} ms, p99 "
                  f"{added[part]['p99']:.2f} ms (direct, outside llama-server: p50 "
                  f"{direct['p50']:.2f} / p99 {direct['p99']:.2f} ms)")
    if "stop" in results:
        stop = results["stop"]
        print(f"Stop -> slot idle: median {stop['service_delete']['median_ms']} ms via "
              f"DELETE through the service; a direct client's hang-up "
              f"{stop['direct_hangup']['median_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
