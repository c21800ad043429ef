"""The ``autopart`` command line: :mod:`~autopart.cli.main` (parser, dispatch, error contract),
one module per command in :mod:`~autopart.cli.commands`, the options they share
(:mod:`~autopart.cli.options`), where they write (:mod:`~autopart.cli.console`) and the data of
``autopart inspect`` (:mod:`~autopart.cli.inspection`)."""
