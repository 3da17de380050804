"""How `generate` runs its decode steps: one token per row over a StaticKVCache, either eager
or through `torch.compile`, with the cache growing in chunks.

Why a static cache even without compiling: the step reads and writes only tensors (the write
slot, positions and validity live on the device), so there is no host synchronisation and
attention reads contiguous whole buffers instead of strided views of the filled prefix
(faster per token even eager; bench/RESULTS.md, "Why the code is shaped so", has the A/B).
Its cost: attention spans the whole capacity, not just the filled slots, so capacity starts
at the prompt plus a small chunk and doubles when full (an eager regrowth is one copy).

`compile=True` captures the step once per (batch, capacity) with torch.compile: capacity is
then the prompt plus the whole budget (rounded up to a multiple of 64, so calls share graphs)
and finished rows are decoded along rather than dropped (a new batch size would recompile).
The first call pays the compilation (about 20-40 s on a CPU, a few seconds once inductor's
on-disk cache has it); it pays off for long outputs and on GPUs. The prompt is prefilled by
`prefill`: MiniMindForCausalLM.prefill_step compiled with the prompt length dynamic, one more
graph that serves every length.

Per-step overhead of the compiled step on a CPU, where a batch-1 step of a 26M model is ~5 ms:
- inductor's C++ wrapper (`cpp_wrapper`): the graph's ~100 kernel and GEMM calls are made from
  C++ instead of a generated Python function;
- guards are evaluated in full on the first step of each `generate` call only (that call picks,
  or compiles, the graph for exactly these inputs); the later steps pass the same model, the
  same cache tensors and a token tensor of the same shape, so they skip the guard evaluation
  (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`: only guards that tell cached
  graphs apart still run). The stance is process-wide: compiled `generate` calls are not for
  several threads at once (the server, chat and web UI decode eagerly).
Both together raise the compiled step's tokens/s by about a fifth on a CPU (the A/B is in
bench/RESULTS.md, "Why the code is shaped so").
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from minimind.model import MiniMindForCausalLM, layers
from minimind.model.cache import StaticKVCache

CHUNK = 64  # capacity granularity (slots)
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _round_up(n: int, k: int = CHUNK) -> int:
    return -(-n // k) * k


def skip_guards(model: MiniMindForCausalLM):
    """The context for a compiled call whose graph already ran on these inputs: guard
    evaluation skipped (see the module docstring). Not for MoE models: their expert dispatch
    breaks the graph on counts read on the host, and the code after the break meets new
    counts that need graphs of their own (a skipped guard would refuse to compile them)."""
    if getattr(model.config, "use_moe", False):
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def compile_for(model: MiniMindForCausalLM, fn, dynamic: bool | None = False):
    """torch.compile(fn) with the options of every decoding graph here: inductor's C++
    wrapper on a CPU (module docstring). fullgraph=False: an MoE layer's grouped dispatch
    reads expert counts on the host (a graph break, still correct); dense models compile to
    one graph."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    options = {"cpp_wrapper": True} if on_cpu else None
    return torch.compile(fn, dynamic=dynamic, options=options)


def compiled_step(model: MiniMindForCausalLM):
    """model.decode_step through torch.compile, made once per model and kept with it."""
    fn = _compiled.get(model)
    if fn is None:
        fn = _compiled[model] = compile_for(model, model.decode_step)
    return fn


_prefills: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prefill(
    model: MiniMindForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None, cache: StaticKVCache
) -> torch.Tensor:
    """The prompt ids (B, T) (mask: left padding, None for none) through
    `model.prefill_step` compiled with T dynamic, so one graph serves every prompt length
    (made once per model; a new batch size or cache capacity compiles another) -> the last
    column's logits (B, V), the cache advanced by T slots. A one-token prompt goes eager (a
    dimension of size 1 is always specialised), and so does a float32 model's every prompt on
    a CPU where layers.AVOID_MKL: there its eager matmuls are oneDNN's, which inductor cannot
    lower for a dynamic length, and the eager prefill measured faster than the compiled one's
    MKL calls (bench/RESULTS.md, "bench/decode.py"). Other dtypes compile there too: an int8
    draft model's (quant.py) or a bf16 model's matmuls are the same kernels eager or compiled,
    and the compiled graph saves the rest (the 2.8M int8 draft's prefill of 12 chat prompts
    20.5 -> 13.6 ms; bench/RESULTS.md).

    Why: the eager prefill of a 30-token chat prompt spends about a quarter of its time
    outside the matmuls (norms, rotary, attention, dispatch), which inductor fuses; see
    bench/RESULTS.md, "bench/decode.py"."""
    t = ids.shape[1]
    if cache.length + t > cache.max_len:
        raise ValueError(f"KV cache overflow: {cache.length} cached + {t} new > {cache.max_len}")
    # a float32 model's matmuls take layers.linear's oneDNN route when eager
    float32 = next(model.parameters()).dtype == torch.float32
    if t < 2 or (layers.AVOID_MKL and ids.device.type == "cpu" and float32):
        return model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]
    fn = _prefills.get(model)
    if fn is None:  # dynamic=None: only the dimensions marked below are dynamic
        fn = _prefills[model] = compile_for(model, model.prefill_step, dynamic=None)
    # fresh copies, made in the caller's (inference) mode: the dynamic marks stay off the
    # caller's tensors, and a mask built here or given never differs in its dispatch keys
    # (an inference tensor against a normal one would recompile)
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        cache.has_padding = cache.has_padding or not bool(mask.all())
        mask = mask.clone()
    ids = ids.clone()
    torch._dynamo.mark_dynamic(ids, 1)
    torch._dynamo.mark_dynamic(mask, 1)
    logits = fn(ids, cache, mask)
    cache.advance_host(t)
    return logits


class Stepper:
    """Owns the cache of one `generate` call and runs its decode steps.

    prefill(ids (B, T), mask) -> logits (B, V) of the last position; step(tok (B,)) -> logits
    (B, V) of the next; reorder(index) keeps rows (eager only: `drops_rows`).
    """

    def __init__(
        self,
        model: MiniMindForCausalLM,
        batch: int,
        prompt_len: int,
        budget: int,
        compile: bool = False,
        fuse: bool = True,
    ):
        self.model, self.compile = model, compile
        self.limit = prompt_len + budget  # the most slots this call can fill
        if compile:
            capacity = _round_up(self.limit)
            self._step = compiled_step(model)
        else:
            capacity = min(self.limit, _round_up(prompt_len + CHUNK))
            self._step = model.decode_step
        self.cache = model.new_cache(batch, capacity, static=True, fuse=fuse)
        self.drops_rows = not compile
        self._guarded = False  # compiled: has a step run with full guard evaluation yet

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.compile:
            return prefill(self.model, ids, mask, self.cache)
        return self.model(ids, attention_mask=mask, cache=self.cache, logits_to_keep=1).logits[
            :, -1
        ]

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        if self.cache.length == self.cache.max_len:
            self._grow()
        cache = self.cache
        if self.compile and self._guarded:
            with skip_guards(self.model):
                logits = self._step(tok[:, None], cache)
        else:
            logits = self._step(tok[:, None], cache)
            self._guarded = True
        cache.advance_host()
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)

    def _grow(self) -> None:
        cache = self.cache
        capacity = min(self.limit, 2 * cache.max_len)
        if capacity <= cache.max_len:
            raise ValueError(f"KV cache full at {cache.max_len} slots")
        self.cache = StaticKVCache.merge([cache], capacity)
        self._guarded = False  # new cache tensors: the next step checks guards in full
        self.model.model.rotary.ensure(capacity, cache.valid.device)
