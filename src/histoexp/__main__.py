"""``python -m histoexp``: the ``histoexp`` command (e.g. ``torchrun --nproc_per_node=2 -m histoexp fit ...``)."""

import sys

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
