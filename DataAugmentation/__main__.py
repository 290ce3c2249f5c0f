"""`python -m DataAugmentation ...`: see DataAugmentation/README.md and `python -m DataAugmentation --help`."""
import sys

from .cli import main

sys.exit(main())
