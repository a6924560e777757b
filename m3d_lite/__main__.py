"""Run the m3d-lite command as ``python -m m3d_lite``."""

import sys

from m3d_lite.cli import main

sys.exit(main())
