"""MiniMind's `python scripts/serve_openai_api.py`: the OpenAI-compatible API on port 8998.

All logic lives in minimind.serve.openai_api (also `minimind serve`); `--help` lists the flags
(MiniMind's --load_from/--weight/--save_dir/--hidden_size/--lora_weight/--device, plus
--host/--port/--api-key and the batching limits).
"""

import sys

from minimind.serve.openai_api import main

if __name__ == "__main__":
    sys.exit(main())
