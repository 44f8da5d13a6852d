"""``python -m fusedclip``: the command line (``fusedclip.tools.cli``)."""

import sys

from fusedclip.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
