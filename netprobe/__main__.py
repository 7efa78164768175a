"""`python -m netprobe` runs the same entry point as the `netprobe` script."""

import sys

from netprobe.entry import main

sys.exit(main())
