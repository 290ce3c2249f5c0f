"""`python -m DataAugmentation ...`: see DataAugmentation/README.md and `python -m DataAugmentation --help`."""
import sys

import startup

from .cli import main

startup.started()
sys.exit(main())
