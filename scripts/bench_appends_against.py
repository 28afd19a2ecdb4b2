#!/usr/bin/env python3
"""Appends/s of 200 B events (no reader) side by side: this checkout against another one
(an older commit), in alternating child processes, best of each. Issue 11's bar is "as
fast as before the ring grew": run it against the commit before that work.

    git worktree add /tmp/before ae3d70f      # ring reserved up front, no lock records
    .venv/bin/python scripts/bench_appends_against.py /tmp/before --rounds 8

Each child makes its own namespace and removes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import glob, json, os, shutil, sys, time, uuid
sys.path.insert(0, sys.argv[1])
from shmstream.shm.store import ShmStore
namespace = "bappend" + uuid.uuid4().hex[:8]
store = ShmStore(namespace, capacity=4 << 20)
data = b"x" * 200
events = (4 << 20) // len(data)
best = {}
try:
    for label in ("fresh", "full"):
        for run in range(3):
            name = f"{label}{run}"
            session = store.create_or_replace(name)
            if label == "full":
                for _ in range(events + 1000):
                    session.append(data)
            append = session.append
            started = time.perf_counter()
            for _ in range(events):
                append(data)
            rate = events / (time.perf_counter() - started)
            best[label] = max(best.get(label, 0.0), rate)
            session.finalize()
            session.close()
            store.evict(name)
finally:
    for path in glob.glob(f"/dev/shm/{namespace}*") + glob.glob(f"/dev/shm/sem.{namespace}*"):
        (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
print(json.dumps(best))
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", help="another shmstream checkout (its root directory)")
    parser.add_argument("--rounds", type=int, default=6, help="alternations (default 6)")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this checkout": here, f"other ({args.other})": os.path.abspath(args.other)}
    best = {name: {"fresh": 0.0, "full": 0.0} for name in trees}
    for round_number in range(args.rounds):
        print(f"round {round_number + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for name, path in trees.items():
            out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True,
                                 text=True, check=True).stdout
            for label, rate in json.loads(out).items():
                best[name][label] = max(best[name][label], rate)
    print(f"{'appends/s of 200 B, no reader, best of each':46s} {'fresh 4 MiB ring':>17s}"
          f" {'full ring':>12s}")
    for name, rates in best.items():
        print(f"{name:46s} {rates['fresh']:>17,.0f} {rates['full']:>12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
