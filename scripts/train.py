"""The main job from a checkout: ``python scripts/train.py [options]`` is ``textenv-train [options]``.

It runs whether or not the folder of the console commands is on ``PATH``; the
command itself is ``agents.cli.train``, and its exit status is this script's (0 on
success).
"""

import sys

from agents.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
