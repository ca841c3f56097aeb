"""`python -m fwsel ...` (also what torchrun runs)."""

import sys

from fwsel.cli import main

sys.exit(main())
