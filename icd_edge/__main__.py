import sys

from icd_edge.cli import main

sys.exit(main())
