"""The `minimind` command: one table from command name to function, and nothing else.

Each function takes an argv list (so it is callable from Python: `main(["data", "check", F])`
or directly, e.g. `minimind.data.commands.check_main([F])`) and returns an exit code. Modules are
imported only when their command runs, so `minimind --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

# command words -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": (
        "minimind.pipeline:main",
        "every stage end to end, evaluated, with a report card (--from/--until, resumable)",
    ),
    "demo": ("minimind.pipeline:main", "the pipeline on its default: the offline demo on CPU"),
    "presets": ("minimind.model.config:main", "list the model presets and their sizes"),
    "tokenizer train": (
        "minimind.data.commands:tokenizer_train_main",
        "train a byte-level BPE tokenizer on jsonl files",
    ),
    "data check": (
        "minimind.data.commands:check_main",
        "validate a jsonl file: kind, records, token lengths, bad lines",
    ),
    "data prepare": (
        "minimind.data.commands:prepare_main",
        "tokenize a jsonl file into token shards (parallel, resumable)",
    ),
    "data download": (
        "minimind.data.commands:download_main",
        "fetch MiniMind's public data files (Hugging Face or ModelScope)",
    ),
    "data demo": ("minimind.data.commands:demo_main", "write the offline demo corpus"),
    "train": (
        "minimind.train.cli:main",
        "train a stage: pretrain | sft | lora (MiniMind's flags; torchrun for DDP/FSDP2)",
    ),
    "chat": (
        "minimind.infer.chat_cli:main",
        "chat with a model (MiniMind's eval_llm.py flags): streaming, history, reasoning apart",
    ),
    "convert": (
        "minimind.convert.cli:main",
        "convert weights: MiniMind2 .pth <-> transformers folder <-> our checkpoint",
    ),
    "serve": (
        "minimind.serve.openai_api:main",
        "the OpenAI-compatible API server (continuous batching; MiniMind's serve flags)",
    ),
    "web": (
        "minimind.serve.web:main",
        "chat in the browser (Streamlit) with a local model or an OpenAI-compatible endpoint",
    ),
    "eval": ("minimind.eval.cli:main", "evaluate a model: perplexity, accuracy, DPO, reasoning"),
    "export": ("minimind.convert.export_cli:main", "export: hf (vLLM) | gguf | ollama"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: minimind COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`minimind COMMAND --help` describes a command's arguments."]
    return "\n".join(lines)


def resolve(argv: list[str]):
    """Longest command-word prefix of argv -> (function, remaining argv)."""
    for n in (2, 1):
        name = " ".join(argv[:n])
        if len(argv) >= n and name in COMMANDS:
            module, func = COMMANDS[name][0].split(":")
            return getattr(importlib.import_module(module), func), argv[n:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    fn, rest = resolve(argv)
    if fn is None:
        print(f"minimind: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
