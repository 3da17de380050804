"""Native transformers folders: export a MiniMind model so `AutoModelForCausalLM.from_pretrained`
loads it without trust_remote_code, and import such folders back.

Which architecture, and why (each choice is checked by the parity tests, fp32, max |diff| 1e-4):

  dense                         -> LlamaForCausalLM   same blocks, names and rotate_half RoPE
  dense + qk_norm               -> Qwen3ForCausalLM   Llama plus RMSNorm on each q/k head
                                                      before RoPE, exactly as ours
  MoE, no shared experts,       -> MixtralForCausalLM fp32 softmax router, top-k, renormalised
    renormalised top-k (k > 1)                        over the chosen k: MiniMind2's routing
  MoE with shared experts, or   -> Qwen2MoeForCausalLM
    routing without renormalising
  MoE + qk_norm, no shared      -> Qwen3MoeForCausalLM
  MoE + qk_norm + shared        refused: no transformers architecture has both

Qwen2-MoE's shared expert is ONE SwiGLU whose output is multiplied by
sigmoid(shared_expert_gate(x)). MiniMind2's n shared experts, summed unweighted, are one SwiGLU
of width n*I whose gate/up rows and down columns are the experts' concatenated. The gate weight is
written as zeros, so sigmoid(0) = 0.5 exactly, and the shared down_proj is written times 2
(exact in floating point: a power of two), so 0.5 * (2 W) h = W h bit for bit. Its q/k/v biases
are switched off (qkv_bias=False), as are sliding windows; every layer is sparse
(decoder_sparse_step=1, mlp_only_layers=[]). Its router normalises top-k only when
norm_topk_prob is set, which we set to MiniMind's effective behaviour: MiniMind2 renormalises
only when k > 1 (a top-1 weight stays the raw probability), while Mixtral always renormalises,
so Mixtral is chosen only for k > 1 with norm_topk_prob. Without shared experts Qwen2-MoE gets a
zero-width shared expert, which adds exactly zero.

RoPE: transformers 5 writes `rope_parameters`. YaRN is carried as rope_type "yarn" with factor,
original_max_position_embeddings, beta_fast, beta_slow, attention_factor=1.0 (MiniMind2 has no
attention temperature) and truncate=True (MiniMind2 floors/ceils the correction range). Both
ways, the rotary inverse frequencies transformers computes are compared with ours and the
conversion is refused if they differ (e.g. where the two clamp the correction range
differently), so a folder never silently rotates differently.

transformers 5 stores MoE experts as fused 3D tensors at run time (`experts.gate_up_proj`
(E, 2I, C) with gate rows first, `experts.down_proj` (E, C, I)) and un-fuses them on disk; we
map to the HF model's run-time state dict, read from a real instance, and let transformers
choose the file layout. Import goes through `from_pretrained` for the same reason.

MiniMind2's own folders (model_type "minimind") are read by minimind2.py, not through here.
transformers is imported inside the functions that need it, so the rest of minimind.convert
works without it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from minimind.checkpoint import load_weights
from minimind.model import MiniMindForCausalLM, ModelConfig
from minimind.model.layers import rope_inv_freq

from .minimind2 import is_minimind2_folder, load_minimind2_folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The last two: the attribution and license of MiniMind2's shipped tokenizer travel with it.
OPTIONAL_TOKENIZER_FILES = (
    "special_tokens_map.json",
    "chat_template.jinja",
    "TOKENIZER_NOTICE",
    "LICENSE-APACHE-2.0",
)
SUPPORTED_MODEL_TYPES = ("llama", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")


class ConversionError(ValueError):
    """A model that the target format cannot express exactly; the message says why."""


def _transformers():
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ConversionError(
            f"minimind.convert needs transformers>=5 (rope_parameters, fused experts); "
            f"found {transformers.__version__}"
        )
    return transformers


def _normalises_top_k(config: ModelConfig) -> bool:
    # MiniMind2 renormalises the chosen weights only when it chooses more than one expert.
    return config.norm_topk_prob and config.num_experts_per_tok > 1


def hf_architecture(config: ModelConfig) -> str:
    """The transformers class that computes exactly what `config` computes (see module doc).

    >>> from minimind.model import preset
    >>> [hf_architecture(preset(n)) for n in ("minimind2-small", "minimind2-moe")]
    ['LlamaForCausalLM', 'Qwen2MoeForCausalLM']
    >>> hf_architecture(preset("tiny", use_moe=True, n_shared_experts=0))
    'MixtralForCausalLM'
    """
    if not config.use_moe:
        return "Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM"
    if config.qk_norm:
        if config.n_shared_experts:
            raise ConversionError(
                "MoE with q/k norm AND shared experts: no transformers architecture has both "
                "(Qwen3-MoE has q/k norm but no shared expert, Qwen2-MoE the reverse)"
            )
        return "Qwen3MoeForCausalLM"
    if config.n_shared_experts or not _normalises_top_k(config):
        return "Qwen2MoeForCausalLM"
    return "MixtralForCausalLM"


def _rope_parameters(config: ModelConfig) -> dict[str, Any]:
    if config.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    s = config.rope_scaling
    return {
        "rope_type": "yarn",
        "rope_theta": config.rope_theta,
        "factor": float(s["factor"]),
        "original_max_position_embeddings": int(s["original_max_position_embeddings"]),
        "beta_fast": float(s["beta_fast"]),
        "beta_slow": float(s["beta_slow"]),
        "attention_factor": 1.0,
        "truncate": True,
    }


def hf_config(config: ModelConfig):
    """The transformers config (LlamaConfig, Qwen3Config, ...) equivalent to `config`."""
    tf = _transformers()
    arch = hf_architecture(config)
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        initializer_range=config.initializer_range,
        attention_dropout=config.dropout,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        rope_parameters=_rope_parameters(config),
    )
    moe = dict(
        num_experts_per_tok=config.num_experts_per_tok,
        router_aux_loss_coef=config.aux_loss_alpha,
        intermediate_size=config.moe_intermediate_size,
    )
    qwen_moe = dict(
        **moe,
        num_experts=config.n_routed_experts,
        moe_intermediate_size=config.moe_intermediate_size,
        norm_topk_prob=_normalises_top_k(config),
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
    )
    if arch == "LlamaForCausalLM":
        cfg = tf.LlamaConfig(
            **common,
            intermediate_size=config.intermediate_size,
            attention_bias=False,
            mlp_bias=False,
        )
    elif arch == "Qwen3ForCausalLM":
        cfg = tf.Qwen3Config(
            **common,
            intermediate_size=config.intermediate_size,
            attention_bias=False,
            use_sliding_window=False,
        )
    elif arch == "MixtralForCausalLM":
        cfg = tf.MixtralConfig(
            **common, **moe, num_local_experts=config.n_routed_experts, sliding_window=None
        )
    elif arch == "Qwen2MoeForCausalLM":
        cfg = tf.Qwen2MoeConfig(
            **common,
            **qwen_moe,
            shared_expert_intermediate_size=config.n_shared_experts * config.moe_intermediate_size,
            qkv_bias=False,
        )
    else:
        cfg = tf.Qwen3MoeConfig(**common, **qwen_moe, attention_bias=False)
    cfg.architectures = [arch]
    return cfg


def config_from_hf(hf_cfg) -> ModelConfig:
    """Map a Llama/Qwen3/Mixtral/Qwen2-MoE/Qwen3-MoE config back; refuse what we cannot compute."""
    mt = hf_cfg.model_type
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"model_type {mt!r} is not importable; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    why = []
    if getattr(hf_cfg, "use_sliding_window", False) or (mt == "mixtral" and hf_cfg.sliding_window):
        why.append("sliding-window attention")
    moe: dict[str, Any] = {}
    if mt in ("mixtral", "qwen2_moe", "qwen3_moe"):
        top_k = hf_cfg.num_experts_per_tok
        normalises = mt == "mixtral" or hf_cfg.norm_topk_prob
        if top_k == 1 and normalises:
            why.append("top-1 routing with a renormalised weight of 1 (ours keeps the probability)")
        if mt != "mixtral" and (hf_cfg.mlp_only_layers or hf_cfg.decoder_sparse_step != 1):
            why.append("dense layers between MoE layers (mlp_only_layers/decoder_sparse_step)")
        width = hf_cfg.intermediate_size if mt == "mixtral" else hf_cfg.moe_intermediate_size
        shared = getattr(hf_cfg, "shared_expert_intermediate_size", 0)
        if shared % width:
            why.append(
                f"shared expert width {shared} is not a multiple of the expert width {width}"
            )
        moe = dict(
            use_moe=True,
            n_routed_experts=hf_cfg.num_local_experts if mt == "mixtral" else hf_cfg.num_experts,
            n_shared_experts=shared // width,
            num_experts_per_tok=top_k,
            norm_topk_prob=normalises or top_k == 1,  # no effect on our top-1: keep default
            aux_loss_alpha=hf_cfg.router_aux_loss_coef,
            moe_intermediate_size=width,
        )
    rope = dict(hf_cfg.rope_parameters)
    scaling = None
    if rope["rope_type"] == "yarn":
        if rope.get("attention_factor") != 1.0 or rope.get("mscale") or rope.get("mscale_all_dim"):
            why.append("YaRN attention scaling (attention_factor must be 1.0)")
        if not rope.get("truncate", True):
            why.append("YaRN with truncate=False (MiniMind2 floors/ceils the correction range)")
        scaling = {
            "type": "yarn",
            "factor": rope["factor"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta_fast": rope.get("beta_fast") or 32.0,
            "beta_slow": rope.get("beta_slow") or 1.0,
        }
    elif rope["rope_type"] != "default":
        why.append(f"rope_type {rope['rope_type']!r} (only default and yarn)")
    if why:
        raise ConversionError(f"cannot import this {mt} model: {'; '.join(why)}")
    eos = hf_cfg.eos_token_id
    special = dict(
        bos_token_id=hf_cfg.bos_token_id,
        eos_token_id=eos[0] if isinstance(eos, list) else eos,  # ours stops on one id
        pad_token_id=hf_cfg.pad_token_id,
    )
    return ModelConfig(
        hidden_size=hf_cfg.hidden_size,
        num_hidden_layers=hf_cfg.num_hidden_layers,
        num_attention_heads=hf_cfg.num_attention_heads,
        num_key_value_heads=hf_cfg.num_key_value_heads,
        head_dim=getattr(hf_cfg, "head_dim", None)
        or hf_cfg.hidden_size // hf_cfg.num_attention_heads,
        intermediate_size=hf_cfg.intermediate_size,
        vocab_size=hf_cfg.vocab_size,
        rms_norm_eps=hf_cfg.rms_norm_eps,
        rope_theta=rope["rope_theta"],
        max_position_embeddings=hf_cfg.max_position_embeddings,
        dropout=float(hf_cfg.attention_dropout),
        tie_word_embeddings=hf_cfg.tie_word_embeddings,
        hidden_act=hf_cfg.hidden_act,
        initializer_range=hf_cfg.initializer_range,
        qk_norm=mt in ("qwen3", "qwen3_moe"),
        rope_scaling=scaling,
        **{k: v for k, v in special.items() if v is not None},
        **moe,
    )


def check_rotary(hf_model, config: ModelConfig) -> None:
    """Refuse unless transformers' rotary frequencies and scaling are ours (float32 rounding aside)."""
    rotary = hf_model.model.rotary_emb
    ours = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    theirs = rotary.inv_freq.detach().float().cpu()
    if rotary.attention_scaling != 1.0:
        raise ConversionError(
            f"transformers scales cos/sin by {rotary.attention_scaling}, ours 1.0"
        )
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-5, atol=0):
        raise ConversionError(
            f"rotary frequencies differ (ours {ours.tolist()}, transformers {theirs.tolist()}); "
            "the YaRN correction range is clamped differently for this head_dim/theta/context"
        )


def _moe_layers(config: ModelConfig):
    return (
        [f"model.layers.{i}.mlp" for i in range(config.num_hidden_layers)] if config.use_moe else []
    )


def to_hf_state_dict(
    model: MiniMindForCausalLM, hf_keys: Collection[str]
) -> dict[str, torch.Tensor]:
    """Our state dict renamed/fused into the run-time layout of a real HF instance (its keys)."""
    cfg = model.config
    sd = dict(model.state_dict())
    for p in _moe_layers(cfg):
        if f"{p}.experts.gate_up_proj" in hf_keys:
            experts = range(cfg.n_routed_experts)
            gate, up, down = (
                [sd.pop(f"{p}.experts.{e}.{w}_proj.weight") for e in experts]
                for w in ("gate", "up", "down")
            )
            sd[f"{p}.experts.gate_up_proj"] = torch.stack(
                [torch.cat([g, u]) for g, u in zip(gate, up)]
            )  # (E, 2I, C): gate rows, then up rows (transformers chunks the output in two)
            sd[f"{p}.experts.down_proj"] = torch.stack(down)  # (E, C, I)
        shared = range(cfg.n_shared_experts)
        if f"{p}.shared_expert_gate.weight" in hf_keys:
            gate, up, down = (
                [sd.pop(f"{p}.shared_experts.{s}.{w}_proj.weight") for s in shared]
                for w in ("gate", "up", "down")
            )
            c = cfg.hidden_size
            ref = model.model.embed_tokens.weight
            # n experts summed == one SwiGLU of width n*I; empty when n = 0 (adds exactly zero).
            sd[f"{p}.shared_expert.gate_proj.weight"] = torch.cat([*gate, ref.new_zeros(0, c)])
            sd[f"{p}.shared_expert.up_proj.weight"] = torch.cat([*up, ref.new_zeros(0, c)])
            sd[f"{p}.shared_expert.down_proj.weight"] = (
                torch.cat([*down, ref.new_zeros(c, 0)], dim=1) * 2
            )  # times sigmoid(0) = 0.5 below: exact
            sd[f"{p}.shared_expert_gate.weight"] = ref.new_zeros(1, c)
    return sd


def from_hf_state_dict(
    hf_sd: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """The inverse of to_hf_state_dict; zero biases are dropped, anything else is refused."""
    sd = dict(hf_sd)
    for k in [k for k in sd if k.endswith(".bias")]:
        if torch.count_nonzero(sd.pop(k)):
            raise ConversionError(f"{k} is not zero: MiniMind has no biases")
    for p in _moe_layers(config):
        if f"{p}.experts.gate_up_proj" in sd:
            gate, up = sd.pop(f"{p}.experts.gate_up_proj").chunk(2, dim=1)  # (E, I, C) each
            down = sd.pop(f"{p}.experts.down_proj")  # (E, C, I)
            for e in range(config.n_routed_experts):
                sd[f"{p}.experts.{e}.gate_proj.weight"] = gate[e]
                sd[f"{p}.experts.{e}.up_proj.weight"] = up[e]
                sd[f"{p}.experts.{e}.down_proj.weight"] = down[e]
        gate_key = f"{p}.shared_expert_gate.weight"
        if gate_key in sd:
            if torch.count_nonzero(sd.pop(gate_key)):
                raise ConversionError(
                    f"{gate_key} is not zero: a learned sigmoid gate on the shared expert has "
                    "no MiniMind equivalent (MiniMind adds shared experts unweighted)"
                )
            gate, up, down = (
                sd.pop(f"{p}.shared_expert.{w}_proj.weight") for w in ("gate", "up", "down")
            )
            width = config.moe_intermediate_size
            for s in range(config.n_shared_experts):  # rows/columns [s*I, (s+1)*I)
                part = slice(s * width, (s + 1) * width)
                sd[f"{p}.shared_experts.{s}.gate_proj.weight"] = gate[part]
                sd[f"{p}.shared_experts.{s}.up_proj.weight"] = up[part]
                sd[f"{p}.shared_experts.{s}.down_proj.weight"] = down[:, part] / 2
    return sd


def model_from_hf(hf_model, dtype: torch.dtype = torch.float32) -> MiniMindForCausalLM:
    """A MiniMindForCausalLM computing what the (already loaded) transformers model computes."""
    config = config_from_hf(hf_model.config)
    check_rotary(hf_model, config)
    model = MiniMindForCausalLM(config)
    load_weights(model, from_hf_state_dict(hf_model.state_dict(), config), type(hf_model).__name__)
    return model.to(dtype).eval()


def load_hf_folder(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> MiniMindForCausalLM:
    """Load a transformers folder: MiniMind2's own (model_type "minimind", read without
    transformers) or a Llama/Qwen3/Mixtral/Qwen2-MoE/Qwen3-MoE one (through from_pretrained)."""
    if is_minimind2_folder(path):
        return load_minimind2_folder(path, dtype)
    tf = _transformers()
    hf_model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model_from_hf(hf_model, dtype)


def to_hf_model(model: MiniMindForCausalLM, dtype: torch.dtype | None = None):
    """An in-memory transformers model with our weights (the dtype of ours unless given)."""
    tf = _transformers()
    cfg = hf_config(model.config)
    hf_model = tf.AutoModelForCausalLM.from_config(cfg)  # random init, overwritten below
    check_rotary(hf_model, model.config)
    hf_model.load_state_dict(to_hf_state_dict(model, hf_model.state_dict().keys()), strict=True)
    hf_model.generation_config = tf.GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    return hf_model.to(dtype or next(model.parameters()).dtype).eval()


def export_hf_folder(
    model: MiniMindForCausalLM,
    path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Write a folder loadable by `AutoModelForCausalLM.from_pretrained(path)` (no remote code):
    config.json, model.safetensors, generation_config.json (bos/eos/pad) and, from
    `tokenizer_dir`, the tokenizer files. Returns the architecture name.

    Everything that can be refused is checked before the first file is written.
    """
    tokenizer_files = [] if tokenizer_dir is None else tokenizer_file_list(tokenizer_dir)
    hf_model = to_hf_model(model, dtype)
    out = Path(path)
    hf_model.save_pretrained(out)
    for file in tokenizer_files:
        shutil.copyfile(file, out / file.name)
    return hf_model.config.architectures[0]


def tokenizer_file_list(folder: str | os.PathLike) -> list[Path]:
    """The tokenizer files of `folder` that an exported folder carries (the first two required)."""
    folder = Path(folder)
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer folder {folder}: no {', '.join(missing)}")
    names = TOKENIZER_FILES + OPTIONAL_TOKENIZER_FILES
    return [folder / name for name in names if (folder / name).is_file()]
