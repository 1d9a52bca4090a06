"""``python -m ssl_utils.bundle``: the command line of ``ssl_utils.bundle.cli``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
