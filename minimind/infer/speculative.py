"""Speculative decoding: a cheap drafter proposes k tokens per row, the target model checks
them all in one forward over its KV cache, and every row keeps the longest prefix the target
agrees with, plus one token of the target's own. `stream`/`generate` come here when
GenerationConfig.draft is set; the continuous batcher (batcher.py, `minimind serve --draft`)
runs its own rounds over its cache groups with the same pieces: `Rule` (one generator for a
batch, or one per row), `verify`, `draft_with_model` (per-row draft lengths), `ngram_draft`,
`next_k`, `load_draft`.

Drafters:
- a draft model (a smaller MiniMindForCausalLM with the same vocabulary: the 2M `demo`-shaped
  or 26M models for the larger ones) decodes k tokens over its own KV cache. One distilled
  from the target (`minimind train distill --alpha 0`, the target as teacher) agrees with it
  more often than one trained on the same corpus alone (DistillSpec, Zhou et al. 2023; the
  figures are in bench/RESULTS.md, "A draft distilled from its target");
- "ngram" (prompt lookup, as transformers' `prompt_lookup_num_tokens`): the row's last n
  tokens (n = 3, 2, 1) are looked up earlier in the row's own prompt and output, and the k
  tokens that followed their latest occurrence are proposed. No second model; it pays off
  where the answer repeats its context (quoting, editing, summaries, code).

The rule (Leviathan et al. 2023, "Fast inference from transformers via speculative decoding",
alg. 1; Chen et al. 2023, "Accelerating LLM decoding with speculative sampling", alg. 2):
with p the target's and q the drafter's distribution at a draft position (both after the same
temperature / top-k / top-p / min_new_tokens processing as plain decoding), draft token d is
accepted with probability min(1, p(d) / q(d)); at the first rejection the row's token is drawn
from norm(max(0, p - q)) and the rest of the draft is discarded; when all k are accepted, one
more token is drawn from p at the position after them. Each emitted token is then distributed
exactly as plain sampling from p would give it. An n-gram draft is a point mass (q(d) = 1):
accept with probability p(d), on rejection draw from p with d removed. Greedy (temperature 0)
is the same rule with p and q point masses at the argmax: accept d while it equals the
target's argmax, so the output is plain greedy decoding token for token (up to float
reassociation between a (B, k+1) forward and k+1 single-token steps; tested identical on tiny
random float64 models and a tiny trained pair in float32, and on the demo's trained model by
bench/decode.py --spec-target).

Design decisions:
- The target holds every emitted token but the row's last one in its cache; a round feeds
  [last, d_1..d_m] (T = m + 1 columns, rows with shorter drafts left-padded inside the block,
  which the model's attention mask already handles) and `KVCache.rollback` drops each row's
  rejected drafts afterwards. Rows accept different lengths: a row that keeps fewer leaves a
  hole of invalid slots that attention skips, so each row advances by its own accepted count
  (the cache length grows by the most any row kept; capacity doubles when needed). A round
  in which no row has a draft is plain decoding's fixed-shape step.
- The draft model's cache lags the emitted tokens by one or two ("pending": the token the
  target added, and the last draft when all k were accepted, which the draft never fed
  itself); a round starts with one forward over the pending tokens (left-padded to 2), then
  k - 1 single-token steps (`decode_step` over a StaticKVCache, as plain decoding).
- k: fixed (`num_draft_tokens`), or None to adapt it per round from the acceptance, as
  transformers' "heuristic" assistant schedule does: +2 after a round whose drafts were all
  accepted, -1 after one with a rejection, within [1, 16]; it starts at 4.
- A round's draft length is cut to the largest budget any row has left, and each row's
  emission is cut at its stop token or its own budget. Stopping a row's round early is exact:
  the next token is drafted afresh from the same prefix.
- `compile=True`: every forward after the prefill has a fixed shape, so each compiles once.
  The target verifies [last, d_1..d_m] right-padded to k + 1 columns
  (`MiniMindForCausalLM.verify_step`, over the StaticKVCache: it writes k + 1 slots at the
  device-side slot and attends over the whole buffer with a causal validity mask); the padding
  columns come after the real ones, so causal attention keeps them out of the real columns'
  logits, and they are rolled back with the rejected drafts (rollback is per-row length
  bookkeeping: `valid`, `seen`, the slot). The logits are gathered right-aligned for `verify`.
  A round without drafts is plain decoding's compiled `decode_step`; the draft model runs its
  pending tokens as a fixed block of 2 (left-padded) and its k - 1 single-token steps through
  its own compiled `decode_step`. k must be fixed (`num_draft_tokens`; an adapted k would
  recompile the verification: refused). Capacity is the prompt plus the whole budget plus k
  (a regrowth, possible when batched rows leave holes, recompiles once), and finished rows
  are dropped as in eager (each new batch size compiles once; batch 1, as chat, never does).
  After the first call of each graph on a cache, guard evaluation is skipped as in steps.py.
  Greedy rounds without per-position processing (no min_new_tokens, no log-probs) go further:
  the draft model's k forwards, the verification and the argmaxes are one compiled graph that
  returns token ids (`compiled_greedy_round`), so a round is one compiled call and one
  device-to-host transfer instead of three calls, two transfers and the (B, k + 1, V) logits
  on the host; the prompts are prefilled through steps.prefill's compiled graph.
- Not supported with a draft (refused at the call): the repetition, presence and frequency
  penalties (their state would change inside a verified block).
- Statistics (`SpeculationStats`): drafted and accepted tokens, target forwards; acceptance
  rate and tokens per target forward per row (plain decoding: 1.0). Every `Step` carries the
  call's running totals, every Completion of `generate` the final ones.
- When it pays: it takes about as many tokens per target forward as a verification forward
  of k + 1 tokens costs in one-token steps (plus the drafter's cost) to break even; eager and
  compiled, plain and speculative, are compared in bench/RESULTS.md ("Speculative decoding").
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from minimind.model import MiniMindForCausalLM
from minimind.model.cache import StaticKVCache

from .sampling import apply_temperature, top_k_filter, top_p_filter
from .steps import compile_for, compiled_step, prefill, skip_guards

NGRAM = "ngram"
K_START, K_MIN, K_MAX = 4, 1, 16
NGRAM_MAX, NGRAM_MIN = 3, 1  # prompt-lookup n-gram sizes, tried longest first
CHUNK = 64  # cache capacity granularity (slots), as steps.py


@dataclass
class SpeculationStats:
    """Running totals of one speculative `generate`/`stream` call, over all its rows.

    drafted: draft tokens proposed; accepted: of those, kept; rounds: verification forwards of
    the target (each over all running rows, the prefill not counted); row_rounds: the sum over
    rounds of the rows it verified; tokens: tokens emitted by those rounds.
    """

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    row_rounds: int = 0
    tokens: int = 0
    k: int = 0  # the draft length of the latest round (adapted when num_draft_tokens is None)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted draft tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens one row gains per target forward (plain decoding: 1)."""
        return self.tokens / self.row_rounds if self.row_rounds else 0.0

    def summary(self) -> str:
        return (
            f"acceptance {self.acceptance_rate:.0%} ({self.accepted}/{self.drafted} drafted), "
            f"{self.tokens_per_forward:.2f} tokens per target forward"
        )


# --- checks ----------------------------------------------------------------------------------


def check_cache_path(model, role: str) -> None:
    """Refuse a model that cannot decode over minimind's KV cache, saying why."""
    missing = [n for n in ("new_cache", "decode_step", "config") if not hasattr(model, n)]
    if missing:
        raise ValueError(
            f"the {role} ({type(model).__name__}) has no KV-cache decoding path (no "
            f"{', '.join(missing)}): speculative decoding needs a MiniMindForCausalLM, which "
            "verifies drafts over its cache and rolls rejected ones back"
        )


def check_draft(target: MiniMindForCausalLM, draft) -> None:
    """A draft model must share the target's vocabulary: same size and special ids."""
    check_cache_path(target, "target model")
    if isinstance(draft, str):
        if draft != NGRAM:
            raise ValueError(f"draft must be a model or {NGRAM!r}, got {draft!r}")
        return
    check_cache_path(draft, "draft model")

    def vocab(m) -> str:
        c = m.config
        return (
            f"{c.vocab_size} tokens, bos {c.bos_token_id}, eos {c.eos_token_id}, "
            f"pad {c.pad_token_id}"
        )

    if vocab(target) != vocab(draft):
        raise ValueError(
            "the draft model's vocabulary differs from the target's: draft "
            f"[{vocab(draft)}] vs target [{vocab(target)}]; a draft must use the same tokenizer"
        )
    td, dd = next(target.parameters()).device, next(draft.parameters()).device
    if td != dd:
        raise ValueError(f"the draft model is on {dd}, the target on {td}: put both on one")


DRAFT_DTYPES = ("int8", "fp32", "bf16", "fp16")  # --draft_dtype's choices


def load_draft(spec: str, target, dtype: str | None = None) -> tuple[str | torch.nn.Module, str]:
    """`--draft PATH|ngram` of `minimind chat` and `minimind serve` -> (the draft: 'ngram' or a
    model, a description). A draft model is loaded on the target's device (`target`: a
    load.LoadedModel) and must have the target's tokenizer; another vocabulary is refused
    naming both. dtype (--draft_dtype): "int8" (weight-only, minimind.model.quant: the default
    on a CPU, where a draft step then costs about half of fp32's) or a float dtype (default
    elsewhere: the target's). A draft's precision changes what it proposes, never the output."""
    if spec == NGRAM:
        return spec, "n-gram prompt lookup"
    from minimind.model.quant import quantize_int8

    from .load import DTYPES, load_model  # load imports the model stack; only a model needs it

    if dtype is None:
        dtype = "int8" if target.device.type == "cpu" else None
    elif dtype not in DRAFT_DTYPES:
        raise ValueError(f"--draft_dtype must be one of {', '.join(DRAFT_DTYPES)}, got {dtype!r}")
    # int8 is quantized from fp32 weights; None: the target's dtype
    load_dtype = next(target.model.parameters()).dtype if dtype is None else DTYPES.get(dtype)
    draft = load_model(spec, device=target.device, dtype=load_dtype or torch.float32)
    ours, theirs = target.tokenizer.backend, draft.tokenizer.backend
    if ours.get_vocab(with_added_tokens=True) != theirs.get_vocab(with_added_tokens=True):
        raise ValueError(
            f"--draft {spec}: its tokenizer ({draft.tokenizer.vocab_size} tokens, "
            f"{draft.path}) differs from the model's ({target.tokenizer.vocab_size} tokens, "
            f"{target.path}); a draft model must share the model's vocabulary"
        )
    check_draft(target.model, draft.model)  # the model configs' vocabularies
    if dtype != "int8":
        return draft.model, draft.describe()
    n = draft.model.num_parameters() / 1e6
    text = f"{draft.name} ({draft.kind}, {n:.2f}M parameters, int8 weights, bf16 activations, "
    return quantize_int8(draft.model), f"{text}{draft.device})"


def check_config(cfg) -> None:
    """The settings speculative decoding does not support, refused by name."""
    bad = [
        f"{name}={getattr(cfg, name)}"
        for name, off in (
            ("repetition_penalty", 1.0),
            ("presence_penalty", 0.0),
            ("frequency_penalty", 0.0),
        )
        if getattr(cfg, name) != off
    ]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} not supported with a draft: a penalty's state changes inside "
            "a verified block of draft tokens"
        )
    if cfg.compile and cfg.num_draft_tokens is None:
        raise ValueError(
            "compile=True with a draft needs a fixed num_draft_tokens: the compiled "
            "verification has k + 1 columns, and an adapted k would recompile it"
        )


# --- drafting --------------------------------------------------------------------------------


def ngram_draft(tokens: list[int], k: int, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN):
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the row's
    last n tokens, for the longest n in max_n..min_n that occurs; [] when none does.

    >>> ngram_draft([5, 6, 7, 8, 9, 1, 5, 6], 3)
    [7, 8, 9]
    >>> ngram_draft([5, 6, 7, 6, 2], 2)
    []
    """
    if k <= 0 or len(tokens) < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    size = len(arr)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        # windows starting at s <= size - 1 - n: each is followed by at least one token, and
        # none is the suffix itself; n whole-array compares, one per window offset (cheaper
        # than a sliding-window view at these sizes: called per row per round)
        ok = arr[n - 1 : size - 1] == arr[size - 1]
        for i in range(n - 1):
            ok &= arr[i : size - n + i] == arr[size - n + i]
        hits = np.flatnonzero(ok)
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k]
    return []


def _round_up(n: int) -> int:
    return -(-n // CHUNK) * CHUNK


_verifiers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_verify(model: MiniMindForCausalLM):
    """model.verify_step through torch.compile, made once per model (one graph per block
    width T, i.e. per k), with the options of steps.compiled_step."""
    fn = _verifiers.get(model)
    if fn is None:
        fn = _verifiers[model] = compile_for(model, model.verify_step)
    return fn


_rounds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_greedy_round(target: MiniMindForCausalLM, draft, k: int):
    """A greedy round as one compiled graph, made once per (target, draft, k) and kept with
    the target: draft k tokens (the draft model's pending block of 2, then k - 1 steps; or take
    the given n-gram drafts) and verify them, returning only token ids, so that a round costs
    one compiled call and one device-to-host transfer instead of three calls and two
    transfers.

    fn(last (B, 1), pending (B, 2), pending_mask (B, 2), drafts (B, k) or None, target cache,
    draft cache or None) -> (B, 2k + 1): each row's k drafts, then the target's argmax at its
    k + 1 columns [last, d_1..d_k]. The caller advances both caches' host lengths (k + 1
    slots each) and rolls back what was rejected."""
    per = _rounds.setdefault(target, {})  # (k, draft model or None) -> compiled round
    fn = per.get((k, draft))
    if fn is not None:
        return fn

    def greedy_round(last, pending, pending_mask, drafts, target_cache, draft_cache):
        if draft is not None:
            tok = draft.prefill_step(pending, draft_cache, pending_mask).argmax(-1)
            toks = [tok]
            for _ in range(k - 1):
                toks.append(draft.decode_step(toks[-1][:, None], draft_cache).argmax(-1))
            drafts = torch.stack(toks, 1)
        best = target.verify_step(torch.cat([last, drafts], 1), target_cache).argmax(-1)
        return torch.cat([drafts, best], 1)

    fn = per[(k, draft)] = compile_for(target, greedy_round)
    return fn


class _Cached:
    """A model with its StaticKVCache in one call: forwards over blocks of new tokens and
    single-token steps, rollback, row dropping, and capacity that grows on demand. compile:
    the single-token steps and `block` (fixed-width verification) run compiled."""

    def __init__(
        self, model: MiniMindForCausalLM, batch: int, capacity: int, fuse: bool, compile=False
    ):
        self.model, self.compile = model, compile
        self.cache = model.new_cache(batch, _round_up(capacity), static=True, fuse=fuse)
        self._step = compiled_step(model) if compile else model.decode_step
        self._block = compiled_verify(model) if compile else model.verify_step
        # compiled: the graphs (step, block) that have run with full guard evaluation on the
        # current cache tensors; later calls skip it (as steps.Stepper), until the cache's
        # tensors or shapes change (regrowth, dropped rows)
        self._guarded: set[str] = set()

    def _call(self, name: str, fn, *args):
        if self.compile and name in self._guarded:
            with skip_guards(self.model):
                return fn(*args)
        out = fn(*args)
        self._guarded.add(name)
        return out

    def room(self, n: int) -> None:
        """Have at least n free slots (a regrowth copies the cache once)."""
        cache = self.cache
        if cache.length + n > cache.max_len:
            capacity = _round_up(max(2 * cache.max_len, cache.length + n))
            self.cache = StaticKVCache.merge([cache], capacity)
            self.model.model.rotary.ensure(capacity, cache.valid.device)
            self._guarded.clear()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, last: bool = False):
        """ids (B, T) of new tokens (mask: left padding) -> logits (B, T, V), or (B, V) of the
        last column when `last`."""
        self.room(ids.shape[1])
        out = self.model(ids, attention_mask=mask, cache=self.cache, logits_to_keep=int(last))
        return out.logits[:, -1] if last else out.logits

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The prompt (B, T) -> its last column's logits (B, V); compiled: steps.prefill."""
        if not self.compile:
            return self.forward(ids, mask, last=True)
        self.room(ids.shape[1])
        return prefill(self.model, ids, mask, self.cache)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """tok (B,) -> next-token logits (B, V), a fixed-shape step as plain decoding's."""
        self.room(1)
        logits = self._call("step", self._step, tok[:, None], self.cache)
        self.cache.advance_host()
        return logits

    def block(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, T), mask (B, T) bool -> logits (B, T, V): the fixed-shape block step
        (MiniMindForCausalLM.verify_step; a regrowth changes the shape: one recompile)."""
        self.room(ids.shape[1])
        logits = self._call("block", self._block, ids, self.cache, mask)
        self.cache.advance_host(ids.shape[1])
        return logits

    def rollback(self, drop: list[int]) -> None:
        if any(drop):
            self.cache.rollback(drop)

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self._guarded.clear()


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token lists right-aligned into (B, T) ids and a (B, T) mask (None when none is padded)."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, t - len(r) :] = True
    padded = not bool(mask.all())
    return ids.to(device), (mask.to(device) if padded else None)


# --- the accept/reject rule ------------------------------------------------------------------


class Rule:
    """The token distributions of one set of sampling settings and the accept/reject draws.

    logits (..., V) -> processed logits (the same processing as plain decoding: float,
    stop tokens suppressed before min_new_tokens, temperature, top-k, top-p). `generator`:
    one torch.Generator that every row draws from (`generate`'s batch), a list with one per
    row (the batcher's requests, each drawing over its own row as it would alone), or None
    when greedy."""

    def __init__(self, cfg, stop_ids, generator, device):
        self.cfg, self.generator = cfg, generator
        self.greedy = cfg.temperature == 0
        self.stop = torch.tensor(tuple(stop_ids), dtype=torch.long, device=device)

    @staticmethod
    def key(cfg, stop_ids) -> tuple:
        """Settings under which rows share one Rule (and so one `verify`)."""
        return (cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_new_tokens, tuple(stop_ids))

    def process(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """logits (N, V) of new tokens whose indices in their rows are `index` (N,)."""
        logits = logits.float()
        if self.cfg.min_new_tokens > 0 and self.stop.numel():
            early = (index < self.cfg.min_new_tokens)[:, None]
            banned = torch.zeros_like(logits, dtype=torch.bool).index_fill_(1, self.stop, True)
            logits = logits.masked_fill(early & banned, float("-inf"))
        if self.greedy:
            return logits
        cfg = self.cfg
        return top_p_filter(
            top_k_filter(apply_temperature(logits, cfg.temperature), cfg.top_k), cfg.top_p
        )

    def probs(self, processed: torch.Tensor) -> torch.Tensor:
        """(N, V) distributions: a one-hot argmax when greedy, else softmax in float64."""
        if self.greedy:
            return torch.zeros_like(processed, dtype=torch.float64).scatter_(
                1, processed.argmax(-1, keepdim=True), 1.0
            )
        return processed.double().softmax(-1)

    def uniform(self, *shape: int, device, rows: list[int] | None = None) -> torch.Tensor:
        """Uniforms (N, ...) in float64 for N rows: `rows` (their indices among the rule's rows,
        default all, in order) when each row has its own generator."""
        if isinstance(self.generator, list):
            gens = self.generator if rows is None else [self.generator[i] for i in rows]
            return torch.cat(
                [
                    torch.rand(1, *shape[1:], generator=g, device=device, dtype=torch.float64)
                    for g in gens
                ]
            )
        return torch.rand(*shape, generator=self.generator, device=device, dtype=torch.float64)

    def accept_uniforms(self, counts: list[int], width: int, device) -> torch.Tensor:
        """(N, width) uniforms for the accept tests of N rows with counts[j] drafts each: one
        draw from a shared generator; with one generator per row, counts[j] from row j's (the
        rest, never read, are ones), so a row draws what it would alone whatever the others
        drafted."""
        if not isinstance(self.generator, list):
            return self.uniform(len(counts), width, device=device)
        out = torch.ones(len(counts), width, dtype=torch.float64, device=device)
        for j, (g, c) in enumerate(zip(self.generator, counts)):
            if c:
                out[j, :c] = torch.rand(c, generator=g, device=device, dtype=torch.float64)
        return out

    def draw(self, probs: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """One token per row of probs (N, V): the argmax when greedy, else inverse transform
        sampling as sampling.choose does (`rows` as for `uniform`)."""
        if self.greedy:
            return probs.argmax(-1)
        cdf = probs.cumsum(-1)
        target = self.uniform(probs.shape[0], 1, device=probs.device, rows=rows) * cdf[:, -1:]
        index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
        return index.clamp_(max=probs.shape[-1] - 1)


def next_k(k: int, drafted: int, accepted: int) -> int:
    """The adaptive draft length after a round (transformers' "heuristic" schedule): +2 when
    every draft was accepted, -1 after a rejection, within [K_MIN, K_MAX]; unchanged when
    nothing was drafted."""
    if not drafted:
        return k
    return min(k + 2, K_MAX) if accepted == drafted else max(k - 1, K_MIN)


# --- the loop --------------------------------------------------------------------------------


@torch.inference_mode()
def speculative_decode(
    model: MiniMindForCausalLM,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    cfg,
    budget: int,
    step_type,
) -> Iterator:
    """The loop behind `stream` with GenerationConfig.draft set: ids (B, T) left-padded prompts,
    mask (B, T) or None, budget >= 1 new tokens per row. Yields `step_type` (generation.Step)
    objects; a row's token is None in a step when the row has finished, or when its accepted
    run in this round ended before the step (other rows accepted more)."""
    from .generation import stop_token_ids  # generation imports this module lazily

    mcfg = model.config
    device = ids.device
    b, t = ids.shape
    stop_ids = stop_token_ids(cfg, mcfg.eos_token_id)
    stop_set = set(stop_ids)
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=device)
        if cfg.seed is None:
            generator.seed()
        else:
            generator.manual_seed(cfg.seed)
    rule = Rule(cfg, stop_ids, generator, device)
    fixed_k = cfg.num_draft_tokens
    k = fixed_k if fixed_k is not None else K_START
    stats = SpeculationStats(k=k)

    compiled = cfg.compile  # k is fixed then (check_config)
    pad_id = mcfg.pad_token_id
    if compiled:  # the whole budget up front: a regrowth is a new shape, so a recompile
        capacity = t + budget + k + 2
        # the draft's cache also keeps a padding slot of each round's pending block
        draft_capacity = t + 2 * budget + k + 2
    else:
        capacity = draft_capacity = t + min(budget, CHUNK) + K_MAX + 2
    target = _Cached(model, b, capacity, cfg.fuse, compiled)
    drafter = (
        None
        if isinstance(cfg.draft, str)
        else _Cached(cfg.draft, b, draft_capacity, cfg.fuse, compiled)
    )
    # compiled greedy rounds without per-position processing run as one graph (drafting and
    # verifying, token ids out); min_new_tokens and log-probs take the per-forward graphs
    fused = compiled and rule.greedy and cfg.min_new_tokens == 0 and not cfg.logprobs and k > 0
    round_fn = compiled_greedy_round(model, drafter and drafter.model, k) if fused else None

    def draft_pending(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The draft model's forward over each row's pending tokens (B, P) -> (B, V); compiled:
        a fixed-width block of 2 (left-padded), eager beyond (never with a fixed k)."""
        if not compiled or ids.shape[1] > 2:
            return drafter.forward(ids, mask, last=True)
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        if ids.shape[1] == 1:
            ids = torch.cat([torch.full_like(ids, pad_id), ids], 1)
            mask = torch.cat([torch.zeros_like(mask), mask], 1)
        return drafter.block(ids, mask)[:, -1]

    # Per running row (cache row j): its prompt row, its tokens (prompt + output), how many it
    # has emitted, and (draft model) its pending tokens: emitted but not yet in the draft cache.
    rows = list(range(b))
    real = mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    history = [ids[i][real[i]].tolist() for i in range(b)]
    emitted = [0] * b
    pending: list[list[int]] = [[] for _ in range(b)]

    # The prefill is a round with no drafts: its logits give each row's first token.
    logits = target.prefill(ids, mask)[:, None]  # (B, 1, V)
    if drafter is not None:
        drafter.prefill(ids, mask)
    drafts: list[list[int]] = [[] for _ in range(b)]
    wrote = [0] * b  # draft columns each row wrote into the target's cache this round
    q = None  # (B', k, V): the draft model's distributions, when it samples
    fed = [0] * b  # draft tokens each row fed the draft model this round
    decided = None  # a fused round's (runs, accepted): no logits to verify
    first = True
    while True:
        if decided is None:
            runs, accepted, lps = verify(logits, drafts, q, emitted, rule)
        else:
            (runs, accepted), lps = decided, None
        reasons: list[str | None] = [None] * len(runs)
        # each row's emission ends at a stop token or its budget
        for j, run in enumerate(runs):
            for i, tok in enumerate(run):
                if tok in stop_set:
                    del run[i + 1 :]
                    reasons[j] = "stop"
                    break
            if len(run) >= budget - emitted[j]:
                del run[budget - emitted[j] :]
                reasons[j] = "stop" if run[-1] in stop_set else "length"
        if not first:
            stats.rounds += 1
            stats.row_rounds += len(rows)
            stats.drafted += sum(len(d) for d in drafts)
            stats.accepted += sum(accepted)
            stats.tokens += sum(len(r) for r in runs)
        first = False

        for i in range(max(len(r) for r in runs)):
            tokens: list[int | None] = [None] * b
            finish: list[str | None] = [None] * b
            logprobs = None if lps is None else [None] * b
            for j, run in enumerate(runs):
                if i < len(run):
                    tokens[rows[j]] = run[i]
                    if logprobs is not None:
                        logprobs[rows[j]] = lps[j][i]
                    if i == len(run) - 1:
                        finish[rows[j]] = reasons[j]
            yield step_type(tokens, finish, logprobs, stats)

        # roll the rejected drafts back: the target holds [last, d_1..d_m] of this round (up
        # to k + 1 columns when compiled), the draft model pending + the `fed` drafts; both
        # keep through d_a
        m = [len(d) for d in drafts]
        target.rollback([w - a for w, a in zip(wrote, accepted)])
        if drafter is not None and any(m):
            drafter.rollback([f - min(a, f) for f, a in zip(fed, accepted)])
        for j, run in enumerate(runs):
            history[j] += run
            emitted[j] += len(run)
            if drafter is not None:
                if m[j] == 0:  # nothing drafted (the prefill, or no budget): nothing consumed
                    pending[j] = [*pending[j], *run]
                elif accepted[j] > fed[j]:  # d_a was never fed to the draft model
                    pending[j] = [drafts[j][accepted[j] - 1], run[-1]]
                else:
                    pending[j] = [run[-1]]
        if fixed_k is None:
            k = stats.k = next_k(k, sum(m), sum(accepted))

        keep = [j for j, r in enumerate(reasons) if r is None]
        if not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            target.reorder(index)
            if drafter is not None:
                drafter.reorder(index)
            rows, history, emitted, pending = (
                [x[j] for j in keep] for x in (rows, history, emitted, pending)
            )

        # draft the next round: at most the largest budget a row has left, less its own token
        kr = min(k, max(budget - e for e in emitted) - 1)
        q, decided = None, None
        if kr <= 0:
            drafts = [[] for _ in rows]
        elif drafter is None:
            drafts = [ngram_draft(h, kr) for h in history]
        elif fused:
            drafts, decided = _fused_round(
                round_fn, k, target, drafter, history, pending, kr, pad_id
            )
            wrote, fed = [k] * len(rows), [k - 1] * len(rows)
            continue
        else:
            drafts, q = draft_with_model(
                draft_pending,
                drafter.step,
                pending,
                [kr] * len(rows),
                emitted,
                [(rule, list(range(len(rows))))],
                pad_id,
                device,
            )
            fed = [len(d) - 1 for d in drafts]
        if not any(drafts):  # nothing to verify: plain decoding's fixed-shape step
            last = torch.tensor([h[-1] for h in history], device=device)
            logits = target.step(last)[:, None]  # (B', 1, V)
            wrote = [0] * len(rows)
            continue
        if fused:  # n-gram drafts, verified in one graph
            drafts, decided = _fused_round(round_fn, k, target, None, history, drafts, kr, pad_id)
            wrote = [k] * len(rows)
            continue
        if compiled:
            logits = _verify_fixed(target, history, drafts, k, pad_id, device)
            wrote = [k] * len(rows)
            continue
        block_ids, block_mask = _left_pad(
            [[h[-1], *d] for h, d in zip(history, drafts)], pad_id, device
        )
        logits = target.forward(block_ids, block_mask)  # (B', T, V)
        wrote = [len(d) for d in drafts]


def _fused_round(fn, k: int, target: _Cached, drafter, history, given, kr: int, pad_id: int):
    """One compiled greedy round (compiled_greedy_round) -> (each row's drafts, cut to kr, and
    (runs, accepted) as `verify` gives them). drafter: the draft model's _Cached, and `given`
    the rows' pending tokens (1 or 2 each, left-padded into the fixed block of 2); None: `given`
    are n-gram drafts (0 to kr each, right-padded to k). Both caches advance by k + 1 slots
    (the target: [last, d_1..d_k]; the draft model: the block of 2 and d_1..d_{k-1})."""
    parts = [target] if drafter is None else [target, drafter]
    for c in parts:
        c.room(k + 1)
    device = target.cache.valid.device
    last = torch.tensor([[h[-1]] for h in history], device=device)
    if drafter is None:
        rows = [[*d, *[pad_id] * (k - len(d))] for d in given]
        args = (last, None, None, torch.tensor(rows, device=device), target.cache, None)
    else:
        pend = torch.tensor([[pad_id] * (2 - len(p)) + p for p in given], device=device)
        mask = torch.tensor([[False] * (2 - len(p)) + [True] * len(p) for p in given])
        args = (last, pend, mask.to(device), None, target.cache, drafter.cache)
    if all("round" in c._guarded for c in parts):  # as _Cached._call, over both caches
        with skip_guards(target.model):
            out = fn(*args).tolist()
    else:
        out = fn(*args).tolist()
        for c in parts:
            c._guarded.add("round")
    for c in parts:
        c.cache.advance_host(k + 1)
    drafts, runs, accepted = [], [], []
    for j, row in enumerate(out):
        d = row[:kr] if drafter is not None else given[j]
        best = row[k:]
        a = 0
        while a < len(d) and d[a] == best[a]:
            a += 1
        drafts.append(d)
        runs.append([*d[:a], best[a]])
        accepted.append(a)
    return drafts, (runs, accepted)


def _verify_fixed(target: _Cached, history, drafts, k: int, pad_id: int, device) -> torch.Tensor:
    """The compiled verification: each row's [last, d_1..d_m] right-padded to k + 1 columns
    (the padding columns come after the real ones, so causal attention keeps them out of the
    real columns' logits, and they are rolled back with the rejected drafts) -> logits
    (B', max m + 1, V) with each row's real columns right-aligned, as `verify` reads them."""
    rows = [[h[-1], *d, *[pad_id] * (k - len(d))] for h, d in zip(history, drafts)]
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    full = target.block(ids, torch.ones_like(ids, dtype=torch.bool))  # (B', k + 1, V)
    m = torch.tensor([len(d) for d in drafts], device=device)
    width = int(m.max()) + 1
    src = (torch.arange(width, device=device)[None, :] - (width - 1 - m)[:, None]).clamp(min=0)
    return full.gather(1, src[..., None].expand(-1, -1, full.shape[-1]))


def verify(logits, drafts, q, emitted, rule: Rule):
    """One round's accept/reject over the target's logits (B', T, V), in which row j's columns
    [last, d_1..d_m_j] are right-aligned (T >= every m_j + 1; T = 1 with no drafts is plain
    decoding's choice). q: the draft model's distributions (B', >= max m_j, V), None for n-gram
    or greedy drafts; emitted: each row's tokens so far (min_new_tokens). -> (runs: each row's
    accepted drafts and its own token, accepted counts, log-probs per run or None)."""
    n, width, _ = logits.shape
    device = logits.device
    m = torch.tensor([len(d) for d in drafts], device=device)  # (B',)
    col = width - 1 - m  # each row's column of `last`
    pos = torch.arange(width, device=device)
    index = (torch.tensor(emitted, device=device)[:, None] + pos - col[:, None]).clamp(min=0)
    processed = rule.process(logits.flatten(0, 1), index.flatten())
    if rule.greedy:  # accept while the draft is the argmax: compared on the host, one transfer
        best = processed.argmax(-1).view(n, width).tolist()
        accepted, runs = [], []
        for j, d in enumerate(drafts):
            c, a = width - 1 - len(d), 0
            while a < len(d) and d[a] == best[j][c + a]:
                a += 1
            accepted.append(a)
            runs.append([*d[:a], best[j][c + a]])
        return runs, accepted, _logprobs(logits, col, runs, rule.cfg)
    p = rule.probs(processed).view(n, width, -1)
    kmax = int(m.max())
    r = torch.arange(n, device=device)
    if kmax:
        d = torch.tensor([[*x, *[0] * (kmax - len(x))] for x in drafts], device=device)
        live = torch.arange(kmax, device=device) < m[:, None]  # (B', kmax): real drafts
        cols = (col[:, None] + torch.arange(kmax, device=device)).clamp(max=width - 1)
        pd = p[r[:, None], cols, d]  # (B', kmax): p(d_i) at draft i's position
        qd = torch.ones_like(pd) if q is None else q[:, :kmax].gather(2, d[..., None]).squeeze(2)
        u = rule.accept_uniforms([len(x) for x in drafts], kmax, device)
        ok = u * qd < pd  # u < p/q, q > 0
        a = (ok & live).long().cumprod(1).sum(1)  # (B',): leading accepts
    else:
        a = torch.zeros(n, dtype=torch.long, device=device)
    # the row's own token: from p after its last accepted draft, from norm(max(0, p - q))
    # after a rejection (q a point mass for n-gram drafts)
    pr = p[r, col + a]  # (B', V)
    if kmax:
        rejected = a < m
        at = a.clamp(max=kmax - 1)
        if q is None:
            qr = torch.zeros_like(pr).scatter_(1, d[r, at][:, None], 1.0)
        else:
            qr = q[r, at]
        residual = (pr - qr).clamp_(min=0)
        use = rejected[:, None] & (residual.sum(-1, keepdim=True) > 0)
        pr = torch.where(use, residual, pr)
    own = rule.draw(pr).tolist()
    accepted = a.tolist()
    runs = [[*drafts[j][: accepted[j]], own[j]] for j in range(n)]
    return runs, accepted, _logprobs(logits, col, runs, rule.cfg)


def _logprobs(logits, col, runs, cfg) -> list[list[float]] | None:
    """Each emitted token's log-probability as plain decoding reports it (GenerationConfig
    .logprobs): log_softmax(logits / temperature), of the raw logits when greedy."""
    if not cfg.logprobs:
        return None
    scaled = logits.float() / cfg.temperature if cfg.temperature > 0 else logits.float()
    lsm = scaled.log_softmax(-1)
    return [
        [float(lsm[j, int(col[j]) + i, tok]) for i, tok in enumerate(run)]
        for j, run in enumerate(runs)
    ]


def draft_with_model(forward, step, pending, ks, emitted, parts, pad_id: int, device):
    """Each row's draft from the draft model: row j gets ks[j] >= 0 tokens.

    forward(ids (B, P), mask (B, P) or None) -> the last column's logits (B, V) feeds each row's
    pending tokens (left-padded into one block); then step(tok (B,)) -> logits (B, V), K - 1
    times (K = max ks), feeds every row a token: its draft while it has one, else a stand-in
    (the argmax) that the caller rolls back with the rejected drafts. parts: (Rule, rows) for
    the rows that draft, each drawn by its rule over its rows (sampled rows draw only while
    they draft, so a row's generator sees what it would alone). -> (drafts [B][ks[j]],
    q (B, K, V) float64 of the sampled rows' draft distributions, or None when none samples).
    """
    logits = forward(*_left_pad(pending, pad_id, device))  # (B, V)
    b, kk = len(ks), max(ks)
    base = torch.tensor(emitted, device=device)
    tokens = torch.zeros(b, kk, dtype=torch.long, device=device)
    sampled = any(not rule.greedy for rule, _ in parts)
    q = (
        torch.zeros(b, kk, logits.shape[-1], dtype=torch.float64, device=device)
        if sampled
        else None
    )
    for i in range(kk):
        tok = logits.argmax(-1)  # stand-ins for the rows without a draft at i
        for rule, rows in parts:
            live = [pos for pos, j in enumerate(rows) if ks[j] > i]
            if not live:
                continue
            idx = torch.tensor([rows[pos] for pos in live], device=device)
            processed = rule.process(logits[idx], base[idx] + i)
            if rule.greedy:
                tok[idx] = processed.argmax(-1)
            else:
                probs = rule.probs(processed)
                q[idx, i] = probs
                tok[idx] = rule.draw(probs, rows=live)
        tokens[:, i] = tok
        if i < kk - 1:
            logits = step(tok)
    out = tokens.tolist()
    return [row[: ks[j]] for j, row in enumerate(out)], q
