"""``python -m mail_selfcheck ...``: the ``mail-selfcheck`` command (e.g. ``python -X importtime -m
mail_selfcheck run`` to see what a run imports)."""

import sys

from .cli import main

sys.exit(main())
