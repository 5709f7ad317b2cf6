"""The quantiser's child process (``python -m icd_edge.export.quant``): one graph per process,
so its peak memory is returned to the OS when it exits."""

import logging
import sys

from icd_edge.export.quant import _child_main

logging.basicConfig(level=logging.WARNING)
sys.exit(_child_main(sys.argv[1:]))
