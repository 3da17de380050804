"""Load a model and its tokenizer for inference, from any file a user holds, by path or by
MiniMind's flags; the one loader behind chat, the API server and the web UI.

Accepted: our checkpoint folders, transformers folders (MiniMind2's own or Llama/Qwen3/...),
MiniMind2 `.pth` files (which carry no tokenizer: one is looked for beside them, else given).
MiniMind's naming works as in its `eval_llm.py`: `--load_from model` (the default) means
"native weights": `{save_dir}/{weight}_{hidden_size}[_moe]` (our folder) or the `.pth` of that
name; any other `--load_from` is a path. A LoRA adapter (`--lora_weight`) is merged into the
base weights at load, so decoding costs nothing extra: ours (an adapter folder, minimind.adapter,
written by `minimind train lora`) or MiniMind's (`{save_dir}/lora/{name}_{hidden}.pth`, read by
minimind.convert.minimind2).
The model is always decoded by our own code and KV cache (minimind.infer.generation).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minimind import paths
from minimind.adapter import merge_adapter
from minimind.checkpoint import CheckpointError
from minimind.convert.detect import find_tokenizer, load_any, weights_kind
from minimind.convert.minimind2 import merge_minimind2_lora, minimind_size
from minimind.devices import pick_device
from minimind.model import MINIMIND2_YARN, MiniMindForCausalLM
from minimind.tokenizer import Tokenizer, load_tokenizer

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model ready to decode (eval mode, on its device) with the tokenizer that goes with it."""

    model: MiniMindForCausalLM
    tokenizer: Tokenizer
    name: str  # a short id: the folder or file name (the API's model id)
    path: Path
    kind: str  # "minimind" | "hf" | "pth"
    device: torch.device

    def describe(self) -> str:
        n = self.model.num_parameters() / 1e6
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return f"{self.name} ({self.kind}, {n:.2f}M parameters, {dtype}, {self.device})"


def find_weight(spec: str | os.PathLike, hidden_size: int, use_moe: bool, save_dir: Path) -> Path:
    """A weight name or path -> an existing checkpoint folder or `.pth` file.

    A name resolves MiniMind's way: `{save_dir}/{name}_{hidden}[_moe]` (our folder, preferred)
    or the `.pth` of that name. FileNotFoundError lists what was tried.
    """
    stem = f"{spec}_{hidden_size}{'_moe' if use_moe else ''}"
    return _first_existing(spec, [save_dir / stem, save_dir / f"{stem}.pth"], "weights")


def _first_existing(spec: str | os.PathLike, candidates: list[Path], what: str) -> Path:
    """`spec` itself when it is a path that exists, else the first candidate that exists."""
    for c in [Path(spec), *candidates]:
        if c.exists():
            return c
    raise FileNotFoundError(
        f"no {what} named {str(spec)!r}: none of {', '.join(map(str, candidates))}"
    )


def _tokenizer_for(path: Path, tokenizer: str | os.PathLike | None, vocab_size: int) -> Tokenizer:
    """--tokenizer, else the one beside the weights, else (a `.pth`) MiniMind2's shipped one."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    return load_tokenizer(find_tokenizer(path, vocab_size))


def apply_adapter(model: MiniMindForCausalLM, adapter: str | os.PathLike) -> None:
    """Merge a LoRA adapter into `model`'s weights in place: our adapter folder
    (minimind.adapter) or MiniMind's `.pth` (minimind.convert.minimind2)."""
    adapter = Path(adapter)
    if adapter.is_dir():
        merge_adapter(model, adapter)
    elif adapter.is_file():
        merge_minimind2_lora(model, adapter)
    else:
        raise FileNotFoundError(f"no LoRA adapter at {adapter}")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it (half the memory traffic per decoded token), else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(
    path: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    lora: str | os.PathLike | None = None,
    rope_scaling: bool = False,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
) -> LoadedModel:
    """The model at `path` with its tokenizer, in eval mode on `device` ("auto": cuda, mps,
    cpu). rope_scaling switches on MiniMind2's YaRN (x16 context). The head counts describe a
    `.pth`, which does not record them (MiniMind2's 8 query heads when not given).

    Without `tokenizer`, the one beside the weights is used (minimind.convert.detect
    .find_tokenizer), and for a `.pth` with none beside it MiniMind2's, shipped with the
    package. Errors (missing files, a vocabulary the tokenizer does not match) name the path.
    """
    path = Path(path)
    kind = weights_kind(path)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    heads = {"num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads}
    yarn = MINIMIND2_YARN if rope_scaling else None
    model = load_any(path, rope_scaling=yarn, **(heads if kind == "pth" else {}))
    # A folder's config.json says its head counts: a flag that agrees is harmless (MiniMind's
    # flags may be given for every kind of file), one that does not is refused, not ignored.
    wrong = [
        f"--{k} {v} (its config.json: {getattr(model.config, k)})"
        for k, v in heads.items()
        if v is not None and kind != "pth" and v != getattr(model.config, k)
    ]
    if wrong:
        raise CheckpointError(f"{'; '.join(wrong)} disagree with {path}: drop the flag")
    tok = _tokenizer_for(path, tokenizer, model.config.vocab_size)
    if lora is not None:
        apply_adapter(model, lora)
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
            f"{model.config.vocab_size}: they do not belong together (pass --tokenizer)"
        )
    model = model.to(device=dev, dtype=dtype or default_dtype(dev)).eval()
    name = path.stem if kind == "pth" else path.name
    return LoadedModel(model, tok, name, path, kind, dev)


# --- MiniMind's command-line flags --------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model-choosing flags of MiniMind's eval_llm.py / serve_openai_api.py, plus ours."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--load_from",
        default="model",
        help="'model' = native weights named by --weight (default); else a path: our "
        "checkpoint folder, a transformers folder or a MiniMind2 .pth",
    )
    g.add_argument("--save_dir", default=None, help="folder of native weights (default: out/)")
    g.add_argument("--weight", default="full_sft", help="weight name, e.g. full_sft, pretrain")
    g.add_argument("--hidden_size", type=int, default=512, help="hidden size in the weight name")
    g.add_argument(
        "--num_hidden_layers",
        type=int,
        default=8,
        help="MiniMind's flag (unused: read from weights)",
    )
    g.add_argument(
        "--num_attention_heads",
        type=int,
        default=None,
        help="query heads of a .pth, which does not record them (default 8, MiniMind2's)",
    )
    g.add_argument(
        "--num_key_value_heads",
        type=int,
        default=None,
        help="key/value heads of a .pth (default: from its shapes)",
    )
    g.add_argument(
        "--preset",
        default=None,
        help="a named size (minimind presets): its hidden size names the weights, its head "
        "counts read a .pth",
    )
    g.add_argument("--use_moe", type=int, default=0, choices=[0, 1], help="'_moe' in the name")
    g.add_argument(
        "--lora_weight",
        default="None",
        help="LoRA adapter merged at load: a name ({save_dir}/{name}_{hidden} folder or "
        "{save_dir}/lora/{name}_{hidden}.pth) or a path; 'None' = no adapter",
    )
    g.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: beside the weights)"
    )
    g.add_argument(
        "--inference_rope_scaling", action="store_true", help="MiniMind2's YaRN (x16 context)"
    )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, else fp32"
    )


def _find_lora(spec: str, hidden: int, save_dir: Path) -> Path:
    candidates = [save_dir / f"{spec}_{hidden}", save_dir / "lora" / f"{spec}_{hidden}.pth"]
    return _first_existing(spec, candidates, "LoRA adapter")


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    """Resolve add_model_args' flags and load."""
    save_dir = Path(args.save_dir) if args.save_dir else paths.out_dir()
    size = minimind_size(args)
    hidden = size["hidden_size"]
    if args.load_from == "model":
        path = find_weight(args.weight, hidden, bool(size["use_moe"]), save_dir)
    else:
        path = Path(args.load_from)
    lora = None
    if args.lora_weight and args.lora_weight != "None":
        lora = _find_lora(args.lora_weight, hidden, save_dir)
    loaded = load_model(
        path,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        lora=lora,
        rope_scaling=args.inference_rope_scaling,
        num_attention_heads=size["num_attention_heads"],
        num_key_value_heads=size["num_key_value_heads"],
    )
    if args.load_from != "model":
        _check_size_flags(args, loaded.model.config, path)
    return loaded


def _check_size_flags(args: argparse.Namespace, config, path: Path) -> None:
    """With --load_from the weights set the size; --hidden_size / --use_moe given otherwise
    than MiniMind's defaults and contradicting them are refused, not silently ignored."""
    from minimind.convert.minimind2 import NAME_DEFAULTS

    found = {"hidden_size": config.hidden_size, "use_moe": int(bool(config.use_moe))}
    wrong = [
        f"--{k} {getattr(args, k)} (the weights: {found[k]})"
        for k in found
        if getattr(args, k, None) is not None
        and int(getattr(args, k)) != NAME_DEFAULTS[k]
        and int(getattr(args, k)) != found[k]
    ]
    if wrong:
        raise ValueError(
            f"{'; '.join(wrong)} disagree with --load_from {path}: the weights set the size "
            "(drop the flag)"
        )
