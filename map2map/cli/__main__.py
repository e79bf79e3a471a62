"""`python -m map2map.cli ...` runs the `m2m` program."""

import sys

from map2map.cli import main

sys.exit(main())
