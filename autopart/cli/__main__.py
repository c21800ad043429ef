"""``python -m autopart.cli``: the ``autopart`` command."""

import sys

from autopart.cli.main import main

sys.exit(main())
