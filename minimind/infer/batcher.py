"""Continuous batching: concurrent generation requests decoded together, one token per step
(or, with a draft, each row's verified drafts plus one).

Owns the scheduling of requests over token ids: a bounded waiting queue, admission into the
running batch, batched prefill, one decode step for every running row, and the removal of rows
that finish or are cancelled. It knows nothing of HTTP, text or chat templates (serve/ and the
chat layer sit above it); one worker thread owns the model, and callers talk to it through
`submit` and each request's `sink` and `cancel`.

A step (`Batcher.step`):
1. drop running rows whose request was cancelled;
2. decode: feed every running row its last token, one (R_g, 1) forward per cache group,
   choose each row's next token, hand it to the request's sink, drop finished rows;
3. admit: spend the step's prefill budget (`prefill_chunk` tokens with chunking on, else
   `max_prefill_tokens`): first the next chunk of the prompt being prefilled in chunks, then
   waiting requests up to `max_rows` rows, prefilled together (left-padded, each after the
   prefix the prefix cache holds of it); a request whose prompt is complete chooses its first
   token and its cache row joins a cache group (`KVCache.merge`) or starts one.

Design decisions:
- Exactness. Each request keeps its own `TokenChooser` (generation.py): its penalty state and
  its own seeded torch.Generator, drawn over its row only. Positions come from each row's count
  of real tokens and attention reads only valid slots, so a request decodes the tokens it would
  decode alone with `generate`, whoever it shares the batch with and whenever it arrives
  (tested for several arrival patterns, greedy and seeded sampling). Rows without penalties
  are chosen in groups: one argmax for the greedy ones, one softmax and argmax for the sampled
  ones of equal settings, each row with its own uniform draw (sampling.choose samples by
  inverse transform), so sampling costs one tiny draw per row, not a processor chain.
- Few caches, left-padded: the running rows sit in at most `max_groups` (4) KV caches of
  rows of similar length; in each, every row's slots end at the cache's last slot, so a step
  is one (R_g, 1) forward per group. New rows are prefilled in their own cache and merged
  right-aligned into the group where that pads least, or, when any merge would add more than
  `group_waste` rows x slots of padding, start a group: a 1,500-token prompt joining 16 short
  rows would otherwise make every one of them attend over 1,500 slots (a several times longer
  step on the demo model: bench/RESULTS.md, "Mixed load") and cost a copy of all of them at
  its join and again at its drop; alone it is one more small forward per step, and its group
  just goes when it finishes. A group's memory
  is bounded by its rows x (its longest row + `growth` slots): capacity grows in `growth`-slot
  chunks instead of being reserved for the whole context, and a drop copies only the kept
  rows' window (`KVCache.select`), trimming the slots nobody holds any more.
- Prefill and decode alternate within one step rather than running concurrently: on CPU both
  compete for the same cores, and a bounded prefill keeps the pause it causes to running
  streams bounded too. Without chunking a prompt is prefilled whole in one step, however long
  (a 1,500-token prompt stalls every stream for its whole prefill); with `prefill_chunk` C a
  prompt longer than the step's budget is prefilled C tokens per step into its own one-row
  cache (at most one such prompt at a time, first come first served; shorter prompts behind
  it still join with what is left of the budget), so a step costs one decode plus at most C
  prompt tokens, the stall Sarathi-Serve (Agrawal et al. 2024) and vLLM's chunked prefill
  bound the same way. Chunks attend to the cache like any later token (positions from
  `seen`), so the rows decode what an unchunked prefill gives them (tested).
- Prefix sharing. Requests waiting with the same prompt (the `n` choices of one API request)
  are one prefill: its cache row is copied into one row per choice (`reorder` with repeated
  indices), each with its own chooser. With `prefix_cache_tokens`, every prefilled prompt's
  keys/values are offered to a bounded LRU `PrefixCache` (prefix_cache.py) in 16-token
  blocks, and a new prompt starts from the longest cached prefix of it (a shared system
  prompt, an earlier turn of the conversation), at least its last token fed; `Request.cached`
  says how many tokens came from the cache (the server's `cached_tokens`). `share_prompts`
  False turns the sharing of equal prompts off (bench/serve.py --mixed measures both sides).
- Speculative decoding (`draft`: "ngram" or a draft model with the model's vocabulary;
  speculative.py holds the rule, the drafters and the verification). A decoding round of a
  group: every speculating row drafts up to its own k tokens (adapted per row from its own
  acceptance, or `num_draft_tokens`; never past its budget), one (R_g, T) forward of
  [last, drafts] blocks (right-aligned, shorter drafts left-padded) verifies them all, and each
  row emits its accepted drafts plus the target's own token; `KVCache.rollback` drops each
  row's rejected drafts, so rows advance by their own accepted lengths (a row that keeps fewer
  leaves a hole that attention skips; `select`/`merge` carry holes along). A draft model keeps
  one cache per group beside the target's, prefilled with the whole prompt when its rows join
  and placed, merged, grown and trimmed with it; it lags the emitted tokens by its rows'
  `pending` tokens, fed at the next round's start. Greedy rows emit plain decoding's tokens;
  sampled rows draw with their own generators (uniforms only for their own drafts), so a
  seeded request draws what `generate(..., draft=...)` draws for it alone (tested). Rows with
  repetition/presence/frequency penalties do not speculate (a penalty's state changes inside
  a verified block): they take one token per round from the same forward, chosen plainly.
  `stats()["speculation"]` counts drafted/accepted tokens and target forwards.
- Back-pressure, not unbounded buffering: `submit` raises `QueueFull` when `max_waiting`
  requests already wait; the server turns that into HTTP 429.
- A sink is called from the worker thread and must not block (the server's hands the token to
  its event loop with `call_soon_threadsafe`). A sink that raises has its request cancelled;
  the batch goes on.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from minimind.model import KVCache, MiniMindForCausalLM

from .generation import GenerationConfig, TokenChooser, left_pad, stop_token_ids
from .prefix_cache import PrefixCache
from .sampling import choose
from .speculative import (
    K_START,
    NGRAM,
    Rule,
    SpeculationStats,
    check_draft,
    draft_with_model,
    next_k,
    ngram_draft,
    verify,
)
from .speculative import _left_pad as block_pad

log = logging.getLogger(__name__)

# sink(token, finish_reason): one call per generated token, finish_reason None until the last
# one ("stop": it is a stop token; "length": the budget is spent). sink(None, "error") when the
# batch failed (request.error holds the exception) or the batcher closed under it.
Sink = Callable[[int | None, str | None], None]


# Totals since start. prefill_tokens: prompt tokens run through the model (once per prompt of
# a request's n choices; cached prefixes not counted); cached_tokens: prompt tokens read from the
# prefix cache instead; prefill_chunks: forwards of a chunked prompt.
COUNTERS = (
    "steps",
    "tokens",
    "admitted",
    "finished",
    "cancelled",
    "prefill_tokens",
    "cached_tokens",
    "prefill_chunks",
)


class QueueFull(RuntimeError):
    """The waiting queue holds `max_waiting` requests already."""


@dataclass(eq=False)
class Request:
    """One generation request: prompt ids, settings, where its tokens go, and its state."""

    prompt: list[int]
    config: GenerationConfig
    sink: Sink
    budget: int  # new tokens at most: max_new_tokens, capped by the room left in the context
    cancelled: bool = False
    error: BaseException | None = None
    cached: int = 0  # prompt tokens read from the prefix cache, set when it joins the batch
    closed: bool = False  # its sink has had its last call
    _batcher: Batcher | None = field(default=None, repr=False)
    key: tuple[int, ...] = field(default=(), repr=False)  # the prompt, hashable

    def __post_init__(self):
        self.key = tuple(self.prompt)

    def cancel(self) -> None:
        """Stop generating for this request (thread-safe). A waiting request leaves the queue
        now; a running row leaves the batch at the start of the next step. No more sink calls
        are made after the current one."""
        self.cancelled = True
        if self._batcher is not None:
            self._batcher._forget(self)


@dataclass(eq=False)
class _Row:
    """A running request: its chooser, tokens generated so far and stop ids; with a draft,
    whether it speculates, its draft length, its tokens (n-gram) or the tokens the draft
    model has not been fed yet."""

    request: Request
    chooser: TokenChooser
    stops: frozenset[int]
    generated: int = 0
    spec: bool = False  # drafts verified (no penalty), else plain decoding in the same forward
    rule_key: tuple = ()  # speculative.Rule.key: rows with equal keys are verified together
    k: int = 0  # its next draft length (adapted per row when num_draft_tokens is None)
    history: list[int] | None = None  # "ngram": prompt + output, where drafts are looked up
    pending: list[int] = field(default_factory=list)  # draft model: emitted, not yet fed to it


@dataclass(eq=False)
class _Group:
    """Running rows that share one left-padded KV cache: cache row j is rows[j]."""

    rows: list[_Row]
    cache: KVCache
    last: torch.Tensor  # (R,) long: each row's newest, unfed token
    draft: KVCache | None = None  # the draft model's cache of the same rows (with a draft model)


@dataclass(eq=False)
class _Job:
    """One prompt to prefill and the requests it serves (the n choices of an API request share
    one): what the prefix cache holds of it, and a chunked prefill's cache and progress."""

    prompt: list[int]
    key: tuple[int, ...]
    cached: int = 0  # prompt tokens read from the prefix cache
    requests: list[Request] = field(default_factory=list)
    cache: KVCache | None = None  # chunked: its own one-row cache, between chunks
    done: int = 0  # chunked: prompt tokens in `cache`


class Batcher:
    """The continuous-batching scheduler over one model (see the module docstring).

    Use it synchronously (`submit`, then `step()` until `idle`: tests do this to control arrival
    patterns exactly) or with its worker thread (`start()` ... `close()`).
    """

    def __init__(
        self,
        model: MiniMindForCausalLM,
        *,
        max_rows: int = 32,
        max_waiting: int = 256,
        max_len: int | None = None,
        max_prefill_tokens: int = 4096,
        growth: int = 128,
        prefill_chunk: int | None = None,
        prefix_cache_tokens: int = 0,
        share_prompts: bool = True,
        max_groups: int = 4,
        group_waste: int = 4096,
        draft: str | MiniMindForCausalLM | None = None,
        num_draft_tokens: int | None = None,
    ):
        if max_rows < 1 or max_waiting < 0 or growth < 1 or max_prefill_tokens < 1:
            raise ValueError(
                "max_rows, growth and max_prefill_tokens must be >= 1, max_waiting >= 0"
            )
        if (prefill_chunk is not None and prefill_chunk < 0) or prefix_cache_tokens < 0:
            raise ValueError("prefill_chunk and prefix_cache_tokens must be >= 0 (0: off)")
        self.model = model
        self.max_rows, self.max_waiting = max_rows, max_waiting
        ctx = model.config.max_position_embeddings
        self.max_len = min(max_len or ctx, ctx)
        self.max_prefill_tokens, self.growth = max_prefill_tokens, growth
        self.prefill_chunk = prefill_chunk or None  # None: every prompt prefilled whole
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.share_prompts = share_prompts  # False: every request prefills its own prompt
        self.max_groups, self.group_waste = max(1, max_groups), group_waste
        self.device = next(model.parameters()).device
        if draft is not None:
            check_draft(model, draft)  # a draft model's vocabulary, device; "ngram"
        if num_draft_tokens is not None and not (
            isinstance(num_draft_tokens, int) and 1 <= num_draft_tokens <= 64
        ):
            raise ValueError(f"num_draft_tokens must be in 1..64 or None, got {num_draft_tokens}")
        self.draft = draft  # None: plain decoding; "ngram"; or a draft model
        self.draft_model = None if draft is None or isinstance(draft, str) else draft
        self.num_draft_tokens = num_draft_tokens  # None: adapted per row from its acceptance
        self.speculation = SpeculationStats(k=num_draft_tokens or K_START)

        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        # Owned by whoever runs `step` (the worker thread once started):
        self._groups: list[_Group] = []  # the running rows, by cache
        self._partial: _Job | None = None  # the prompt being prefilled chunk by chunk
        self.counters = collections.Counter()  # COUNTERS

    # --- the caller's side ------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], config: GenerationConfig, sink: Sink) -> Request:
        """Queue a request; raises ValueError for a bad prompt or one that leaves no room in
        the context, QueueFull when the queue is full, RuntimeError once closed."""
        prompt = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not prompt or min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"the prompt must be a non-empty list of token ids in [0, {vocab})")
        room = min(config.max_len or self.max_len, self.max_len) - len(prompt)
        if room < 1:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) leaves no room in the context "
                f"({min(config.max_len or self.max_len, self.max_len)} tokens)"
            )
        request = Request(prompt, config, sink, min(config.max_new_tokens, room), _batcher=self)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(request)
            self._cond.notify()
        return request

    def _forget(self, request: Request) -> None:
        with self._cond:
            try:
                self._waiting.remove(request)
                self.counters["cancelled"] += 1
            except ValueError:
                pass  # running (dropped at the next step) or finished

    @property
    def _rows(self) -> list[_Row]:
        """The running rows, group after group (the order of a step's logits)."""
        return [row for group in self._groups for row in group.rows]

    @property
    def idle(self) -> bool:
        return not self._groups and not self._waiting and self._partial is None

    def stats(self) -> dict[str, int]:
        """Running rows, waiting requests, cache slots in use and allocated, and counters."""
        groups, partial = self._groups, self._partial
        return {
            "running": sum(len(g.rows) for g in groups),
            "waiting": len(self._waiting),
            "prefilling": 0 if partial is None else len(partial.requests),
            "max_rows": self.max_rows,
            "max_waiting": self.max_waiting,
            "cache_groups": len(groups),
            "cache_length": max((g.cache.length for g in groups), default=0),
            "cache_capacity": max((g.cache.max_len for g in groups), default=0),
            "cache_slots": sum(g.cache.batch_size * g.cache.max_len for g in groups),
            **{k: self.counters[k] for k in COUNTERS},
            **({} if self.prefix_cache is None else self.prefix_cache.stats()),
            **({} if self.draft is None else {"speculation": self.speculation_stats()}),
        }

    def speculation_stats(self) -> dict:
        """With a draft: drafted and accepted tokens, verification forwards of the target
        (one per cache group and round, counting rounds in which no row drafted), the
        acceptance rate and the tokens a row gains per target forward (plain decoding: 1)."""
        s = self.speculation
        return {
            "draft": NGRAM if self.draft == NGRAM else "model",
            "num_draft_tokens": self.num_draft_tokens or "adaptive",
            "drafted": s.drafted,
            "accepted": s.accepted,
            "target_forwards": s.rounds,
            "row_forwards": s.row_rounds,
            "tokens": s.tokens,
            "acceptance_rate": round(s.acceptance_rate, 4),
            "tokens_per_forward": round(s.tokens_per_forward, 4),
        }

    # --- the worker thread ------------------------------------------------------------------
    def start(self) -> Batcher:
        """Run steps in a daemon worker thread whenever there is work."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="minimind-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker; requests still waiting or running get sink(None, "error")."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            left = [row.request for row in self._rows] + list(self._waiting)
            left += [] if self._partial is None else self._partial.requests
            self._waiting.clear()
        self._groups, self._partial = [], None
        for request in left:
            request.error = RuntimeError("the server is shutting down")
            self._send(request, None, "error")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and self.idle:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as exc:  # a failed forward fails its batch, not the server
                log.exception("batch step failed")
                self._fail_running(exc)

    def _fail_running(self, exc: BaseException) -> None:
        rows, self._groups = self._rows, []
        for row in rows:
            if row.request.closed:
                continue  # failed already, with the admission that raised
            row.request.error = exc
            self._send(row.request, None, "error")

    # --- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step: drop cancelled rows, decode one token for every running row,
        prefill within the step's budget and admit the requests whose prompt is complete."""
        for group in list(self._groups):
            cancelled = [j for j, row in enumerate(group.rows) if row.request.cancelled]
            self.counters["cancelled"] += len(cancelled)
            self._drop(group, cancelled)
        if self._partial is not None and all(r.cancelled for r in self._partial.requests):
            self.counters["cancelled"] += len(self._partial.requests)
            self._partial = None  # nobody waits for this prompt any more
        if self._groups:
            self._decode()
        self._admit()
        self.counters["steps"] += 1

    def _decode(self) -> None:
        """One token for every running row: one (R_g, 1) forward per group, one choice over
        all rows (grouped sampling works across groups). With a draft, one speculative round
        per group instead (`_speculate`)."""
        if self.draft is not None:
            for group in list(self._groups):
                self._speculate(group)
            return
        logits = []
        for group in self._groups:
            cache = group.cache = self._room(group.cache, 1, group.rows)
            out = self.model(group.last[:, None], cache=cache, logits_to_keep=1)
            logits.append(out.logits[:, -1])
        rows = self._rows
        tokens = self._choose(torch.cat(logits), rows)
        finished = set(self._emit(rows, tokens))
        start = 0
        for group in list(self._groups):
            n = len(group.rows)
            group.last = tokens[start : start + n]
            self._drop(group, [j for j in range(n) if start + j in finished])
            start += n

    def _room(self, cache: KVCache, need: int, rows: Sequence[_Row]) -> KVCache:
        """`cache`, or a copy with at least `need` free slots (`growth` more, trimmed)."""
        if cache.length + need <= cache.max_len:
            return cache
        index = torch.arange(cache.batch_size, device=self.device)
        return cache.select(index, max(need, self._capacity(0, rows)))

    # --- speculative decoding (with a draft) --------------------------------------------------
    def _speculate(self, group: _Group) -> None:
        """One speculative round over a group: each speculating row drafts up to its k tokens
        (n-gram lookup in its own tokens, or the draft model over the group's draft cache),
        one (R_g, T) target forward verifies them all (rows right-aligned in the block, shorter
        drafts left-padded), each row emits its accepted drafts plus one token of the target's
        (plain rows, with penalties, choose their one token from the last column), and every
        row's rejected drafts are rolled back in both caches: rows keep their own accepted
        lengths (KVCache.rollback leaves holes that attention skips). No row drafting: the
        block is plain decoding's (R_g, 1) step."""
        rows = group.rows
        ks = [self._draft_len(row) for row in rows]
        parts = self._parts(rows)
        q, fed = None, 0  # fed: draft-model steps this round (0: it was not run)
        if not any(ks):
            drafts = [[] for _ in rows]
        elif self.draft_model is None:
            drafts = [ngram_draft(row.history, k) if k else [] for row, k in zip(rows, ks)]
        else:
            fed = max(ks)
            width = max(len(row.pending) for row in rows)
            dcache = group.draft = self._room(group.draft, width + fed - 1, rows)

            def forward(ids, mask):
                out = self.draft_model(ids, attention_mask=mask, cache=dcache, logits_to_keep=1)
                return out.logits[:, -1]

            def step(tok):
                return self.draft_model(tok[:, None], cache=dcache, logits_to_keep=1).logits[:, -1]

            emitted = [row.generated for row in rows]
            pending = [row.pending for row in rows]
            pad = self.model.config.pad_token_id
            drafts, q = draft_with_model(
                forward, step, pending, ks, emitted, parts, pad, self.device
            )
        m = [len(d) for d in drafts]
        cache = group.cache = self._room(group.cache, 1 + max(m), rows)
        if max(m):
            last = group.last.tolist()
            blocks = [[t, *d] for t, d in zip(last, drafts)]
            ids, mask = block_pad(blocks, self.model.config.pad_token_id, self.device)
            logits = self.model(ids, attention_mask=mask, cache=cache).logits  # (R, T, V)
        else:
            logits = self.model(group.last[:, None], cache=cache, logits_to_keep=1).logits
        runs, accepted = self._pick(rows, logits, drafts, q, parts)
        before = self.counters["tokens"]
        finished = self._emit_runs(rows, runs)

        stats = self.speculation
        stats.rounds += 1
        stats.row_rounds += len(rows)
        stats.drafted += sum(m)
        stats.accepted += sum(accepted)
        stats.tokens += self.counters["tokens"] - before
        # the target holds [last, d_1..d_m] of each row, the draft model (when it ran) its
        # pending tokens + `fed` - 1 drafts or stand-ins: both keep through d_a
        cache.rollback([mj - a for mj, a in zip(m, accepted)])
        if fed:
            group.draft.rollback([(fed - 1) - min(a, fed - 1) for a in accepted])
        for row, d, a, run in zip(rows, drafts, accepted, runs):
            if self.draft_model is not None:
                if not fed:  # the draft model did not run: nothing consumed
                    row.pending = [*row.pending, *run]
                elif a == fed:  # all drafted and accepted: d_k was never fed to it
                    row.pending = [d[-1], run[-1]]
                else:
                    row.pending = [run[-1]]
            if self.num_draft_tokens is None:
                row.k = next_k(row.k, len(d), a)
        stats.k = max(row.k for row in rows)
        group.last = torch.tensor([run[-1] for run in runs], device=self.device)
        self._drop(group, finished)

    def _draft_len(self, row: _Row) -> int:
        """Drafts this row proposes now: its k, less its own token, within its budget."""
        if not row.spec:
            return 0
        return max(0, min(row.k, row.request.budget - row.generated - 1))

    def _parts(self, rows: Sequence[_Row]) -> list[tuple[Rule, list[int]]]:
        """The speculating rows (their indices in `rows`) by equal sampling settings, each
        part with one Rule over its rows' own generators (a request draws as it would alone)."""
        by_key: dict[tuple, list[int]] = {}
        for j, row in enumerate(rows):
            if row.spec:
                by_key.setdefault(row.rule_key, []).append(j)
        parts = []
        for members in by_key.values():
            first = rows[members[0]]
            gens = None
            if first.request.config.temperature > 0:
                gens = [rows[j].chooser.generator for j in members]
            stops = sorted(first.stops)
            parts.append((Rule(first.request.config, stops, gens, self.device), members))
        return parts

    def _pick(self, rows, logits, drafts, q, parts) -> tuple[list[list[int]], list[int]]:
        """logits (R, T, V), row j's columns [last, d_1..d_m_j] right-aligned -> (runs: each
        row's accepted drafts and its own token, accepted counts). Speculating rows by
        `speculative.verify`, part by part; the others (penalties) choose one token from
        their last column with their own chooser, as plain decoding does."""
        runs: list[list[int]] = [[] for _ in rows]
        accepted = [0] * len(rows)
        plain = [j for j, row in enumerate(rows) if not row.spec]
        if plain:
            index = torch.tensor(plain, device=self.device)
            chosen = self._choose_plain(logits[index, -1], [rows[j] for j in plain])
            for j, token in zip(plain, chosen.tolist()):
                runs[j] = [token]
        for rule, members in parts:
            index = torch.tensor(members, device=self.device)
            got, acc, _ = verify(
                logits[index],
                [drafts[j] for j in members],
                None if q is None else q[index],
                [rows[j].generated for j in members],
                rule,
            )
            for j, run, a in zip(members, got, acc):
                runs[j], accepted[j] = run, a
        return runs, accepted

    def _draft_prefill(self, prompts: list[list[int]]) -> KVCache:
        """The draft model's cache of `prompts` (left-padded, one forward): new rows' draft
        caches, merged into their group's as their target cache rows are. Whole prompts, even
        where the target read a prefix from the cache or prefilled in chunks: the draft model
        is the small one."""
        mcfg = self.model.config
        ids, mask = left_pad(prompts, mcfg.pad_token_id, mcfg.vocab_size, self.device)
        cache = self.draft_model.new_cache(len(prompts), ids.shape[1])
        self.draft_model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
        return cache

    # --- admission: prefill (whole, chunked, or from the prefix cache) ------------------------
    def _admit(self) -> None:
        """Spend this step's prefill budget: first the chunked prompt in progress, then new
        requests from the queue; rows whose prompt is complete join the running batch. The
        chunk bounds a step only while rows decode: with none, chunking would only delay."""
        budget = self.max_prefill_tokens
        if self.prefill_chunk and self._groups:
            budget = self.prefill_chunk
        ready: list[tuple[KVCache, list[_Job], torch.Tensor]] = []  # (cache, its jobs, logits)
        jobs: list[_Job] = []
        try:
            job = self._partial
            if job is not None:
                take = min(budget, len(job.prompt) - job.done)
                logits = self._feed(job, take)
                budget -= take
                if job.done == len(job.prompt):
                    self._partial = None
                    ready.append((job.cache, [job], logits))
            jobs = self._take(budget)
            if jobs:
                ready.append(self._prefill(jobs))
            if ready:
                self._join(ready)
        except Exception as exc:  # fail the new requests; the caller fails the running ones
            failed = [r for _, group, _ in ready for j in group for r in j.requests]
            failed += [r for j in jobs for r in j.requests]
            if self._partial is not None:
                failed += self._partial.requests
                self._partial = None
            for request in dict.fromkeys(failed):  # once each, in order
                if not request.closed:
                    request.error = exc
                    self._send(request, None, "error")
            raise

    def _take(self, budget: int) -> list[_Job]:
        """Waiting requests -> the jobs to prefill whole in this step, within `budget` padded
        prompt tokens and the free rows. Requests with the same prompt (the n choices of one
        API request) share one job. The queue's head is always considered first: if it does
        not fit, it is prefilled whole alone (chunking off) or starts the chunked prefill, which
        takes the step's budget (chunking on; one chunked prompt at a time). Requests further
        back that do not fit keep their place while those behind them that fit are taken, so
        short prompts pass a long one waiting for the chunked prefill to free up."""
        if budget <= 0:
            return []
        jobs: list[_Job] = []
        by_key: dict[tuple[int, ...], _Job] = {}  # with share_prompts: a prompt's job
        partial = self._partial
        free = self.max_rows - len(self._rows) - (len(partial.requests) if partial else 0)
        longest, left, taken = 0, budget, []
        with self._cond:
            for i, request in enumerate(self._waiting):
                if free <= 0 or i >= 2 * self.max_rows:  # a bounded look past the head
                    break
                key = request.key
                job = by_key.get(key) if self.share_prompts else None
                if job is None and self.share_prompts and partial and key == partial.key:
                    job = partial  # the same prompt as the chunked prefill: it serves both
                if job is None:
                    cached = self._match(request.prompt)
                    rest = max(longest, len(request.prompt) - cached)
                    if rest * (len(jobs) + 1) <= left or (i == 0 and not self.prefill_chunk):
                        longest = rest
                        job = by_key[key] = _Job(request.prompt, key, cached)
                        jobs.append(job)
                    elif i == 0 and partial is None:
                        partial = self._partial = job = _Job(request.prompt, key, cached)
                        left = 0  # its first chunk takes the step's budget
                    else:
                        continue  # keeps its place in the queue
                job.requests.append(request)
                taken.append(i)
                free -= 1
            for i in reversed(taken):
                del self._waiting[i]
        self.counters["admitted"] += len(taken)
        if partial is not None and partial.cache is None:
            self._feed(partial, budget)  # a chunked prefill starts in the step that takes it
        return jobs

    def _match(self, prompt: list[int]) -> int:
        """Prompt tokens the prefix cache can serve; at least one token is left to feed."""
        if self.prefix_cache is None:
            return 0
        return self.prefix_cache.match(prompt, len(prompt) - 1)

    def _prefix(self, job: _Job) -> torch.Tensor | None:
        if not job.cached:
            return None
        self.counters["cached_tokens"] += job.cached
        return self.prefix_cache.get(job.prompt, job.cached)

    def _remember(self, job: _Job, cache: KVCache, row: int) -> None:
        """Offer a prefilled prompt's keys/values to the prefix cache."""
        if self.prefix_cache is not None and len(job.prompt) >= self.prefix_cache.block:
            self.prefix_cache.put(job.prompt, cache.row_slots(row))

    def _feed(self, job: _Job, tokens: int) -> torch.Tensor | None:
        """The next `tokens` prompt tokens of a chunked job into its own cache -> the last
        position's logits (1, V), or None when nothing was fed."""
        if job.cache is None:  # its first chunk: a cache sized for the prompt, prefix loaded
            job.cache = self.model.new_cache(1, len(job.prompt))
            job.cache.load_prefixes([self._prefix(job)])
            job.done = job.cached
        tokens = min(tokens, len(job.prompt) - job.done)
        if tokens <= 0:
            return None
        ids = torch.tensor([job.prompt[job.done : job.done + tokens]], device=self.device)
        logits = self.model(ids, cache=job.cache, logits_to_keep=1).logits[:, -1]
        job.done += tokens
        self.counters["prefill_tokens"] += tokens
        self.counters["prefill_chunks"] += 1
        if job.done == len(job.prompt):
            self._remember(job, job.cache, 0)
        return logits

    def _prefill(self, jobs: list[_Job]) -> tuple[KVCache, list[_Job], torch.Tensor]:
        """Whole prompts in one left-padded forward, each after its cached prefix."""
        mcfg = self.model.config
        prefixes = [self._prefix(job) for job in jobs]
        rests = [job.prompt[job.cached :] for job in jobs]
        ids, mask = left_pad(rests, mcfg.pad_token_id, mcfg.vocab_size, self.device)
        fresh = self.model.new_cache(len(jobs), max(j.cached for j in jobs) + ids.shape[1])
        fresh.load_prefixes(prefixes)
        logits = self.model(ids, attention_mask=mask, cache=fresh, logits_to_keep=1).logits
        self.counters["prefill_tokens"] += sum(map(len, rests))
        for j, job in enumerate(jobs):
            self._remember(job, fresh, j)
        return fresh, jobs, logits[:, -1]

    def _join(self, ready: list[tuple[KVCache, list[_Job], torch.Tensor]]) -> None:
        """Prefilled jobs -> running rows: each request chooses its first token from its job's
        logits; a job's cache row is copied once per request still running (an index that
        repeats: the n choices share one prefill) into a cache group (`_place`)."""
        caches, rows, firsts = [], [], []
        for cache, jobs, logits in ready:
            owner = [j for j, job in enumerate(jobs) for r in job.requests if not r.cancelled]
            new = [self._new_row(r) for job in jobs for r in job.requests if not r.cancelled]
            for job in jobs:
                for request in job.requests:
                    request.cached = job.cached
            self.counters["cancelled"] += sum(len(job.requests) for job in jobs) - len(new)
            if not new:
                continue
            index = torch.tensor(owner, device=self.device)
            first = self._choose(logits[index], new)
            done = set(self._emit(new, first))
            keep = [i for i in range(len(new)) if i not in done]
            if not keep:
                continue
            draft = None
            if self.draft_model is not None:
                draft = self._draft_prefill([job.prompt for job in jobs])
                for i in keep:
                    new[i].pending = [int(first[i])]
            caches.append((cache, draft, index[keep]))
            rows.append([new[i] for i in keep])
            firsts.append(first[keep])
        for (cache, draft, index), new, first in zip(caches, rows, firsts):
            self._place(cache, draft, index, new, first)

    def _place(
        self,
        cache: KVCache,
        draft: KVCache | None,
        index: torch.Tensor,
        rows: list[_Row],
        first: torch.Tensor,
    ) -> None:
        """New rows (cache rows `index` of their prefill's cache; an index repeats for the
        choices that share a prompt) join the group where merging them wastes the fewest
        padded slots, or start a group of their own when every merge would waste more than
        `group_waste` (rows x slots: a long prompt among short rows) and fewer than
        `max_groups` groups run. Each group is one forward per step: fewer groups, less
        per-step overhead; more, less attention over padding. `draft`: the draft model's
        cache of the same prefill rows, placed alike."""
        used = cache.used()
        best, waste = None, 0
        for group in self._groups:
            g_used, g_rows = group.cache.used(), group.cache.batch_size
            top = max(used, g_used)
            w = g_rows * (top - g_used) + len(rows) * (top - used)
            if best is None or w < waste:
                best, waste = group, w
        if best is None or (waste > self.group_waste and len(self._groups) < self.max_groups):
            extra = self._capacity(0, rows)  # room ahead, as a merge would give
            dcache = None if draft is None else draft.select(index, extra)
            self._groups.append(_Group(rows, cache.select(index, extra), first, dcache))
            return
        cache.reorder(index)
        top = max(used, best.cache.used())
        best.cache = KVCache.merge([best.cache, cache], self._capacity(top, best.rows + rows))
        if draft is not None:
            draft.reorder(index)
            top = max(draft.used(), best.draft.used())
            best.draft = KVCache.merge([best.draft, draft], self._capacity(top, best.rows + rows))
        best.rows = best.rows + rows
        best.last = torch.cat([best.last, first])

    def _new_row(self, request: Request) -> _Row:
        mcfg = self.model.config
        stops = stop_token_ids(request.config, mcfg.eos_token_id)
        prompt = torch.tensor([request.prompt], device=self.device)
        chooser = TokenChooser(request.config, prompt, None, mcfg.vocab_size, stops)
        row = _Row(request, chooser, frozenset(stops))
        if self.draft is not None:
            # penalties change inside a verified block: such a row decodes plainly, its one
            # token per round chosen from the same forward (speculative.check_config's reason)
            row.spec = chooser.seen is None and chooser.counts is None
            row.rule_key = Rule.key(request.config, sorted(stops))
            row.k = self.num_draft_tokens or K_START
            if self.draft == NGRAM:
                row.history = list(request.prompt)
        return row

    def _capacity(self, used: int, rows: Sequence[_Row]) -> int:
        """Slots to allocate for a window of `used` slots: `growth` more, or fewer when no row
        can need them (each row needs one slot per token it may still feed)."""
        ahead = max((row.request.budget - row.generated for row in rows), default=1)
        return used + max(1, min(self.growth, ahead))

    def _choose(self, logits: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
        """logits (R, V) -> next tokens (R,) long: `_choose_plain`, or with a draft the
        speculative rule with no drafts (a speculating row draws every token, its first
        included, as `generate(..., draft=...)` would for it alone)."""
        if self.draft is None:
            return self._choose_plain(logits, rows)
        no_drafts = [[] for _ in rows]
        runs, _ = self._pick(rows, logits[:, None], no_drafts, None, self._parts(rows))
        return torch.tensor([run[0] for run in runs], device=logits.device)

    def _choose_plain(self, logits: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
        """logits (R, V) -> next tokens (R,) long, each row by its own chooser.

        Rows whose choice is plain (`TokenChooser.plain`) go in groups of equal settings: one
        argmax, or one `choose` over the group with each row's own uniform; the others (with
        penalties or stop suppression) one by one.
        """
        groups: dict[tuple | None, list[int]] = {}
        for j, row in enumerate(rows):
            groups.setdefault(row.chooser.plain(row.generated), []).append(j)
        if list(groups) == [("argmax",)]:
            return logits.argmax(-1)  # the common greedy case: one op for the whole batch
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for key, members in groups.items():
            if key is None:
                for j in members:
                    out[j] = rows[j].chooser(logits[j : j + 1], rows[j].generated)[0]
                continue
            index = torch.tensor(members, device=logits.device)
            if key == ("argmax",):
                out[index] = logits[index].argmax(-1)
                continue
            _, temperature, top_k, top_p = key
            u = torch.cat([rows[j].chooser.uniform(logits.device) for j in members])  # (G, 1)
            out[index] = choose(logits[index].float(), temperature, top_k, top_p, uniform=u)
        return out

    def _emit(self, rows: Sequence[_Row], tokens: torch.Tensor) -> list[int]:
        """Hand each row its new token (tokens (R,)); return the indices of finished rows."""
        return self._emit_runs(rows, [[token] for token in tokens.tolist()])

    def _emit_runs(self, rows: Sequence[_Row], runs: Sequence[list[int]]) -> list[int]:
        """Hand each row its new tokens in order (one, or a speculative round's accepted
        drafts and own token); a row that finishes inside its run (stop token, budget,
        cancelled) gets none of the rest. -> the indices of finished rows."""
        finished = []
        for j, (row, run) in enumerate(zip(rows, runs)):
            for token in run:
                if self._emit_one(row, token):
                    finished.append(j)
                    break
        return finished

    def _emit_one(self, row: _Row, token: int) -> bool:
        """Hand a row one token -> whether the row has finished (or was cancelled)."""
        row.generated += 1
        reason = None
        if token in row.stops:
            reason = "stop"
        elif row.generated >= row.request.budget:
            reason = "length"
        if row.request.cancelled:
            self.counters["cancelled"] += 1
            return True
        if reason is None and (row.chooser.seen is not None or row.chooser.counts is not None):
            row.chooser.record(torch.tensor([token], device=self.device))
        if row.history is not None:
            row.history.append(token)
        self.counters["tokens"] += 1
        if not self._send(row.request, token, reason):
            self.counters["cancelled"] += 1
            return True
        if reason is not None:
            self.counters["finished"] += 1
            return True
        return False

    def _send(self, request: Request, token: int | None, reason: str | None) -> bool:
        """Call the request's sink; a sink that raises cancels its request."""
        try:
            request.closed = reason is not None
            request.sink(token, reason)
            return True
        except Exception:
            log.exception("a sink raised; its request is cancelled")
            request.cancelled = True
            return False

    def _drop(self, group: _Group, finished: list[int]) -> None:
        """Remove rows `finished` (indices into group.rows) from the group and its cache,
        trimming the slots no kept row holds; an emptied group goes."""
        if not finished:
            return
        gone = set(finished)
        keep = [j for j in range(len(group.rows)) if j not in gone]
        if not keep:
            self._groups.remove(group)
            return
        group.rows = [group.rows[j] for j in keep]
        index = torch.tensor(keep, device=self.device)
        group.last = group.last[index]
        group.cache = group.cache.select(index, group.cache.max_len - group.cache.length)
        if group.draft is not None:
            group.draft = group.draft.select(index, group.draft.max_len - group.draft.length)
