"""Where the CLI writes: readable tables and JSON to stdout (:data:`out`), progress and errors to
stderr (:data:`err`), so JSON output can be piped."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["bar", "err", "is_quiet", "out", "print_json", "spinner"]

# Piped output keeps full-width tables instead of wrapping every cell at 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, highlight=False)


def is_quiet(args: argparse.Namespace) -> bool:
    """No spinners or bars when JSON goes to a pipe and nobody watches stderr."""
    return bool(args.format == "json" and not err.is_terminal)


def print_json(doc: Any) -> None:
    """``doc`` as one indented JSON document on stdout."""
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")


def bar(quiet: bool) -> Progress:
    """A transient progress bar on stderr; its tasks show their own description."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=err, transient=True, disable=quiet)


def spinner(text: str, quiet: bool) -> Any:
    """A spinner on stderr, or nothing when ``quiet``; yields the status (or ``None``)."""
    return nullcontext() if quiet else err.status(text, spinner="dots")
