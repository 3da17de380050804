"""MiniMind2's own weight formats: `.pth` state dicts, LoRA adapter `.pth` files and transformers
folders of model_type "minimind".

Owns reading those files (`torch.load(..., weights_only=True)` only, or safetensors), inferring
a ModelConfig from tensor shapes, and writing `.pth` files MiniMind's own scripts can load. It
does not own native transformers architectures (Llama, Qwen, Mixtral): see hf.py. Nothing
here imports transformers: a MiniMind2 folder is read as a config.json plus weight files, never
through `trust_remote_code`.

MiniMind2's tokenizer ships with the package (`MINIMIND2_TOKENIZER`, Apache-2.0, attributed in
its TOKENIZER_NOTICE): the default tokenizer of a `.pth` with none beside it.

What a state dict cannot tell (docs/FORMATS.md gives the MiniMind2 values): the head counts
when the model has no q/k norm (default 8 query heads, given otherwise by the caller's
--num_attention_heads or --preset; the key/value heads then follow from k_proj's shape),
rms_norm_eps, rope_theta, the context length and the MoE top-k. Everything else is read from
shapes, and every mismatch names the key with its expected and found shape.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from minimind.checkpoint import CheckpointError, load_weights
from minimind.fsutil import atomic_write
from minimind.model import MINIMIND2_YARN, MiniMindForCausalLM, ModelConfig, preset

MINIMIND2_HEADS = 8  # query heads of every public MiniMind2 model (key/value heads: 2)
MINIMIND2_VOCAB = 6400
# MiniMind2's tokenizer, shipped as package data (Apache-2.0: TOKENIZER_NOTICE and the license
# text are in the folder): a `.pth` carries none, and MiniMind users expect this one.
MINIMIND2_TOKENIZER = Path(__file__).resolve().parent / "minimind2_tokenizer"

# Fields a state dict determines; passing them as overrides would contradict the weights.
SHAPE_FIELDS = frozenset(
    {
        "hidden_size",
        "num_hidden_layers",
        "head_dim",
        "intermediate_size",
        "moe_intermediate_size",
        "vocab_size",
        "qk_norm",
        "tie_word_embeddings",
        "use_moe",
        "n_routed_experts",
        "n_shared_experts",
    }
)


def _shape(sd: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"missing key {key} (is this a MiniMind state dict?)")
    return tuple(sd[key].shape)


def allowed_heads(q_out: int, k_out: int) -> list[int]:
    """The query-head counts that q_proj's and k_proj's output rows allow: head_dim divides both
    and is even (rotary embeddings turn pairs of dimensions).

    >>> allowed_heads(192, 64)  # the demo preset: 6 heads of 32 (and 2 key/value heads)
    [3, 6, 12, 24, 48, 96]
    >>> allowed_heads(512, 128)  # MiniMind2-Small: 8 heads of 64
    [4, 8, 16, 32, 64, 128, 256]
    """
    return [
        q_out // d for d in range(q_out, 1, -1) if d % 2 == 0 and not q_out % d and not k_out % d
    ]


def _heads_hint(q_out: int, k_out: int) -> str:
    counts = allowed_heads(q_out, k_out)
    pairs = ", ".join(f"{n} (head_dim {q_out // n})" for n in counts)
    return f"the shapes allow --num_attention_heads {pairs}" if counts else "no head count fits"


def _heads(
    sd: dict[str, torch.Tensor], qk_norm: bool, n_q: int | None, n_kv: int | None
) -> tuple[int, int, int]:
    """-> (query heads, key/value heads, head_dim) from layer 0's projections.

    A `.pth` does not record its head counts: without q/k norm (whose width is head_dim) the
    query heads are given (--num_attention_heads, MiniMind2's 8 by default), and an impossible
    count is refused with the counts the shapes allow.
    """
    attn = "model.layers.0.self_attn"
    q_out, k_out = _shape(sd, f"{attn}.q_proj.weight")[0], _shape(sd, f"{attn}.k_proj.weight")[0]
    if qk_norm:  # q_norm's width is head_dim, so both head counts are determined
        head_dim = _shape(sd, f"{attn}.q_norm.weight")[0]
        found = {"num_attention_heads": q_out // head_dim, "num_key_value_heads": k_out // head_dim}
        for name, given in (("num_attention_heads", n_q), ("num_key_value_heads", n_kv)):
            if given is not None and given != found[name]:
                raise CheckpointError(
                    f"--{name} {given} contradicts {attn}.q_norm.weight: head_dim {head_dim} "
                    f"gives {found[name]} heads"
                )
        return found["num_attention_heads"], found["num_key_value_heads"], head_dim
    default = n_q is None
    n_q = MINIMIND2_HEADS if default else n_q
    flag = f"--num_attention_heads {n_q}" + (" (MiniMind2's, the default)" if default else "")
    head_dim = q_out // n_q if n_q > 0 and not q_out % n_q else 0
    if not head_dim or k_out % head_dim or head_dim % 2:
        found = f"{attn}.q_proj.weight has {q_out} output rows, k_proj {k_out}"
        raise CheckpointError(
            f"{flag} does not fit: {found}; {_heads_hint(q_out, k_out)}. A .pth does not "
            "record its head count: give the model's --num_attention_heads (or its --preset)"
        )
    if n_kv is None:
        n_kv = k_out // head_dim
    elif k_out != n_kv * head_dim:
        raise CheckpointError(
            f"--num_key_value_heads {n_kv} does not fit: {attn}.k_proj.weight has {k_out} output "
            f"rows, not {n_kv} x head_dim {head_dim}; with {n_q} query heads the shapes allow "
            f"--num_key_value_heads {k_out // head_dim}"
        )
    return n_q, n_kv, head_dim


def infer_config_from_state_dict(
    sd: dict[str, torch.Tensor],
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    **overrides: Any,
) -> ModelConfig:
    """A ModelConfig whose parameter shapes are those of the MiniMind2-named state dict `sd`.

    Dense vs MoE comes from the presence of `mlp.gate.weight`, qk_norm from `q_norm` keys, the
    tied head from `lm_head.weight` being absent or equal to the embedding. `overrides` set the
    fields shapes cannot tell (rms_norm_eps, rope_theta, rope_scaling, num_experts_per_tok, ...).
    """
    bad = sorted(SHAPE_FIELDS & set(overrides))
    if bad:
        raise ValueError(f"{', '.join(bad)} are read from the weights' shapes, not overridable")
    vocab, hidden = _shape(sd, "model.embed_tokens.weight")
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if not layer_ids or layer_ids != set(range(len(layer_ids))):
        raise CheckpointError(f"layers must be numbered 0..L-1, found {sorted(layer_ids)}")
    qk_norm = "model.layers.0.self_attn.q_norm.weight" in sd
    n_q, n_kv, head_dim = _heads(sd, qk_norm, num_attention_heads, num_key_value_heads)
    mlp = "model.layers.0.mlp"
    use_moe = f"{mlp}.gate.weight" in sd
    moe: dict[str, Any] = {}
    if use_moe:
        n_routed = _shape(sd, f"{mlp}.gate.weight")[0]
        n_shared = len({k.split(".")[5] for k in sd if k.startswith(f"{mlp}.shared_experts.")})
        width = _shape(sd, f"{mlp}.experts.0.gate_proj.weight")[0]
        moe = dict(
            n_routed_experts=n_routed, n_shared_experts=n_shared, moe_intermediate_size=width
        )
    else:
        width = _shape(sd, f"{mlp}.gate_proj.weight")[0]
    head = sd.get("lm_head.weight")
    tied = head is None or torch.equal(head, sd["model.embed_tokens.weight"])
    return ModelConfig(
        hidden_size=hidden,
        num_hidden_layers=len(layer_ids),
        num_attention_heads=n_q,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=width,
        vocab_size=vocab,
        qk_norm=qk_norm,
        tie_word_embeddings=tied,
        use_moe=use_moe,
        **moe,
        **overrides,
    )


def model_from_state_dict(
    sd: dict[str, torch.Tensor],
    source: str,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> MiniMindForCausalLM:
    """Infer the config, build the model and load `sd` strictly (every mismatch is named)."""
    config = infer_config_from_state_dict(sd, num_attention_heads, num_key_value_heads, **overrides)
    model = MiniMindForCausalLM(config)
    load_weights(model, sd, source)
    return model.to(dtype).eval()


def read_pth(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A MiniMind2 `.pth`: a plain state dict, or a resume checkpoint holding one under "model"."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # checkpoints/{weight}_{hidden}_resume.pth (docs/FORMATS.md)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    return obj


def load_minimind2_pth(
    path: str | os.PathLike,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> MiniMindForCausalLM:
    """Load e.g. `out/full_sft_512.pth` (fp16, tied head) into a MiniMindForCausalLM in eval mode.

    Heads default to 8 query heads (MiniMind2), key/value heads then follow from k_proj's shape;
    with q/k norm both are read from shapes. float32 by default: exact for fp16 weights.
    """
    return model_from_state_dict(
        read_pth(path), str(path), num_attention_heads, num_key_value_heads, dtype, **overrides
    )


def save_minimind2_pth(model: MiniMindForCausalLM, path: str | os.PathLike) -> None:
    """Write MiniMind2's format: a plain fp16 state dict with both tied keys, as its scripts save.

    Each tensor is its own fp16 copy (MiniMind saves `{k: v.half()}`), so the file does not
    depend on storage sharing.
    """
    sd = {k: v.detach().to("cpu", torch.float16).clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(sd, f))


# --- MiniMind's command-line naming ----------------------------------------------------------


# MiniMind's defaults of the naming flags; --preset replaces them (see minimind_size).
NAME_DEFAULTS = {"hidden_size": 512, "use_moe": 0}


def minimind_size(args: Any) -> dict[str, int | None]:
    """hidden_size, use_moe and the head counts from MiniMind's flags and --preset (attributes
    of `args`; a missing one counts as not given); None head counts mean "from the weights"
    (MiniMind2's 8 query heads for a .pth). The hidden size and `_moe` name the weights
    (`{weight}_{hidden}[_moe].pth`), the head counts read a `.pth`.

    --preset sets all four; a flag beside it that says otherwise (other than MiniMind's
    default, which the preset replaces) is refused rather than one of them ignored.

    >>> from types import SimpleNamespace
    >>> ns = SimpleNamespace(preset="demo", hidden_size=512, use_moe=0)
    >>> minimind_size(ns)
    {'hidden_size': 192, 'use_moe': 0, 'num_attention_heads': 6, 'num_key_value_heads': 2}
    """
    keys = ("hidden_size", "use_moe", "num_attention_heads", "num_key_value_heads")
    flags = {k: getattr(args, k, None) for k in keys}
    name = getattr(args, "preset", None)
    if not name:
        size = {k: flags[k] if flags[k] is not None else NAME_DEFAULTS.get(k) for k in keys}
        return {k: None if v is None else int(v) for k, v in size.items()}
    config = preset(name)
    size = {k: int(getattr(config, k)) for k in keys}
    wrong = [
        f"--{k} {v} (the preset: {size[k]})"
        for k, v in flags.items()
        if v is not None and int(v) != size[k] and v != NAME_DEFAULTS.get(k)
    ]
    if wrong:
        raise ValueError(f"{'; '.join(wrong)} disagree with --preset {name}")
    return size


# --- MiniMind's LoRA adapter .pth ---------------------------------------------------------------


def read_minimind2_lora(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MiniMind's adapter file (`out/lora/{name}_{hidden}.pth`) -> {module: (A, B)}, A (r, in)
    and B (out, r).

    Its keys are `{module}.lora.A.weight` and `{module}.lora.B.weight`, one pair per adapted
    linear layer, applied unscaled (W + B A). Anything else is an error naming the file.
    """
    sd = read_pth(path)
    pairs = sorted({k.rsplit(".lora.", 1)[0] for k in sd if ".lora." in k})
    if not pairs or len(pairs) * 2 != len(sd):
        raise CheckpointError(f"{path}: not a MiniMind LoRA file ({{module}}.lora.A/B.weight keys)")
    found = {}
    for name in pairs:
        a, b = sd.get(f"{name}.lora.A.weight"), sd.get(f"{name}.lora.B.weight")
        if a is None or b is None:
            raise CheckpointError(f"{path}: {name} has no A/B pair")
        found[name] = (a, b)
    return found


def merge_minimind2_lora(model: MiniMindForCausalLM, path: str | os.PathLike) -> None:
    """W += B A for every module of MiniMind's adapter file (its adapter has no scaling)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in read_minimind2_lora(path).items():
            target = modules.get(name)
            if not isinstance(target, torch.nn.Linear):
                raise CheckpointError(f"{path}: {name} is not a linear layer of the model")
            delta = b.float() @ a.float()  # (out, r) @ (r, in)
            if delta.shape != target.weight.shape:
                raise CheckpointError(
                    f"{path}: {name} adapter is {tuple(delta.shape)}, the layer "
                    f"{tuple(target.weight.shape)}"
                )
            target.weight += delta.to(target.weight)


# --- transformers folders written by MiniMind's own code (model_type "minimind") ---------------


def is_minimind2_folder(path: str | os.PathLike) -> bool:
    """A folder whose config.json says model_type "minimind" or architecture MiniMindForCausalLM.

    Our own checkpoints (minimind.checkpoint) say model_type "minimind" too, but carry a
    format_version, which MiniMind's config never has.
    """
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    data = json.loads(cfg.read_text(encoding="utf-8"))
    minimind = data.get("model_type") == "minimind" or "MiniMindForCausalLM" in (
        data.get("architectures") or []
    )
    return minimind and "format_version" not in data


def read_folder_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """model.safetensors or pytorch_model.bin, single or sharded (an index.json's weight_map)."""
    from safetensors.torch import load_file

    folder = Path(path)

    def read(name: str) -> dict[str, torch.Tensor]:
        file = folder / name
        if name.endswith(".safetensors"):
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)

    for base in ("model.safetensors", "pytorch_model.bin"):
        if (folder / base).is_file():
            return read(base)
        index = folder / f"{base}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read(shard).items()}
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")


def minimind2_rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """YaRN as MiniMind's config class sets it: on iff `inference_rope_scaling`.

    MiniMind writes the dict it used into config.json (its constants changed across versions);
    MiniMind2's has no attention scaling, and ours has none to offer.
    """
    if not cfg.get("inference_rope_scaling"):
        return None
    scaling = dict(cfg.get("rope_scaling") or MINIMIND2_YARN)
    if scaling.pop("attention_factor", 1.0) != 1.0:
        raise CheckpointError(
            f"rope_scaling.attention_factor={cfg['rope_scaling']['attention_factor']}: "
            "YaRN attention scaling is not supported (MiniMind2 uses 1.0)"
        )
    return scaling


def load_minimind2_folder(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> MiniMindForCausalLM:
    """Load a MiniMind2 transformers folder (e.g. MiniMind2-Small) without trust_remote_code.

    Shapes come from the weights; config.json supplies head counts, norms, RoPE and routing,
    and its size fields are cross-checked against the weights.
    """
    folder = Path(path)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    sd = read_folder_weights(folder)
    keep = (
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "dropout",
        "hidden_act",
        "bos_token_id",
        "eos_token_id",
        "num_experts_per_tok",
        "norm_topk_prob",
        "aux_loss_alpha",
        "seq_aux",
    )
    overrides = {k: cfg[k] for k in keep if cfg.get(k) is not None}
    model = model_from_state_dict(
        sd,
        str(folder),
        cfg.get("num_attention_heads"),
        cfg.get("num_key_value_heads"),
        dtype,
        rope_scaling=minimind2_rope_scaling(cfg),
        **overrides,
    )
    checked = ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"]
    if model.config.use_moe:
        checked += ["n_routed_experts", "n_shared_experts"]
    wrong = [
        f"{k}={cfg[k]} but the weights have {getattr(model.config, k)}"
        for k in checked
        if cfg.get(k) is not None and cfg[k] != getattr(model.config, k)
    ]
    if wrong:
        raise CheckpointError(f"{folder}/config.json contradicts its weights: {'; '.join(wrong)}")
    return model
