"""The conversion command line (`scripts/convert_model.py`, `minimind convert`): main(argv).

  convert_model.py --input out/full_sft_512.pth --output MiniMind2-Small-hf --tokenizer model/
  convert_model.py --input MiniMind2-Small --output out/full_sft_512.pth
  convert_model.py --input MiniMind2-Small --output runs/small --to minimind
  convert_model.py --weight full_sft --hidden_size 512 --transformers_path MiniMind2-Small-hf

The kind of input is detected: a file is a MiniMind2 `.pth`; a folder is one of our checkpoints
(minimind.checkpoint: config.json with a format_version) or a transformers folder (MiniMind2's
own "minimind" type, or Llama/Qwen3/Mixtral/Qwen2-MoE/Qwen3-MoE). `--to` picks the output:
`hf` (a transformers folder), `pth` (MiniMind2's fp16 state dict), `minimind` (our checkpoint),
`gguf` (one llama.cpp file: `--output model.gguf`, `--dtype f32|f16|bf16|q8_0`, needs the
tokenizer) or `ollama` (a folder with model.gguf and its Modelfile);
by default a .pth or one of our checkpoints becomes `hf`, a transformers folder `pth`. A folder
input's tokenizer files travel with it unless --tokenizer names others. MiniMind's naming also
works: `--weight/--hidden_size/--use_moe/--save_dir` name the `.pth` as
`{save_dir}/{weight}_{hidden}[_moe].pth` and `--transformers_path` the folder.
This file owns argument handling only; the conversions live in minimind2.py, hf.py, gguf.py
and ollama.py. `minimind export FORMAT` (export_cli.py) is this command with `--to FORMAT`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minimind.checkpoint import CheckpointError, save_checkpoint
from minimind.model import MINIMIND2_YARN, MiniMindForCausalLM

from .detect import load_any, weights_kind
from .hf import ConversionError, export_hf_folder
from .minimind2 import save_minimind2_pth

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# --dtype also takes GGUF's names; the torch names mean the same for a GGUF output.
GGUF_NAMES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
TORCH_NAMES = {v: k for k, v in GGUF_NAMES.items()}
FORMATS = ["hf", "pth", "minimind", "gguf", "ollama"]
PTH_FLAGS = ("rms_norm_eps", "rope_theta", "max_position_embeddings", "num_experts_per_tok")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_model.py",
        description="Convert between MiniMind2 .pth weights, transformers folders (no remote "
        "code) and our checkpoint folders.",
    )
    p.add_argument("--input", help="a MiniMind2 .pth, a transformers folder or our checkpoint")
    p.add_argument("--output", help="the file or folder to write")
    p.add_argument(
        "--to",
        choices=FORMATS,
        help="transformers folder, MiniMind2 .pth, our checkpoint, GGUF file or Ollama folder "
        "(default: see above)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder to include (default: the input folder's)")
    p.add_argument(
        "--dtype",
        choices=[*DTYPES, *TORCH_NAMES, "q8_0"],
        default="float16",
        help="weights of an hf, minimind, gguf or ollama output (a .pth is always float16; "
        "q8_0 only for gguf/ollama)",
    )
    g = p.add_argument_group("MiniMind naming (instead of --input/--output)")
    g.add_argument("--save_dir", default="out", help="folder of the .pth files")
    g.add_argument("--weight", help="weight prefix, e.g. full_sft")
    g.add_argument("--hidden_size", type=int, help="hidden size in the .pth name")
    g.add_argument("--use_moe", type=int, default=0, choices=[0, 1], help="'_moe' in the name")
    g.add_argument("--transformers_path", help="the transformers folder")
    a = p.add_argument_group("what a .pth cannot tell (defaults: MiniMind2's)")
    a.add_argument("--num_attention_heads", type=int, help="default 8 (or from q_norm)")
    a.add_argument("--num_key_value_heads", type=int, help="default: from k_proj's shape")
    a.add_argument("--rms_norm_eps", type=float)
    a.add_argument("--rope_theta", type=float)
    a.add_argument("--max_position_embeddings", type=int)
    a.add_argument("--num_experts_per_tok", type=int)
    a.add_argument(
        "--inference_rope_scaling", action="store_true", help="switch on MiniMind2's YaRN (x16)"
    )
    return p


def _paths(args, parser) -> tuple[Path, Path, str]:
    """-> (input, output, output kind) from --input/--output or MiniMind's naming."""
    if args.input:
        if not args.output:
            parser.error("--output is required with --input")
        src, dst = Path(args.input), Path(args.output)
        return src, dst, args.to or ("pth" if weights_kind(src) == "hf" else "hf")
    if not (args.weight and args.hidden_size and args.transformers_path):
        parser.error("give --input/--output, or --weight, --hidden_size and --transformers_path")
    moe = "_moe" if args.use_moe else ""
    pth = Path(args.save_dir) / f"{args.weight}_{args.hidden_size}{moe}.pth"
    folder = Path(args.transformers_path)
    to = args.to or "hf"  # MiniMind's script converts torch -> transformers by default
    # The .pth is the input of every export (hf, gguf, ollama); only pth/minimind read the folder.
    return (folder, pth, to) if to in ("pth", "minimind") else (pth, folder, to)


def _load(src: Path, args, parser) -> MiniMindForCausalLM:
    pth_flags = {k: getattr(args, k) for k in PTH_FLAGS if getattr(args, k) is not None}
    try:
        return load_any(
            src,
            rope_scaling=MINIMIND2_YARN if args.inference_rope_scaling else None,
            num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_key_value_heads,
            **pth_flags,
        )
    except ValueError as e:
        if isinstance(e, (CheckpointError, ConversionError)):
            raise
        parser.error(str(e))


def _torch_name(dtype: str) -> str:
    return TORCH_NAMES.get(dtype, dtype)


def _export_llamacpp(model, dst: Path, tokenizer, to: str, dtype: str) -> str:
    """A GGUF file, or an Ollama folder (model.gguf + Modelfile); -> what was written."""
    from .gguf import export_gguf
    from .ollama import export_ollama

    dtype = GGUF_NAMES.get(dtype, dtype)
    if to == "gguf":
        return f"GGUF, llama.cpp architecture {export_gguf(model, dst, tokenizer, dtype)}, {dtype}"
    arch = export_ollama(model, dst, tokenizer, dtype)
    return f"Ollama Modelfile + model.gguf, llama.cpp architecture {arch}, {dtype}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        src, dst, to = _paths(args, parser)
        if to == "pth" and weights_kind(src) == "pth":
            parser.error(f"{src} is already a .pth file")
        if args.dtype == "q8_0" and to not in ("gguf", "ollama"):
            parser.error("--dtype q8_0 applies to a gguf or ollama output")
        model = _load(src, args, parser)
        tokenizer = args.tokenizer
        if tokenizer is None and src.is_dir() and (src / "tokenizer.json").is_file():
            tokenizer = src
        if to in ("gguf", "ollama"):
            what = _export_llamacpp(model, dst, tokenizer, to, args.dtype)
        elif to == "hf":
            what = export_hf_folder(model, dst, tokenizer, DTYPES[_torch_name(args.dtype)])
        elif to == "minimind":
            dtype = DTYPES[_torch_name(args.dtype)]
            save_checkpoint(dst, model, dtype=dtype, tokenizer_dir=tokenizer)
            what = f"minimind checkpoint, {_torch_name(args.dtype)}"
        else:
            save_minimind2_pth(model, dst)
            what = "MiniMind2 .pth, float16"
    except (CheckpointError, ConversionError, FileNotFoundError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    print(f"{src} -> {dst} ({what}, {model.num_parameters() / 1e6:.2f}M parameters)")
    return 0
