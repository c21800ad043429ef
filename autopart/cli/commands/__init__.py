"""One module per ``autopart`` command, each with ``add_parser(subparsers)`` (the command's options)
and ``run(args) -> int`` (its exit code). :mod:`autopart.cli.main` lists them."""
