"""``python -m asyncsentinel``: the same command line as the ``asyncsentinel`` script."""

from __future__ import annotations

import sys

from asyncsentinel.cli import main

if __name__ == "__main__":
    sys.exit(main())
