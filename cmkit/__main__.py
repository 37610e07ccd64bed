"""`python -m cmkit ...`: the same command line as `cmkit ...`, for environments without the
console script on PATH."""

import sys

from cmkit.cli import main

sys.exit(main())
