"""The dense building blocks: RMSNorm, rotary embeddings (with YaRN), grouped-query attention, SwiGLU.

Shapes use B batch, T new tokens, S keys (cached + new), H query heads, K key/value heads,
D head_dim, C hidden size. Mixture-of-experts lives in moe.py, the KV cache in cache.py.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cache import LayerCache
from .config import ModelConfig


def _avoid_mkl() -> bool:
    """Whether `linear` goes around MKL on a CPU: MINIMIND_CPU_MATMUL=bypass|mkl, else by CPU
    vendor: yes on AMD. The torch CPU wheel's BLAS is MKL, which on an AMD CPU spends about M
    GEMVs' time on an M-row fp32 matmul, where oneDNN (also in the wheel) is 1.3-2.9x faster at
    every row count and inductor's own reduction loop over rows it has stored 2-4x faster at 1
    to 16 rows (this project's AMD EPYC: a compiled minimind2-small decode step 6.7 -> 2.4 ms,
    a 3-column verification 12.3 -> 3.4 ms; bench/RESULTS.md, "bench/decode.py"). On
    Intel CPUs MKL's matmul measured best of the forms tried there (the same section;
    reductions were not tried), so it stays."""
    choice = os.environ.get("MINIMIND_CPU_MATMUL", "").strip().lower()
    if choice in ("bypass", "mkl"):
        return choice == "bypass"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("vendor_id") and "AMD" in line for line in f)
    except OSError:
        return False


# The most rows (batch x new tokens, known when the graph is made) that `linear` writes as
# reductions in a compiled graph: decode steps of up to 8 rows, verifications of up to 7 drafts
# (measured faster than MKL up to 16 rows; past 8 a batch is better served by a GEMM kernel).
FEW_ROWS = 8
AVOID_MKL = _avoid_mkl()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias): x (..., in), weight (out, in) -> (..., out).

    On a CPU where AVOID_MKL (see _avoid_mkl):
    - in a graph being compiled, with at most FEW_ROWS rows known when it is made: the rows
      stored in a buffer of their own, then each row as its own sum of weight * row over `in`;
      inductor fuses the rows' sums into one vectorised pass over the weight with an
      accumulator per row, so the weight is read once for all rows. Other compiled matmuls (a
      prefill's dynamic rows) stay F.linear: inductor cannot lower the oneDNN op below for them.
    - eager, without autograd, in float32: oneDNN's matmul on the plain weight
      (mkldnn._linear_pointwise; nothing packed or cached, so a weight updated in place, by a
      fused optimizer too, is read as it is). Training keeps F.linear (no backward here).
    The same products, summed in another order: results differ from F.linear by rounding."""
    if AVOID_MKL and x.device.type == "cpu":
        if torch.compiler.is_compiling():
            # imported here: `import torch` does not load them, and only a compile reaches this
            from torch._inductor.inductor_prims import force_stride_order
            from torch.fx.experimental.symbolic_shapes import statically_known_true

            rows = math.prod(x.shape[:-1])
            # statically known: never a guard on a dynamic row count (a prefill's)
            if statically_known_true(rows <= FEW_ROWS) and statically_known_true(rows >= 1):
                # The rows stored, not recomputed: left alone, inductor inlines their producer
                # (RMSNorm's rsqrt and divide, the residual adds) into the reduction's inner
                # loop, once per row per 16 weights, and the matmul turns compute-bound (the
                # lm_head of minimind2-small at 3 rows: 630 -> 120 us; bench/RESULTS.md).
                flat = x.reshape(rows, x.shape[-1])
                if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
                    # (the op has no backward; a compiled training step keeps the plain rows)
                    flat = force_stride_order(flat, [x.shape[-1], 1])
                if rows == 1:  # (out, 1, in) summed over in: a decode step ~10% faster
                    y = (weight[:, None] * flat[None]).sum(-1).t()
                else:
                    y = torch.stack([(weight * flat[r]).sum(-1) for r in range(rows)])
                return y.reshape(*x.shape[:-1], weight.shape[0])
        elif (
            x.dtype == weight.dtype == torch.float32
            and weight.is_contiguous()
            and not torch.is_grad_enabled()
            and x.numel() > 0
            and torch.backends.mkldnn.is_available()
        ):
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def apply_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), through `linear` for a bias-free nn.Linear (LoRA, int8 and other wrappers
    run their own forward)."""
    if type(module) is nn.Linear and module.bias is None:
        return linear(x, module.weight)
    return module(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (Zhang & Sennrich 2019), cast back before scaling."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Rotary inverse frequencies, (D/2,), optionally YaRN-scaled (Peng et al. 2023, eq. 19-20).

    YaRN as MiniMind2 does it: f' = f * ((1 - g) + g / factor), with g a linear ramp over the
    dimension index between the correction bounds of beta_fast and beta_slow; no attention
    temperature ("mscale") is applied. Dimensions that rotate fast (many turns within the
    original context) keep their frequency; slow ones are interpolated by `factor`.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float64) * 2 / head_dim))
    if scaling is None:
        return inv_freq.float()
    orig = scaling["original_max_position_embeddings"]
    factor = scaling["factor"]

    def correction_dim(n_rot: float) -> float:
        # The dimension whose wavelength completes n_rot turns within the original context.
        return head_dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(scaling["beta_slow"])), half - 1)
    ramp = ((torch.arange(half, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    return (inv_freq * ((1 - ramp) + ramp / factor)).float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the Llama `rotate_half` layout, regrown on demand (any length is valid)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.initial_len = config.max_position_embeddings
        self.set_scaling(config.rope_scaling)

    def set_scaling(self, scaling: dict[str, Any] | None) -> None:
        """Switch YaRN on (a scaling dict) or off (None); tables are rebuilt lazily."""
        self.scaling = scaling
        # Plain attributes, not buffers: `model.to(bfloat16)` must not round the angles
        # (at position 4000 a bf16 table is off by more than 1 in cos). They follow the
        # device of the positions instead.
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, scaling)
        # Built now, not on first use, so a compiled model does not recompile on its second
        # call when the table changes shape. (On the default device: meta inside a meta
        # context, where shapes are all that is wanted.)
        self._build(self.initial_len)

    def _build(self, length: int, device: torch.device | None = None) -> None:
        # Never inference tensors, even when first needed on a device inside `generate`
        # (inference_mode): training that follows would fail to save them for backward.
        with torch.inference_mode(False):
            inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
            if device is not None:
                inv_freq = inv_freq.to(device)
            t = torch.arange(length, device=inv_freq.device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)  # (L, D/2)
            emb = torch.cat([freqs, freqs], dim=-1)  # (L, D): rotate_half pairs i with i + D/2
            self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int -> cos, sin (B, T, D) float32."""
        needed = int(positions.max()) + 1 if positions.numel() else 1
        self.ensure(needed, positions.device)
        return self.cos[positions], self.sin[positions]

    def ensure(self, length: int, device: torch.device) -> None:
        """Have the tables cover positions 0..length-1 on `device` (grown by doubling)."""
        if self.cos.shape[0] < length or self.cos.device != device:
            self._build(max(length, self.initial_len, 2 * self.cos.shape[0]), device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` without the growth check (no host sync): the caller has called `ensure`."""
        return self.cos[positions], self.sin[positions]

    def table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, length, D) for positions 0..length-1 (the unpadded training path)."""
        if self.cos.shape[0] < length or self.cos.device != device:
            self._build(max(length, self.initial_len), device)
        return self.cos[None, :length], self.sin[None, :length]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, D); cos/sin (B or 1, T, D) float32. Rotation done in float32."""
    xf = x.float()
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class InputGroup(nn.Module):
    """Base of a module whose bias-free Linears named in GROUP read the same input (q/k/v;
    gate/up): `project(x)` runs them as ONE matmul where that is safe, else one by one.

    Why: one (C, sum of outputs) GEMM is faster than several thin ones (k/v are only K*D = 128
    wide), above all in batch-1 decoding on CPU, where each GEMV call has its own fixed cost
    (the A/B is in bench/RESULTS.md, "Why the code is shaped so").

    - Autograd on (training), where CONCAT_WITH_GRAD: the weights are concatenated per call.
      The copy is small next to the GEMM, and the gradients reach each parameter, so names,
      optimizers and LoRA see the usual separate parameters. Worth it for q/k/v (k and v are
      thin); gate/up gained nothing measurable in training steps (bench/RESULTS.md), so those
      run as two matmuls there.
    - Autograd off (decoding, evaluation), after `fuse()`: the parameters are views into one
      buffer, which is then the concatenated weight itself: no copy, and never stale, since
      every in-place update (optimizer steps, fused AdamW included, which does not bump version
      counters; load_state_dict) writes through the views. Anything that replaces a parameter's
      storage (`.to()`, `load_state_dict(assign=True)`, LoRA wrapping, FSDP) breaks the views;
      `fused_intact()` notices (data pointers) and the Linears run one by one until `fuse()`
      is called again. MiniMindForCausalLM fuses lazily, when a KV cache is made for decoding,
      and again after `.to()` once fused, so training alone never changes parameter storage.
    - Under torch.compile, data pointers cannot be checked in the graph: the fused buffer is
      used only when the caller passes `trusted=True` right after `fuse()` (decode_static).
    """

    GROUP: tuple[str, ...] = ()
    CONCAT_WITH_GRAD = False

    def __init__(self) -> None:
        super().__init__()
        self._fused_weight: torch.Tensor | None = None  # plain attribute: not in state_dict

    def _linears(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.GROUP]

    def _plain(self, linears: list[nn.Module]) -> bool:
        return all(type(lin) is nn.Linear and lin.bias is None for lin in linears)

    def fused_intact(self) -> bool:
        """True when every weight of the group is still its slice of the fused buffer."""
        base = self._fused_weight
        linears = self._linears()
        if base is None or not self._plain(linears):
            return False
        try:
            ptr, row = base.data_ptr(), base.element_size() * base.shape[1]
            for lin in linears:
                w = lin.weight
                if w.data_ptr() != ptr or w.dtype != base.dtype or w.device != base.device:
                    return False
                ptr += w.shape[0] * row
        except RuntimeError:  # a tensor subclass without storage (DTensor under FSDP)
            return False
        return True

    def fuse(self) -> bool:
        """Make the group's weights views of one (sum of outputs, C) buffer; -> fused or not."""
        if self.fused_intact():
            return True
        self._fused_weight = None
        linears = self._linears()
        if not self._plain(linears):
            return False
        weights = [lin.weight for lin in linears]
        if type(weights[0].data) is not torch.Tensor or weights[0].is_meta:
            return False
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            return False
        # Never an inference tensor, even when fused inside `generate` (inference_mode): the
        # parameters become views of `base`, and a model that decoded may train afterwards.
        with torch.inference_mode(False):
            base = torch.cat([w.detach() for w in weights])
        start = 0
        for w in weights:
            w.data = base[start : start + w.shape[0]]
            start += w.shape[0]
        self._fused_weight = base
        return True

    def project(self, x: torch.Tensor, trusted: bool = False) -> tuple[torch.Tensor, ...]:
        """x (..., C) -> each Linear's output (..., out_i), in GROUP order."""
        linears = self._linears()
        packed = getattr(self, "packed", None)  # the group as one int8 matmul (model.quant)
        if packed is not None:
            return packed(x).split([lin.out_features for lin in linears], dim=-1)
        if self._plain(linears):
            sizes = [lin.out_features for lin in linears]
            if torch.is_grad_enabled():
                if self.CONCAT_WITH_GRAD:
                    weight = torch.cat([lin.weight for lin in linears])
                    return linear(x, weight).split(sizes, dim=-1)
            elif self._fused_weight is not None and (
                trusted or (not torch.compiler.is_compiling() and self.fused_intact())
            ):
                return linear(x, self._fused_weight).split(sizes, dim=-1)
        return tuple(apply_linear(lin, x) for lin in linears)


class Attention(InputGroup):
    """Grouped-query causal self-attention through F.scaled_dot_product_attention."""

    GROUP = ("q_proj", "k_proj", "v_proj")
    CONCAT_WITH_GRAD = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        c, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            d,
        )
        self.q_proj = nn.Linear(c, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(c, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(c, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, c, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: LayerCache | None = None,
        trusted: bool = False,
    ) -> torch.Tensor:
        """x (B, T, C); mask None (plain causal) or bool (B, 1, T, S), True = may attend;
        trusted: see InputGroup.project."""
        b, t, _ = x.shape
        q, k, v = self.project(x, trusted)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, S, D), views into the preallocated buffers
        # A single query attends to every cached key; kept as a separate branch rather than
        # `mask is None and t > 1`, which torch.compile turns into a symbolic bool under
        # dynamic shapes that SDPA rejects (a graph break per layer on variable-length SFT).
        causal = mask is None
        if t == 1:
            causal = False
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            enable_gqa=self.n_kv != self.n_heads,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.resid_dropout(apply_linear(self.o_proj, y))


class SwiGLU(InputGroup):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, eq. 6): the dense MLP and each expert."""

    GROUP = ("gate_proj", "up_proj")

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, trusted: bool = False) -> torch.Tensor:
        gate, up = self.project(x, trusted)
        return self.dropout(apply_linear(self.down_proj, F.silu(gate) * up))
