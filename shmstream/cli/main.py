"""The ``shmstream`` command: ``serve``, ``supervise`` and the segment tools.

Each subcommand lives in the module of its concern; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys

from shmstream.config import DEFAULT_NAMESPACE


def _add_namespace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default=None,
                        help=f"shared-memory namespace (SHMSTREAM_NAMESPACE, default "
                             f"{DEFAULT_NAMESPACE})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shmstream", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP service under gunicorn")
    serve.add_argument("--upstream", help="OpenAI-compatible base URL (default: built-in demo)")
    serve.add_argument("--bind", default=None, help="HOST:PORT (default 127.0.0.1:8080)")
    serve.add_argument("--workers", type=int, default=None)
    serve.add_argument("--threads", type=int, default=None)
    _add_namespace(serve)
    serve.add_argument("--max-bytes", type=int, default=None)
    serve.add_argument("--ttl", type=float, default=None)
    serve.add_argument("--gc-interval", type=float, default=None)
    serve.add_argument("--ping-interval", type=float, default=None)
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--upstream-api-key", default=None)
    serve.add_argument("--max-sessions", type=int, default=None)
    serve.add_argument("--max-shm-bytes", type=int, default=None)
    serve.add_argument("--backend", default=None, help="'shm' or a redis:// URL")
    serve.add_argument("--cors-origins", default=None,
                       help="'*' (default), 'none' or comma-separated allowed origins")
    serve.add_argument("--demo-tokens-per-second", type=float, default=None)

    supervise = commands.add_parser("supervise", help="run GC and dead-producer reaping")
    _add_namespace(supervise)
    supervise.add_argument("--once", action="store_true", help="one pass, then exit")

    _add_tool_commands(commands)
    return parser


_TOOL_COMMANDS = ("ls", "dump", "load", "tail", "gc", "purge")


def _add_tool_commands(commands) -> None:
    """The operator's segment tools (:mod:`shmstream.cli.tools`)."""
    ls = commands.add_parser("ls", help="list the sessions of a namespace")
    _add_namespace(ls)
    ls.add_argument("--json", action="store_true", help="JSON, with full ids and metadata")

    dump = commands.add_parser("dump", help="write a session's held bytes or a snapshot")
    dump.add_argument("id", metavar="ID", help="conversation id (full: see ls --json)")
    _add_namespace(dump)
    dump.add_argument("--format", choices=("raw", "sse", "msgpack"), default="raw",
                      help="raw bytes (default), readable SSE events, or a msgpack snapshot "
                           "for `load`")
    dump.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default stdout)")

    load = commands.add_parser("load", help="restore a msgpack snapshot as a finished session")
    load.add_argument("file", metavar="FILE", help="snapshot from `dump --format msgpack` "
                                                   "('-' for stdin)")
    _add_namespace(load)
    load.add_argument("--id", default=None, help="restore under this id instead")
    load.add_argument("--replace", action="store_true",
                      help="replace an existing session with the same id")
    load.add_argument("--touch", action="store_true",
                      help="set its end time to now, so its TTL starts over")

    tail = commands.add_parser("tail", help="follow a session's bytes until it ends")
    tail.add_argument("id", metavar="ID", help="conversation id")
    _add_namespace(tail)
    tail.add_argument("--from", dest="from_offset", type=int, default=None, metavar="N",
                      help="start at stream offset N (default: the oldest held byte)")

    gc = commands.add_parser("gc", help="one garbage-collection pass")
    _add_namespace(gc)
    gc.add_argument("--ttl", type=float, default=None,
                    help="seconds a finished session is kept (SHMSTREAM_TTL)")
    gc.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    gc.add_argument("--json", action="store_true")

    purge = commands.add_parser("purge", help="remove every segment and semaphore of a "
                                              "namespace")
    purge.add_argument("--namespace", required=True,
                       help="the namespace (required here, never taken from the environment)")
    purge.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        from shmstream.serve.server import serve

        return serve(args)
    if args.command == "supervise":
        from shmstream.serve.supervisor import supervise

        return supervise(args)
    if args.command in _TOOL_COMMANDS:
        from shmstream.cli.tools import run

        return run(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
