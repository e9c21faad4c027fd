"""``python -m fastopd ...``: the same as the ``fastopd`` command (see :mod:`fastopd.cli`)."""

import sys

from fastopd.cli import main

if __name__ == "__main__":
    sys.exit(main())
