"""The shmstream command: serve, supervise and the operator's session tools.

Each subcommand lives in the module of its concern; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys

from shmstream import __version__
from shmstream.config import DEFAULT_NAMESPACE, default_text, env_name, flag_name, specs

EPILOG = """\
Settings come from SHMSTREAM_* environment variables; a serve flag wins over its variable.
Sizes take 4MiB, 512KiB or 1M; durations take 300s, 5m, 1h or 250ms.
See `shmstream serve --help` for every setting."""


def _add_namespace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default=None,
                        help=f"shared-memory namespace (SHMSTREAM_NAMESPACE; default "
                             f"{DEFAULT_NAMESPACE})")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of :mod:`shmstream.config`, kept as text: the settings parse
    it, so a flag and its variable give the same errors."""
    for name, spec in specs():
        parser.add_argument(
            flag_name(name), dest=name, default=None, metavar=_metavar(spec),
            help=f"{spec.help} [{env_name(name)}; default {default_text(name, spec)}]"
                 .replace("%", "%%"))


def _metavar(spec) -> str:
    if spec.metavar:
        return spec.metavar
    kind = type(spec.kind).__name__
    return {"Size": "SIZE", "Duration": "DURATION", "Integer": "N", "Number": "N",
            "UpstreamUrl": "URL", "Backend": "URL"}.get(kind, "TEXT")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmstream", description=__doc__.splitlines()[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"shmstream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the HTTP service under gunicorn",
        description="Run the HTTP service (gunicorn workers and the supervisor). Each flag "
                    "has a SHMSTREAM_* variable; the flag wins.",
        epilog=EPILOG.splitlines()[1])
    _add_setting_flags(serve)

    supervise = commands.add_parser("supervise", help="run GC and dead-producer reaping "
                                                      "(for your own gunicorn config)")
    _add_namespace(supervise)
    supervise.add_argument("--once", action="store_true",
                           help="one pass, print what it did, then exit")

    _add_tool_commands(commands)
    return parser


_TOOL_COMMANDS = ("ls", "dump", "load", "tail", "gc", "purge")


def _add_tool_commands(commands) -> None:
    """The operator's session tools (:mod:`shmstream.cli.tools`)."""
    ls = commands.add_parser("ls", help="list the sessions of a namespace (both backends)")
    _add_namespace(ls)
    ls.add_argument("--json", action="store_true", help="JSON, with full ids and metadata")

    dump = commands.add_parser("dump", help="write a session's held bytes or a snapshot "
                                            "(both backends)")
    dump.add_argument("id", metavar="ID", help="conversation id (full: see ls --json)")
    _add_namespace(dump)
    dump.add_argument("--format", choices=("raw", "sse", "msgpack"), default="raw",
                      help="raw bytes (default), readable SSE events, or a msgpack snapshot "
                           "for `load`")
    dump.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default stdout)")

    load = commands.add_parser("load", help="restore a msgpack snapshot as a finished session "
                                            "(shared memory only)")
    load.add_argument("file", metavar="FILE", help="snapshot from `dump --format msgpack` "
                                                   "('-' for stdin)")
    _add_namespace(load)
    load.add_argument("--id", default=None, help="restore under this id instead")
    load.add_argument("--replace", action="store_true",
                      help="replace an existing session with the same id")
    load.add_argument("--touch", action="store_true",
                      help="set its end time to now, so its TTL starts over")

    tail = commands.add_parser("tail", help="follow a session's bytes until it ends, like "
                                            "tail -f (both backends)")
    tail.add_argument("id", metavar="ID", help="conversation id")
    _add_namespace(tail)
    tail.add_argument("--from", dest="from_offset", type=int, default=None, metavar="N",
                      help="start at stream offset N; 0 replays from the start (default: "
                           "the end, new bytes only)")

    gc = commands.add_parser("gc", help="one garbage-collection pass (both backends)")
    _add_namespace(gc)
    gc.add_argument("--ttl", default=None, metavar="DURATION",
                    help="how long a finished session is kept, like 300s or 5m "
                         "(SHMSTREAM_TTL; default 300 s)")
    gc.add_argument("--dry-run", action="store_true",
                    help="report, remove nothing (shared memory only)")
    gc.add_argument("--json", action="store_true")

    purge = commands.add_parser("purge", help="remove every segment and semaphore of a "
                                              "namespace (shared memory only)")
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
        from shmstream.config import SettingError
        from shmstream.serve.supervisor import supervise

        try:
            return supervise(args)
        except SettingError as exc:
            print(f"shmstream supervise: {exc}", file=sys.stderr)
            return 2
    if args.command in _TOOL_COMMANDS:
        from shmstream.cli.tools import run

        return run(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
