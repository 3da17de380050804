"""`cd trainer && python train_full_sft.py [flags]` (and under torchrun), as MiniMind users know it;
the work is in minimind.train (`minimind train sft --help` lists the flags)."""

import sys

from minimind.train.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
