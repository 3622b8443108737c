"""`python -m bmkernels ...` runs the `bmkernels` command (bmkernels.cli)."""

import sys

from bmkernels.cli import main

if __name__ == "__main__":
    sys.exit(main())
