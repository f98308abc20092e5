"""``python -m sync_worker.server``: run the embedded server (same options as ``sync-worker server``)."""
from __future__ import annotations

import sys

from sync_worker.cli_support import ArgumentParser, run_command

from .cli import configure_parser


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m sync_worker.server",
        description="Serve the task-run API (Prefect 3 wire protocol) backed by a SQLite database.",
    )
    configure_parser(parser)
    args = parser.parse_args(argv)
    return run_command(args.func, args, parser.prog)


if __name__ == "__main__":
    sys.exit(main())
