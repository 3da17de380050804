"""`cd trainer && python train_reason.py [flags]` (and under torchrun), as MiniMind users know it;
the work is in minimind.train (`minimind train reason --help` lists the flags)."""

import sys

from minimind.train.cli import main

if __name__ == "__main__":
    sys.exit(main(["reason", *sys.argv[1:]]))
