"""`minimind export hf|gguf|ollama`: write a model for another runtime; main(argv).

  minimind export hf     --input runs/sft --output out/minimind-hf            # transformers, vLLM
  minimind export gguf   --input runs/sft --output out/minimind.gguf --dtype q8_0   # llama.cpp
  minimind export ollama --input runs/sft --output out/minimind-ollama       # + Modelfile

The same as `minimind convert --to FORMAT` (cli.py owns the flags: --tokenizer, --dtype,
MiniMind's naming, the .pth architecture flags); this file owns only the format word.
The input is anything convert reads: our checkpoint, a MiniMind2 .pth, a transformers folder.
"""

from __future__ import annotations

import sys

from .cli import main as convert_main

FORMATS = {
    "hf": "a transformers folder (Llama/Qwen3/Mixtral/Qwen2-MoE/Qwen3-MoE); vLLM serves it as is",
    "gguf": "one llama.cpp file (--dtype f32|f16|bf16|q8_0), tokenizer and chat template inside",
    "ollama": "a folder: model.gguf + Modelfile (then `ollama create NAME -f FOLDER/Modelfile`)",
}


def usage() -> str:
    lines = ["usage: minimind export FORMAT --input X --output Y [convert's flags]", "", "formats:"]
    lines += [f"  {name:<7} {text}" for name, text in FORMATS.items()]
    lines += ["", "`minimind export FORMAT --help` lists the flags (those of `minimind convert`)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    fmt, rest = argv[0], argv[1:]
    if fmt not in FORMATS:
        print(f"minimind export: unknown format {fmt!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:  # convert's flags, under this command's name
        from .cli import build_parser

        parser = build_parser()
        parser.prog = f"minimind export {fmt}"
        parser.print_help()
        return 0
    if "--to" in rest or any(a.startswith("--to=") for a in rest):
        print("minimind export: the format word sets --to; do not give both", file=sys.stderr)
        return 2
    return convert_main([*rest, "--to", fmt])
