"""Weight-only int8 for decoding: `Int8Linear` and `quantize_int8(model)`.

What it is for: a speculative draft model (minimind.infer.speculative). A draft's precision
changes only which tokens it proposes, never the output, since the target verifies every token
(greedy output stays plain greedy's; sampled output keeps the target's distribution). Batch-1
decoding reads every weight once per token, so a draft whose weights are a quarter of fp32's
bytes drafts faster: on this project's Intel Xeon a minimind2-small step takes about 0.45x the fp32
step's time, and its greedy tokens agreed with fp32's (bench/RESULTS.md, "bench/decode.py").

Scheme: symmetric, per output channel: W (out, in) ~= Q * s[:, None], Q int8 in [-127, 127],
s = max |W[row]| / 127 in the activation dtype (bf16 by default). Everything else (embedding,
norms, KV cache) is cast to that dtype. On a CPU, for fewer than PACK_ROWS rows (decode steps,
draft blocks) and inputs a multiple of 16 wide, the matmul is aten._weight_int8pack_mm (int8 weights read as they are, bf16
activations); more rows (a prompt's prefill) and other devices cast Q to bf16 per call and
scale the product (correct everywhere, fast only where a bf16 GEMM is). The tied head gets its own int8 copy; the embedding stays in bf16 for lookups.

A group of projections that read one input (q/k/v, gate/up: layers.InputGroup) is quantized
as ONE Int8Linear of the concatenated rows, which the group runs as one matmul (`packed`);
its projections become views of that buffer, so nothing is stored twice.

A quantized model decodes and scores; it does not train (no gradients reach int8 weights).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .layers import InputGroup

# Rows up to which the int8 kernel beats casting Q to bf16 for a GEMM: the kernel's time grows
# with the rows (a GEMV per row), the cast is paid once per call (bench/RESULTS.md). The kernel
# also needs in_features % 16 == 0 (other widths gave garbage or crashed in torch 2.13); every
# MiniMind preset's widths are multiples of 16, and other widths take the cast path.
PACK_ROWS = 16


class Int8Linear(nn.Module):
    """A bias-free Linear with int8 weights: qweight (out, in) int8, scale (out,)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype) -> Int8Linear:
        """Quantize W (out, in) per output row; scale in `dtype` (the activations')."""
        w = weight.detach().float()
        # the scale as it will be stored, so that Q rounds against the step actually used
        scale = (w.abs().amax(1).clamp(min=1e-12) / 127).to(dtype)
        q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in the scale's dtype."""
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.scale.dtype)
        if x.device.type == "cpu" and x.shape[0] < PACK_ROWS and self.in_features % 16 == 0:
            y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)
        else:  # x @ (Q * s).T == (x @ Q.T) * s; |Q| <= 127 is exact in bf16
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _swap_linears(module: nn.Module, dtype: torch.dtype) -> None:
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            if child.bias is not None:
                raise ValueError(f"{name}: a Linear with a bias (minimind's have none)")
            setattr(module, name, Int8Linear.from_weight(child.weight, dtype))
        elif not isinstance(child, InputGroup):  # groups are done whole, below
            _swap_linears(child, dtype)


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of `model` (a MiniMindForCausalLM; the original is untouched) for decoding, its
    Linears int8 (module docstring) and everything else in `dtype`."""
    out = copy.deepcopy(model)
    out.unfuse_projections()
    for group in [m for m in out.modules() if isinstance(m, InputGroup)]:
        linears = [getattr(group, n) for n in group.GROUP]
        if all(type(lin) is nn.Linear and lin.bias is None for lin in linears):
            packed = Int8Linear.from_weight(torch.cat([lin.weight for lin in linears]), dtype)
            start = 0
            for name, lin in zip(group.GROUP, linears):
                rows = slice(start, start + lin.out_features)
                setattr(group, name, Int8Linear(packed.qweight[rows], packed.scale[rows]))
                start += lin.out_features
            group.packed = packed
        _swap_linears(group, dtype)  # anything else inside (an MoE layer's experts)
    _swap_linears(out, dtype)
    return out.to(dtype).eval()
