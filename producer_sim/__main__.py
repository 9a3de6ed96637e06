"""``python -m producer_sim``: the same as the ``producer-sim`` command."""

import sys

from producer_sim.cli import main

sys.exit(main())
