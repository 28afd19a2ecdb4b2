"""The ``shmstream`` command: ``serve``, ``supervise`` and the segment tools.

Each subcommand lives in the module of its concern; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import DEFAULT_NAMESPACE


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
    serve.add_argument("--demo-tokens-per-second", type=float, default=None)

    supervise = commands.add_parser("supervise", help="run GC and dead-producer reaping")
    _add_namespace(supervise)
    supervise.add_argument("--once", action="store_true", help="one pass, then exit")

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        from .server import serve

        return serve(args)
    if args.command == "supervise":
        from .supervisor import supervise

        return supervise(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
