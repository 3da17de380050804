"""GGUF export: one file that llama.cpp (and Ollama, which runs llama.cpp) loads on its own,
holding the weights, the hyper-parameters, the tokenizer and the chat template.

The only module that imports `gguf` (the llama.cpp project's reader/writer on PyPI), inside the
functions that need it. Ollama's Modelfile is ollama.py's; the command lines are cli.py's.

Which llama.cpp architecture, and why (each computes exactly what ours computes):

  dense                          -> llama       q/k rows permuted (below)
  dense + qk_norm                -> qwen3       RMSNorm on each q/k head before RoPE, as ours;
                                                NEOX RoPE pairs i with i + D/2 like our
                                                rotate_half, so nothing is permuted
  MoE, routed experts only,      -> llama       + router and stacked experts: softmax, top-k,
    top-k > 1 renormalised                      always renormalised (Mixtral's routing)
  MoE with shared experts, or    -> bailingmoe  softmax top-k, renormalised or not as ours
    routing not renormalised                    (expert_weights_norm); shared experts added
    (top-1, norm_topk_prob off)                 unweighted, as ours; q/k permuted as for llama.
                                                Without shared experts one all-zero shared
                                                expert is written (it adds exactly 0)
  MoE + qk_norm, routed only,    -> qwen3moe    (always renormalises, NEOX RoPE)
    top-k > 1 renormalised
  anything else (MoE + qk_norm with shared experts or without renormalising)  refused

Not qwen2moe, transformers' route for shared experts (hf.py): llama.cpp computes its shared-expert
gate sigmoid(g.x) as silu(g.x) / (g.x), which is 0/0 = NaN for the zero gate hf.py writes, and
its router never renormalises the top-k weights, which MiniMind2-MoE does.

Tensor names, ours -> GGUF, with the numpy shape written (that of our torch weight, (out, in);
ggml lists the same dimensions in reverse, e.g. token_embd is {C, V} in llama.cpp's logs):

  model.embed_tokens.weight                      token_embd.weight            (V, C)
  model.norm.weight                              output_norm.weight           (C,)
  lm_head.weight (untied, or arch needs it)      output.weight                (V, C)
  model.layers.{i}.input_layernorm.weight        blk.{i}.attn_norm.weight     (C,)
    self_attn.q_proj.weight                      blk.{i}.attn_q.weight        (H*D, C) permuted
    self_attn.k_proj.weight                      blk.{i}.attn_k.weight        (K*D, C) permuted
    self_attn.v_proj.weight                      blk.{i}.attn_v.weight        (K*D, C)
    self_attn.o_proj.weight                      blk.{i}.attn_output.weight   (C, H*D)
    self_attn.q_norm.weight / k_norm.weight      blk.{i}.attn_q_norm / attn_k_norm.weight (D,)
    post_attention_layernorm.weight              blk.{i}.ffn_norm.weight      (C,)
    mlp.gate_proj / up_proj.weight               blk.{i}.ffn_gate / ffn_up.weight   (I, C)
    mlp.down_proj.weight                         blk.{i}.ffn_down.weight      (C, I)
    mlp.gate.weight (router)                     blk.{i}.ffn_gate_inp.weight  (E, C)
    mlp.experts.{e}.gate_proj / up_proj.weight   blk.{i}.ffn_gate_exps / ffn_up_exps.weight
                                                 (E, I, C), experts stacked in order
    mlp.experts.{e}.down_proj.weight             blk.{i}.ffn_down_exps.weight (E, C, I)
    mlp.shared_experts.{s}.gate_proj / up_proj   blk.{i}.ffn_gate_shexp / ffn_up_shexp.weight
                                                 (S*I, C): n shared SwiGLUs summed are one SwiGLU
                                                 of width S*I (rows concatenated)
    mlp.shared_experts.{s}.down_proj.weight      blk.{i}.ffn_down_shexp.weight (C, S*I), columns
                                                 concatenated

The q/k permutation. Our rotary embedding (transformers' rotate_half layout) rotates, in every
head, the pair of dimensions (i, i + D/2); llama.cpp's "normal" RoPE (llama, bailingmoe)
rotates the adjacent pair (2i, 2i + 1), with the same angle pos * theta^(-2i/D). So the rows of
each head of q_proj and k_proj are reordered, new row 2i + j = old row i + j*D/2 (j = 0, 1):

    W (n*D, C) -> view (n, 2, D/2, C) -> swap axes 1, 2 -> (n, D/2, 2, C) -> reshape (n*D, C)

with n = H for q and n = K for k. llama.cpp then rotates in its layout exactly the values we
rotate in ours, and since q and k are reordered alike, every q.k dot product is unchanged.
unpermute_rotary is the inverse (view (n, D/2, 2, C), swap back). This is the layout llama.cpp's
own converter produces (LlamaModel.permute in convert_hf_to_gguf.py).

Storage (`dtype`): f32, f16 or bf16 for every matrix; q8_0 quantizes each row in blocks of 32
values (one f16 scale per block), falling back to f16 for a matrix whose rows are not a multiple
of 32 long. Norm gains and the MoE router stay f32 in every case (llama.cpp's converter does the
same: they are tiny and routing is sensitive).

RoPE scaling: YaRN is written as rope.scaling.type "yarn" with factor, original_context_length,
yarn_beta_fast/slow, and attn_factor = 1 / (1 + 0.1 ln factor): ggml multiplies the rotated q and
k by (1 + 0.1 ln factor) under YaRN, and MiniMind2 applies no such temperature, so the product
is 1. The frequencies ggml computes (its own clamp of the correction range) are compared with
ours and the export is refused where they differ.

Tokenizer: a byte-level BPE is written as llama.cpp's "gpt2" model: tokens in id order (the
byte-level strings of tokenizer.json), token types (added special tokens CONTROL, other added
tokens USER_DEFINED, ids the tokenizer lacks below the model's vocab_size UNUSED "[PADn]"),
merges as "left right" strings in rank order, bos/eos/pad ids, and the pre-tokenizer "gpt-2":
tokenizer.json's ByteLevel pre-tokenizer with use_regex splits with GPT-2's regex, which is
what llama.cpp's "gpt-2" pre-tokenizer type applies. The chat template (Jinja) is stored as
tokenizer.chat_template.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from minimind.fsutil import AtomicFile
from minimind.model import MiniMindForCausalLM, ModelConfig
from minimind.model.layers import rope_inv_freq
from minimind.tokenizer import load_tokenizer
from minimind.tokenizer.chat import CHAT_TEMPLATE

from .hf import ConversionError

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
# Architectures whose RoPE pairs adjacent dimensions (llama.cpp's LLAMA_ROPE_TYPE_NORM).
NORM_ROPE_ARCHS = ("llama", "bailingmoe")
# Architectures whose loader requires output.weight even when the head is tied.
OUTPUT_REQUIRED_ARCHS = ("bailingmoe",)
PRE_TOKENIZER = "gpt-2"
Q8_BLOCK = 32


def _normalises_top_k(config: ModelConfig) -> bool:
    # MiniMind2 renormalises the chosen weights only when it chooses more than one expert.
    return config.norm_topk_prob and config.num_experts_per_tok > 1


def gguf_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture that computes exactly what `config` computes (module doc).

    >>> from minimind.model import preset
    >>> [gguf_architecture(preset(n)) for n in ("minimind2-small", "minimind2-moe")]
    ['llama', 'bailingmoe']
    >>> gguf_architecture(preset("tiny", qk_norm=True))
    'qwen3'
    """
    if not config.use_moe:
        return "qwen3" if config.qk_norm else "llama"
    if not config.qk_norm:
        if config.n_shared_experts == 0 and _normalises_top_k(config):
            return "llama"
        return "bailingmoe"
    if config.n_shared_experts:
        raise ConversionError(
            "MoE with q/k norm AND shared experts: llama.cpp's qwen3moe (q/k norm) has no shared "
            "expert, and its architectures with shared experts have no q/k norm before RoPE"
        )
    if not _normalises_top_k(config):
        raise ConversionError(
            "MoE with q/k norm and top-k weights not renormalised (top-1, or norm_topk_prob "
            "off): llama.cpp's qwen3moe always renormalises the chosen experts' weights"
        )
    return "qwen3moe"


# --- the q/k permutation --------------------------------------------------------------------


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from rotate_half order (i, i + D/2) to adjacent pairs (2i, 2i + 1).

    >>> permute_rotary(torch.arange(8.0)[:, None], 2).flatten().tolist()
    [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    """
    rows, *rest = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *rest).transpose(1, 2).reshape(w.shape)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_rotary: adjacent pairs back to rotate_half order."""
    rows, *rest = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *rest).transpose(1, 2).reshape(w.shape)


# --- RoPE scaling ----------------------------------------------------------------------------


def ggml_yarn_inv_freq(config: ModelConfig) -> torch.Tensor:
    """The YaRN inverse frequencies as ggml computes them (its correction range is clamped to
    [0, D - 1], ours to [0, D/2 - 1]); equal to ours whenever the range fits in D/2 - 1."""
    s, d, theta = config.rope_scaling, config.head_dim, config.rope_theta

    def corr_dim(n_rot: float) -> float:
        return (
            d
            * math.log(s["original_max_position_embeddings"] / (n_rot * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low = max(0, math.floor(corr_dim(s["beta_fast"])))
    high = min(d - 1, math.ceil(corr_dim(s["beta_slow"])))
    i = torch.arange(d // 2, dtype=torch.float64)
    base = 1.0 / theta ** (2 * i / d)
    keep = 1 - ((i - low) / max(0.001, high - low)).clamp(0, 1)  # 1: keep the frequency
    return (base / s["factor"] * (1 - keep) + base * keep).float()


def _check_rope(config: ModelConfig) -> None:
    if config.rope_scaling is None:
        return
    ours = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    theirs = ggml_yarn_inv_freq(config)
    if not torch.allclose(ours, theirs, rtol=1e-5, atol=0):
        raise ConversionError(
            f"YaRN frequencies differ (ours {ours.tolist()}, llama.cpp's {theirs.tolist()}): "
            "llama.cpp clamps the correction range at head_dim - 1, ours at head_dim/2 - 1"
        )


# --- tensors ---------------------------------------------------------------------------------


def gguf_tensors(model: MiniMindForCausalLM, arch: str | None = None) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> float32 tensor in the layout llama.cpp reads (module doc)."""
    cfg = model.config
    arch = arch or gguf_architecture(cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    permute = arch in NORM_ROPE_ARCHS
    out = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    out["output_norm.weight"] = sd["model.norm.weight"]
    if not cfg.tie_word_embeddings or arch in OUTPUT_REQUIRED_ARCHS:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if permute:
            q = permute_rotary(q, cfg.num_attention_heads)
            k = permute_rotary(k, cfg.num_key_value_heads)
        out[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[b + "attn_q.weight"] = q
        out[b + "attn_k.weight"] = k
        out[b + "attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[b + "attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        if cfg.qk_norm:
            out[b + "attn_q_norm.weight"] = sd[p + "self_attn.q_norm.weight"]
            out[b + "attn_k_norm.weight"] = sd[p + "self_attn.k_norm.weight"]
        out[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if not cfg.use_moe:
            for w in ("gate", "up", "down"):
                out[b + f"ffn_{w}.weight"] = sd[p + f"mlp.{w}_proj.weight"]
            continue
        out[b + "ffn_gate_inp.weight"] = sd[p + "mlp.gate.weight"]  # (E, C)
        for w in ("gate", "up", "down"):
            experts = [
                sd[p + f"mlp.experts.{e}.{w}_proj.weight"] for e in range(cfg.n_routed_experts)
            ]
            out[b + f"ffn_{w}_exps.weight"] = torch.stack(experts)  # (E, I, C) or (E, C, I)
        if arch == "bailingmoe":
            out.update(_shared_expert(sd, p, b, cfg))
    return out


def _shared_expert(sd: dict, p: str, b: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The shared experts as one SwiGLU of width S*I; one zero expert of width I when S = 0."""
    c, width = cfg.hidden_size, cfg.moe_intermediate_size
    shared = range(cfg.n_shared_experts)
    gate = [sd[p + f"mlp.shared_experts.{s}.gate_proj.weight"] for s in shared]
    up = [sd[p + f"mlp.shared_experts.{s}.up_proj.weight"] for s in shared]
    down = [sd[p + f"mlp.shared_experts.{s}.down_proj.weight"] for s in shared]
    if not gate:  # silu(0) * 0 = 0, and down(0) = 0: adds exactly nothing
        gate, up, down = [torch.zeros(width, c)], [torch.zeros(width, c)], [torch.zeros(c, width)]
    return {
        b + "ffn_gate_shexp.weight": torch.cat(gate),  # (S*I, C)
        b + "ffn_up_shexp.weight": torch.cat(up),  # (S*I, C)
        b + "ffn_down_shexp.weight": torch.cat(down, dim=1),  # (C, S*I)
    }


def _stays_f32(name: str, t: torch.Tensor) -> bool:
    return t.ndim == 1 or name.endswith("ffn_gate_inp.weight")


def encode_tensor(name: str, t: torch.Tensor, dtype: str):
    """-> (numpy array to write, GGMLQuantizationType) for one float32 tensor."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    a = t.contiguous().numpy()
    if dtype == "f32" or _stays_f32(name, t):
        return a, Q.F32
    if dtype == "q8_0" and a.shape[-1] % Q8_BLOCK == 0:
        return quants.quantize(a, Q.Q8_0), Q.Q8_0
    if dtype == "bf16":
        return quants.quantize(a, Q.BF16), Q.BF16
    return a.astype("float16"), Q.F16  # f16, and q8_0's fallback


# --- tokenizer -------------------------------------------------------------------------------


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int
    chat_template: str


def _check_pre_tokenizer(data: dict) -> None:
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    byte_level = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    if not byte_level or pre.get("add_prefix_space") or data.get("normalizer"):
        raise ConversionError(
            f"tokenizer pre-tokenizer {pre} / normalizer {data.get('normalizer')}: only a "
            "ByteLevel pre-tokenizer with GPT-2's regex, no prefix space and no normalizer maps "
            "to a llama.cpp pre-tokenizer (gpt-2) exactly"
        )
    if data["model"].get("type") != "BPE":
        raise ConversionError(f"tokenizer model {data['model'].get('type')!r}: only BPE")


def gguf_vocab(tokenizer_dir: str | os.PathLike, vocab_size: int) -> GGUFVocab:
    """The tokenizer of `tokenizer_dir` as llama.cpp's gpt2 BPE (module doc), padded to the
    model's vocab_size; refused when the tokenizer has ids the model has no embedding for."""
    from gguf import TokenType

    tok = load_tokenizer(tokenizer_dir)
    data = json.loads(tok.backend.to_str())
    _check_pre_tokenizer(data)
    vocab = tok.backend.get_vocab(with_added_tokens=True)  # text -> id
    if max(vocab.values()) >= vocab_size:
        raise ConversionError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
            f"{vocab_size}: llama.cpp needs an embedding row for every token"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    for entry in data["added_tokens"]:
        special = entry["special"]
        types[entry["id"]] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    merges = []
    for m in data["model"]["merges"]:
        left, right = m.split(" ") if isinstance(m, str) else m
        if " " in left or " " in right:
            raise ConversionError(f"merge {m!r} contains a space: not expressible in GGUF")
        merges.append(f"{left} {right}")
    return GGUFVocab(
        tokens=tokens,
        token_types=types,
        merges=merges,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        chat_template=tok.chat_template or CHAT_TEMPLATE,
    )


# --- the file --------------------------------------------------------------------------------


def _write_hparams(w, cfg: ModelConfig, arch: str) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if not cfg.use_moe:
        w.add_feed_forward_length(cfg.intermediate_size)
    else:
        w.add_feed_forward_length(cfg.moe_intermediate_size)  # llama reads the expert width here
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "bailingmoe":
        w.add_expert_shared_count(max(cfg.n_shared_experts, 1))  # 1: the zero expert
        w.add_expert_weights_norm(_normalises_top_k(cfg))
        w.add_expert_weights_scale(1.0)
        w.add_leading_dense_block_count(0)
    if cfg.rope_scaling is not None:
        from gguf import RopeScalingType

        s = cfg.rope_scaling
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(s["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
        # written by key: gguf < 0.18 has no helper for these two
        w.add_float32(f"{arch}.rope.scaling.yarn_beta_fast", float(s["beta_fast"]))
        w.add_float32(f"{arch}.rope.scaling.yarn_beta_slow", float(s["beta_slow"]))
        # cancels ggml's YaRN magnitude factor (1 + 0.1 ln factor): MiniMind2 has none
        w.add_rope_scaling_attn_factors(1.0 / (1.0 + 0.1 * math.log(s["factor"])))


def _write_vocab(w, v: GGUFVocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(v.tokens)
    w.add_token_types(v.token_types)
    w.add_token_merges(v.merges)
    w.add_bos_token_id(v.bos_id)
    w.add_eos_token_id(v.eos_id)
    w.add_pad_token_id(v.pad_id)
    w.add_add_bos_token(False)  # the chat template writes <|im_start|> itself
    w.add_add_eos_token(False)
    w.add_chat_template(v.chat_template)


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def export_gguf(
    model: MiniMindForCausalLM,
    path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None,
    dtype: str = "f16",
    name: str = "MiniMind",
) -> str:
    """Write `path` (a .gguf file) for llama.cpp; returns the llama.cpp architecture name.

    Everything that can be refused (architecture, YaRN range, tokenizer) is checked before
    anything is written; the file appears whole or not at all (fsutil.AtomicFile).
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ConversionError(f"GGUF dtype {dtype!r}: choose one of {', '.join(GGUF_DTYPES)}")
    if tokenizer_dir is None:
        raise ConversionError("a GGUF file needs the tokenizer: give its folder (--tokenizer)")
    cfg = model.config
    arch = gguf_architecture(cfg)
    _check_rope(cfg)
    vocab = gguf_vocab(tokenizer_dir, cfg.vocab_size)
    tensors = gguf_tensors(model, arch)
    with AtomicFile(path) as out:  # whole or not at all: temp file, fsync, rename
        w = gguf.GGUFWriter(out.tmp, arch)
        w.add_name(name)
        w.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[dtype])))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_hparams(w, cfg, arch)
        _write_vocab(w, vocab)
        for tname, t in tensors.items():
            data, qtype = encode_tensor(tname, t, dtype)
            w.add_tensor(tname, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return arch
