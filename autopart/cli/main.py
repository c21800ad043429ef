"""The ``autopart`` command: the parser, the dispatch to one module per command
(:mod:`autopart.cli.commands`) and the error contract.

Readable tables go to stdout by default; ``--format json`` prints one JSON document to stdout
instead. Progress and errors go to stderr, so JSON output can be piped. A user's mistake (an
:class:`~autopart.errors.AutopartError`) is one line on stderr and exit code 2, never a traceback.
The command modules import what is heavy (torch.distributed.pipelining, the solvers) only inside
their ``run``, so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from autopart.cli.commands import bench, emit, inspect, models, plan, run
from autopart.cli.console import err
from autopart.errors import AutopartError

__all__ = ["build_parser", "main"]

COMMANDS = (inspect, bench, run, models, plan, emit)
"""The command modules, in the order ``autopart --help`` lists them."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except AutopartError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autopart",
        description="Automatic pipeline and tensor parallelism for PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"autopart {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autopart")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
