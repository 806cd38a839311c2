"""``python -m calib``: the ``calib`` command line (see :mod:`calib.cli`)."""

import sys

from calib.cli import main

if __name__ == "__main__":
    sys.exit(main())
