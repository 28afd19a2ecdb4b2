"""The README's "Trying it" block, run as written in a fresh copy of the repository: a new
venv with only what serving needs, the start in the background, the wait, every curl and the
tool (issue 14: the block failed when pasted)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess

import pytest
from service import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SERVE_PACKAGES = 16  # what `pip install .` brings (measured; 23 while the relays used aiohttp)


def trying_it_block() -> str:
    with open(README) as readme:
        text = readme.read()
    section = text.split("## Trying it", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no ```sh block under ## Trying it"
    return match[1]


def _fresh_copy(destination: str) -> None:
    """The repository's files as a fresh clone has them (tracked and new, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = os.path.join(ROOT, name)
        if not os.path.isfile(source):
            continue  # deleted in the work tree
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)


@pytest.mark.skipif(not shutil.which("curl"), reason="the README's block uses curl")
def test_the_trying_it_block_works_when_pasted_into_a_fresh_clone(tmp_path, namespace):
    clone = tmp_path / "clone"
    _fresh_copy(str(clone))
    port = free_port()
    # Only the port changes (8080 may be taken on a shared machine); the namespace keeps
    # the test's objects apart from anything else on this host.
    block = trying_it_block().replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SHMSTREAM_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(SHMSTREAM_NAMESPACE=namespace, SHMSTREAM_BIND=f"127.0.0.1:{port}",
               SHMSTREAM_GRACEFUL_TIMEOUT="3")
    script = "set -e\n" + block + "wait\n"  # each line must succeed; then the stop completes
    process = subprocess.Popen(["bash", "-c", script], cwd=clone, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=400)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    text = output.decode(errors="replace")
    log = (clone / "shmstream.log").read_text(errors="replace")
    assert process.returncode == 0, text + log
    assert text.count("data: [DONE]") >= 1, text  # the completion, streamed to its end
    assert '"conversation_id": "chat-1"' in text or '"conversation_id":"chat-1"' in text, text
    assert re.search(r"^chat-1\s+done", text, re.M), text  # `.venv/bin/shmstream ls`
    assert "Traceback" not in log, log
    # Serving installed what it needs, not the test tools.
    installed = subprocess.run([str(clone / ".venv/bin/python"), "-m", "pip", "list",
                                "--format=freeze", "--disable-pip-version-check"],
                               capture_output=True, text=True, check=True).stdout
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert "pytest" not in names and "playwright" not in names, names
    assert len(names) <= SERVE_PACKAGES + 4, names  # + pip, setuptools, shmstream; 1 spare


def test_a_built_wheel_has_every_subpackage_the_page_and_its_licenses(tmp_path):
    # docs/deploy.md installs a non-editable copy into /opt/shmstream/.venv: the wheel must
    # carry every subpackage and the chat page's files (it once carried only the top one).
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                    "--disable-pip-version-check", "-w", str(tmp_path), ROOT],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("shmstream-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("cli", "serve", "http", "relay", "store", "shm", "redis"):
        assert f"shmstream/{package}/__init__.py" in names, package
    for name in ("index.html", "chat.js", "chat.css", "vendor/marked.umd.js",
                 "vendor/purify.min.js", "vendor/marked.LICENSE.md", "vendor/dompurify.LICENSE"):
        assert f"shmstream/http/static/{name}" in names, name
    assert "shmstream/__main__.py" in names
    assert any(name.endswith("entry_points.txt") for name in names)
