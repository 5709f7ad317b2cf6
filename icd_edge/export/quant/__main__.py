"""The quantiser's child process: ``python -m icd_edge.export.quant SRC OUT PRECISION FEEDS_DIR WEIGHTS``.

A package runs its ``__main__`` under ``-m``; the entry lives here so the parent's command line
names the package, whichever module holds the quantiser."""

import logging
import sys

from icd_edge.export.quant.int8 import _child_main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(_child_main(sys.argv[1:]))
