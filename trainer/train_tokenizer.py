"""`python trainer/train_tokenizer.py --data_path ... --out_dir ...`, as MiniMind users know
it; the work is in minimind.data.commands and minimind.tokenizer.train."""

import sys

from minimind.data.commands import tokenizer_train_main

if __name__ == "__main__":
    sys.exit(tokenizer_train_main(sys.argv[1:]))
