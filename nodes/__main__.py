"""`python -m nodes ...`: see `nodes/cli.py`."""

import sys

from .cli import main

sys.exit(main())
