"""Load a model and its tokenizer for inference, from any file a user holds, by path or by
MiniMind's flags; the one loader behind chat, the API server and the web UI.

Accepted: our checkpoint folders, transformers folders (MiniMind2's own or Llama/Qwen3/...),
MiniMind2 `.pth` files (which carry no tokenizer: one is looked for beside them, else given).
MiniMind's naming works as in its `eval_llm.py`: `--load_from model` (the default) means
"native weights": `{save_dir}/{weight}_{hidden_size}[_moe]` (our folder) or the `.pth` of that
name; any other `--load_from` is a path. A LoRA adapter (`--lora_weight`) is merged into the
base weights at load, so decoding costs nothing extra: ours (a folder with
adapter.safetensors + adapter_config.json, written by `minimind train lora`) or MiniMind's
(`{save_dir}/lora/{name}_{hidden}.pth`, keys `{module}.lora.A.weight` (r, in) and
`{module}.lora.B.weight` (out, r), added unscaled).
The model is always decoded by our own code and KV cache (minimind.infer.generation).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from minimind import paths
from minimind.checkpoint import CheckpointError
from minimind.convert.detect import load_any, weights_kind
from minimind.convert.minimind2 import read_pth
from minimind.devices import pick_device
from minimind.model import MINIMIND2_YARN, MiniMindForCausalLM
from minimind.model.lora import (
    apply_lora,
    load_lora_state_dict,
    lora_config_from_dict,
    merge_lora,
)
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


def _tokenizer_for(path: Path, tokenizer: str | os.PathLike | None) -> Tokenizer:
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    folder = path if path.is_dir() else path.parent
    candidates = [folder, folder / path.stem, paths.home() / "model" / "tokenizer"]
    candidates += [paths.home() / "model"]  # MiniMind keeps its tokenizer files in model/
    for c in candidates:
        if (c / "tokenizer.json").is_file():
            return load_tokenizer(c)
    raise FileNotFoundError(
        f"no tokenizer for {path}: none of {', '.join(map(str, candidates))} holds a "
        "tokenizer.json; pass --tokenizer DIR"
    )


def _merge_minimind_lora(model: MiniMindForCausalLM, sd: dict[str, torch.Tensor], src: str):
    """W += B A for every module in a MiniMind LoRA state dict (its adapter has no scaling)."""
    modules = dict(model.named_modules())
    pairs = sorted({k.rsplit(".lora.", 1)[0] for k in sd if ".lora." in k})
    if not pairs or len(pairs) * 2 != len(sd):
        raise CheckpointError(f"{src}: not a MiniMind LoRA file ({{module}}.lora.A/B.weight keys)")
    with torch.no_grad():
        for name in pairs:
            a, b = sd.get(f"{name}.lora.A.weight"), sd.get(f"{name}.lora.B.weight")
            target = modules.get(name)
            if a is None or b is None or not isinstance(target, torch.nn.Linear):
                raise CheckpointError(f"{src}: {name} has no A/B pair or is not a linear layer")
            delta = b.float() @ a.float()  # (out, r) @ (r, in)
            if delta.shape != target.weight.shape:
                raise CheckpointError(
                    f"{src}: {name} adapter is {tuple(delta.shape)}, the layer "
                    f"{tuple(target.weight.shape)}"
                )
            target.weight += delta.to(target.weight)


def apply_adapter(model: MiniMindForCausalLM, adapter: str | os.PathLike) -> None:
    """Merge a LoRA adapter (our folder or MiniMind's .pth) into `model`'s weights in place."""
    adapter = Path(adapter)
    if adapter.is_dir():
        config_file, weights = adapter / "adapter_config.json", adapter / "adapter.safetensors"
        if not (config_file.is_file() and weights.is_file()):
            raise CheckpointError(f"{adapter}: no adapter_config.json + adapter.safetensors")
        config = lora_config_from_dict(json.loads(config_file.read_text("utf-8")))
        apply_lora(model, config)
        load_lora_state_dict(model, load_file(str(weights)))
        merge_lora(model)
    elif adapter.is_file():
        _merge_minimind_lora(model, read_pth(adapter), str(adapter))
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
) -> LoadedModel:
    """The model at `path` with its tokenizer, in eval mode on `device` ("auto": cuda, mps,
    cpu). rope_scaling switches on MiniMind2's YaRN (x16 context).

    Errors (missing files, a vocabulary the tokenizer does not match) name the path.
    """
    path = Path(path)
    kind = weights_kind(path)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    tok = _tokenizer_for(path, tokenizer)
    model = load_any(path, rope_scaling=MINIMIND2_YARN if rope_scaling else None)
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
    if args.load_from == "model":
        path = find_weight(args.weight, args.hidden_size, bool(args.use_moe), save_dir)
    else:
        path = Path(args.load_from)
    lora = None
    if args.lora_weight and args.lora_weight != "None":
        lora = _find_lora(args.lora_weight, args.hidden_size, save_dir)
    return load_model(
        path,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        lora=lora,
        rope_scaling=args.inference_rope_scaling,
    )
