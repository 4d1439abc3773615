"""``python -m kepler ...`` is the ``kepler`` command."""

import sys

from kepler.cli import main

sys.exit(main())
