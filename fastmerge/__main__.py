"""``python -m fastmerge ...`` is the ``fastmerge`` command (see :mod:`fastmerge.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
