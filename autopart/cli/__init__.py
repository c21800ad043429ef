"""The ``autopart`` command line (:mod:`~autopart.cli.main`) and the tables of ``autopart inspect``
(:mod:`~autopart.cli.inspection`)."""
