"""`python -m data_builders majority|parity ...`; see `data_builders.cli`."""

import sys

from .cli import main

sys.exit(main())
