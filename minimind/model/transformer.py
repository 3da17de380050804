"""The MiniMind decoder: embeddings, pre-norm blocks, final norm, tied head.

Parameter names equal MiniMind2's (and Llama's in transformers): `model.embed_tokens`,
`model.layers.{i}.self_attn.{q,k,v,o}_proj`, `...input_layernorm`, `...mlp.{gate,up,down}_proj`
(or `mlp.gate` / `mlp.experts.{e}` / `mlp.shared_experts.{s}`), `model.norm`, `lm_head`, so
MiniMind2 state dicts load without renaming. Training infrastructure (precision, compile,
parallelism) is applied from outside; this file holds only the architecture.

forward(input_ids, attention_mask=None, cache=None) -> CausalLMOutput(logits, aux_loss, hidden)
  input_ids (B, T); attention_mask (B, T), 1 = real token, 0 = left padding, for the NEW tokens
  only (the cache remembers earlier ones); positions count real tokens, so a left-padded row
  gives the same logits as the same row unpadded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import KVCache, LayerCache, StaticKVCache
from .config import ModelConfig
from .layers import Attention, InputGroup, RMSNorm, RotaryEmbedding, SwiGLU, apply_linear
from .moe import MoEFeedForward


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T or logits_to_keep, V)
    aux_loss: torch.Tensor  # scalar: summed MoE balance loss (0 for dense models)
    hidden_states: torch.Tensor  # (B, T, C) after the final norm


class Block(nn.Module):
    """x + attn(norm(x)); then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (
            MoEFeedForward(config)
            if config.use_moe
            else SwiGLU(config.hidden_size, config.intermediate_size, config.dropout)
        )

    def forward(self, x, cos, sin, mask, cache: LayerCache | None = None, trusted: bool = False):
        """trusted: the fused projections were just validated (layers.InputGroup.project)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, trusted)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEFeedForward):
            y, aux = self.mlp(h)
        else:
            y, aux = self.mlp(h, trusted), x.new_zeros((), dtype=torch.float32)
        return x + y, aux


class MiniMindModel(nn.Module):
    """The trunk: token ids -> final hidden states."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def _positions_and_mask(self, input_ids, attention_mask, cache):
        """-> cos, sin (B|1, T, D) and an attention mask (B, 1, T, S) bool, or None for causal."""
        b, t = input_ids.shape
        device = input_ids.device
        padded = attention_mask is not None and not bool(attention_mask.all())
        if cache is None and not padded:
            cos, sin = self.rotary.table(t, device)
            return cos, sin, None
        new = (
            torch.ones(b, t, dtype=torch.bool, device=device)
            if attention_mask is None
            else attention_mask.bool()
        )
        if cache is None:
            positions = (new.long().cumsum(1) - 1).clamp_(min=0)
            key_valid, start = new, 0
        else:
            start = cache.length
            positions, key_valid = cache.reserve(new)
        cos, sin = self.rotary(positions)
        if cache is not None and not cache.has_padding and (start == 0 or t == 1):
            return cos, sin, None
        q_idx = torch.arange(t, device=device)[:, None] + start
        k_idx = torch.arange(key_valid.shape[1], device=device)[None, :]
        # A padding query sees no real key; letting it see itself avoids an all-masked row (NaN).
        mask = ((k_idx <= q_idx) & key_valid[:, None, None, :]) | (k_idx == q_idx)
        return cos, sin, mask  # (B, 1, T, S)

    def _blocks(
        self, x, cos, sin, mask, layer_caches, trusted: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) through every block -> (x, summed aux loss)."""
        aux = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            layer_cache = None if layer_caches is None else layer_caches[i]
            if self.gradient_checkpointing and self.training and layer_caches is None:
                x, a = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x, a = layer(x, cos, sin, mask, layer_cache, trusted)
            aux = aux + a
        return x, aux

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None):
        cos, sin, mask = self._positions_and_mask(input_ids, attention_mask, cache)
        x = self.dropout(self.embed_tokens(input_ids))
        x, aux = self._blocks(x, cos, sin, mask, None if cache is None else cache.layers)
        if cache is not None:
            cache.advance(
                torch.ones_like(input_ids, dtype=torch.bool)
                if attention_mask is None
                else attention_mask.bool()
            )
        return self.norm(x), aux

    def decode_static(self, input_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """One fixed-shape decode step: input_ids (B, 1) -> final hidden (B, 1, C).

        Reads and writes only tensors (no python int that changes, no host sync), so a
        compiled copy is captured once; the rotary table must already cover `cache.max_len`,
        and the projections must be fused (both done by MiniMindForCausalLM.new_cache).
        """
        positions, mask = cache.step_reserve()  # (B, 1), (B, 1, 1, max_len)
        cos, sin = self.rotary.lookup(positions)
        x, _ = self._blocks(
            self.embed_tokens(input_ids), cos, sin, mask, cache.slot_layers, trusted=True
        )
        cache.step_advance()
        return self.norm(x)

    def verify_static(
        self, input_ids: torch.Tensor, mask: torch.Tensor, cache: StaticKVCache
    ) -> torch.Tensor:
        """A fixed-shape block step: input_ids (B, T), mask (B, T) bool (left padding) ->
        final hidden (B, T, C); T keys/values written at the cache's device slot (see
        StaticKVCache.block_reserve). Same preconditions as decode_static."""
        positions, attend, layers = cache.block_reserve(mask)
        cos, sin = self.rotary.lookup(positions)
        x, _ = self._blocks(self.embed_tokens(input_ids), cos, sin, attend, layers, trusted=True)
        cache.block_advance(mask)
        return self.norm(x)


class MiniMindForCausalLM(nn.Module):
    """Trunk plus language-model head (tied to the embedding by default)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, 0.02) everywhere; residual output projections (o_proj, down_proj) get
        std / sqrt(2 * layers) so the residual stream's variance does not grow with depth
        (GPT-2, Radford et al. 2019, sec. 2.3)."""
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        logits_at: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """logits_to_keep > 0 computes logits for the last k positions only (decoding).
        logits_at (N,) long: logits only at these positions of the flattened (B*T) sequence,
        returned as (N, V) (training on the labelled positions only: SFT labels 15-25% of them,
        and the head is the largest single matmul)."""
        hidden, aux = self.model(input_ids, attention_mask, cache)
        if logits_at is not None:
            h = hidden.flatten(0, 1).index_select(0, logits_at)
        else:
            h = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return CausalLMOutput(apply_linear(self.lm_head, h), aux, hidden)

    def decode_step(self, input_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """input_ids (B, 1) -> next-token logits (B, V), with fixed shapes (see decode_static).
        The caller then calls `cache.advance_host()`; minimind.infer.steps wraps both."""
        return apply_linear(self.lm_head, self.model.decode_static(input_ids, cache)[:, -1])

    def verify_step(
        self, input_ids: torch.Tensor, cache: StaticKVCache, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) of every column, with fixed shapes for a fixed T
        (speculative decoding's verification of [last, d_1..d_k], compiled once per k); mask
        (B, T) bool marks left padding (None: none). The caller then calls
        `cache.advance_host(T)` and rolls rejected columns back (`cache.rollback`)."""
        if mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        return apply_linear(self.lm_head, self.model.verify_static(input_ids, mask, cache))

    def prefill_step(
        self, input_ids: torch.Tensor, cache: StaticKVCache, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A prompt as one block step over the StaticKVCache: input_ids (B, T), mask (B, T)
        bool (left padding) -> the last column's logits (B, V). verify_step's forward with the
        head on one column, so that torch.compile can capture prompts of every length T in one
        graph (T dynamic; minimind.infer.steps.prefill). Same caller duties as verify_step."""
        if mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        return apply_linear(self.lm_head, self.model.verify_static(input_ids, mask, cache)[:, -1])

    # --- conveniences --------------------------------------------------------------------
    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        static: bool = False,
        fuse: bool = True,
    ):
        """A KV cache for this model; static=True gives a StaticKVCache for decode_step.

        Decoding is about to start, so the input-sharing projections are fused here (see
        layers.InputGroup; a no-op when they already are). fuse=False instead drops any fused
        buffer and leaves every parameter's storage as it is: decoding from a model that is
        being trained (rollouts), whose parameters the optimizer, DDP or FSDP hold."""
        if fuse:
            self.fuse_projections()
        else:
            self.unfuse_projections()
        cls = StaticKVCache if static else KVCache
        cache = cls.for_model(self, batch_size, max_len, dtype)
        if static:
            self.model.rotary.ensure(max_len, cache.valid.device)
        return cache

    def fuse_projections(self) -> None:
        """Make each q/k/v and gate/up group's weights views of one buffer (layers.InputGroup),
        where possible; no-grad forwards then run each group as one matmul."""
        self._fused = True
        for module in self.modules():
            if isinstance(module, InputGroup):
                module.fuse()

    def unfuse_projections(self) -> None:
        """Run each projection on its own again; parameter storage is not touched."""
        self._fused = False
        for module in self.modules():
            if isinstance(module, InputGroup):
                module._fused_weight = None

    def _apply(self, fn, recurse=True):
        # .to()/.half()/... give the parameters new storage: fuse again if fused before.
        out = super()._apply(fn, recurse)
        if getattr(self, "_fused", False):
            self.fuse_projections()
        return out

    def set_rope_scaling(self, scaling: dict[str, Any] | None) -> None:
        """Switch YaRN on (e.g. config.MINIMIND2_YARN) or off at inference time."""
        self.config.rope_scaling = None
        if scaling is not None:
            self.config.rope_scaling = ModelConfig(rope_scaling=scaling).rope_scaling
        self.model.rotary.set_scaling(self.config.rope_scaling)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.model.gradient_checkpointing = enabled

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() dedupes the tied head
