"""`cawbench bench` with the CAW-shaped stand-in registered (engine timing before caw_conv exists).

usage: python scripts/bench_standin.py [bench options]   (e.g. --methods standin_caw --width 0.4)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import standin  # noqa: E402

from cawbench.cli import main  # noqa: E402

standin.register()
sys.exit(main(["bench", *sys.argv[1:]]))
