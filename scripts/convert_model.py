"""MiniMind's `python scripts/convert_model.py`: torch weights <-> transformers folders.

All logic lives in minimind.convert.cli (also `minimind convert`); `--help` lists the flags.
"""

import sys

from minimind.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
