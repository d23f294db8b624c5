import sys

from lmadapt.cli import main

sys.exit(main())
