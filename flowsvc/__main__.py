"""`python -m flowsvc ...`: the same as the `flowsvc` console script."""

import sys

from flowsvc.cli import main

sys.exit(main())
