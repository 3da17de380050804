"""MiniMind's `python eval_llm.py [flags]`: chat with a model in the terminal.

All logic lives in minimind.infer.chat_cli (also `minimind chat`); `--help` lists the flags.
"""

import sys

from minimind.infer.chat_cli import main

if __name__ == "__main__":
    sys.exit(main())
