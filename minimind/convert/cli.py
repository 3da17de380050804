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
by default a .pth or one of our checkpoints becomes `hf`, a transformers folder `pth`.
Tokenizer: a folder input's files travel with it unless --tokenizer names others; a `.pth`
carries none, so the one beside it is taken (detect.find_tokenizer), else MiniMind2's, which
ships with the package: every transformers folder made from a `.pth` has one. Dtype: an hf or
minimind output is bf16 when the input is stored in bf16, else float32 (see default_dtype);
the line printed at the end names the dtype written. MiniMind's naming also works:
`--weight/--hidden_size/--use_moe/--save_dir` name the `.pth` as
`{save_dir}/{weight}_{hidden}[_moe].pth` and `--transformers_path` the folder; `--preset NAME`
gives the hidden size and the head counts, which a `.pth` does not record
(`--num_attention_heads/--num_key_value_heads` give them alone).
This file owns argument handling only; the conversions live in minimind2.py, hf.py, gguf.py
and ollama.py. `minimind export FORMAT` (export_cli.py) is this command with `--to FORMAT`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minimind.checkpoint import save_checkpoint
from minimind.model import MINIMIND2_YARN, MiniMindForCausalLM

from .detect import find_tokenizer, load_any, stored_dtype, weights_kind
from .hf import export_hf_folder
from .minimind2 import minimind_size, save_minimind2_pth

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
        default=None,
        help="weights of an hf, minimind, gguf or ollama output (default: hf and minimind "
        "bfloat16 when the input is stored in bf16, else float32; gguf/ollama f16. A .pth is "
        "always float16; q8_0 only for gguf/ollama)",
    )
    g = p.add_argument_group("MiniMind naming (instead of --input/--output)")
    g.add_argument("--save_dir", default="out", help="folder of the .pth files")
    g.add_argument("--weight", help="weight prefix, e.g. full_sft")
    g.add_argument("--hidden_size", type=int, help="hidden size in the .pth name")
    g.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="'_moe' in the name")
    g.add_argument(
        "--preset",
        help="a named size (minimind presets): its hidden size names the .pth, its head "
        "counts read it",
    )
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
    if not (args.weight and (args.hidden_size or args.preset) and args.transformers_path):
        parser.error(
            "give --input/--output, or --weight, --hidden_size (or --preset) and "
            "--transformers_path"
        )
    size = minimind_size(args)
    moe = "_moe" if size["use_moe"] else ""
    pth = Path(args.save_dir) / f"{args.weight}_{size['hidden_size']}{moe}.pth"
    folder = Path(args.transformers_path)
    to = args.to or "hf"  # MiniMind's script converts torch -> transformers by default
    # The .pth is the input of every export (hf, gguf, ollama); only pth/minimind read the folder.
    return (folder, pth, to) if to in ("pth", "minimind") else (pth, folder, to)


def _load(src: Path, args) -> MiniMindForCausalLM:
    pth_flags = {k: getattr(args, k) for k in PTH_FLAGS if getattr(args, k) is not None}
    size = minimind_size(args)
    heads = {k: size[k] for k in ("num_attention_heads", "num_key_value_heads")}
    if weights_kind(src) != "pth" and args.preset:  # the preset named a .pth; a folder says
        heads = {k: None for k in heads}
    return load_any(
        src,
        rope_scaling=MINIMIND2_YARN if args.inference_rope_scaling else None,
        **heads,
        **pth_flags,
    )


def default_dtype(src: Path) -> str:
    """The dtype an hf or minimind output gets without --dtype: the input's own, widened.

    bf16 stays bf16 (exact, and what the weights were trained in); fp16 (every MiniMind2
    `.pth`) and fp32 become float32: fp16 widens exactly, and a float16 transformers folder
    makes a plain `from_pretrained` differ from our model on CPU (by 2e-3 in logits).
    """
    return "bfloat16" if stored_dtype(src) == torch.bfloat16 else "float32"


def _tokenizer(src: Path, args, model, to: str) -> Path | None:
    """--tokenizer; a folder input's own; for a .pth the one beside it, else MiniMind2's
    (shipped with the package). None (said on stderr) when a folder input has none."""
    if args.tokenizer is not None or to == "pth":
        return args.tokenizer
    if src.is_dir():
        found = src if (src / "tokenizer.json").is_file() else None
    else:
        found = find_tokenizer(src, model.config.vocab_size)
        print(f"convert: tokenizer from {found}", file=sys.stderr)
    if found is None and to in ("hf", "minimind"):
        print(f"convert: {src} has no tokenizer.json: the output has no tokenizer files "
              "(pass --tokenizer DIR)", file=sys.stderr)  # fmt: skip
    return found


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
        model = _load(src, args)
        tokenizer = _tokenizer(src, args, model, to)
        if to in ("gguf", "ollama"):
            what = _export_llamacpp(model, dst, tokenizer, to, args.dtype or "f16")
        elif to in ("hf", "minimind"):
            name = _torch_name(args.dtype) if args.dtype else default_dtype(src)
            if to == "hf":
                arch = export_hf_folder(model, dst, tokenizer, DTYPES[name])
                what = f"transformers {arch}, {name}"
            else:
                save_checkpoint(dst, model, dtype=DTYPES[name], tokenizer_dir=tokenizer)
                what = f"minimind checkpoint, {name}"
        else:
            save_minimind2_pth(model, dst)
            what = "MiniMind2 .pth, float16"
    except ValueError as e:  # also CheckpointError, ConversionError: one line, no traceback
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    print(f"{src} -> {dst} ({what}, {model.num_parameters() / 1e6:.2f}M parameters)")
    return 0
