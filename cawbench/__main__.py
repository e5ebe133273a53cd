import sys

from cawbench.cli import main

sys.exit(main())
