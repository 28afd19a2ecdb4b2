"""What shmstream/_prometheus_internals.py assumes of the installed prometheus_client; a
failure here names the assumption an upgrade broke."""

from __future__ import annotations

import os
import subprocess
import sys

from shmstream import _prometheus_internals


def test_multiprocess_files_are_named_kind_underscore_pid(tmp_path):
    """A counter, a livesum gauge and a histogram write exactly the files we reserve."""
    script = (
        "import os\n"
        "from prometheus_client import Counter, Gauge, Histogram\n"
        "Counter('c', 'c', registry=None).inc()\n"
        "Gauge('g', 'g', multiprocess_mode='livesum', registry=None).inc()\n"
        "Histogram('h', 'h', registry=None).observe(1)\n"
        "print(os.getpid())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
                          check=True, timeout=60)
    pid = int(done.stdout.strip())
    expected = {os.path.basename(_prometheus_internals.value_file(str(tmp_path), kind, pid))
                for kind in _prometheus_internals.FILE_KINDS}
    assert set(os.listdir(tmp_path)) == expected


def test_the_value_class_can_be_picked_after_import(tmp_path):
    """prometheus_client imported first, the directory set later: ensure_multiprocess_values
    switches to the multiprocess value class."""
    script = (
        "import os\n"
        "from prometheus_client import values\n"
        "assert not getattr(values.ValueClass, '_multiprocess', False)\n"
        f"os.environ['PROMETHEUS_MULTIPROC_DIR'] = {str(tmp_path)!r}\n"
        "from shmstream import _prometheus_internals\n"
        "_prometheus_internals.ensure_multiprocess_values()\n"
        "assert values.ValueClass._multiprocess\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
