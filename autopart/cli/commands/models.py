"""``autopart models``: the built-in model zoo."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from autopart.cli.console import out

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "models", help="list the built-in models", description="List the built-in model zoo."
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autopart.models.zoo import list_models

    table = Table(
        title="built-in models (also: hf:<model_type>, file.py:factory, package.module:factory)",
        title_justify="left",
    )
    table.add_column("name")
    table.add_column("description")
    for name, description in list_models():
        table.add_row(name, description)
    out.print(table)
    return 0
