"""Continuous batching: concurrent generation requests decoded together, one token per step.

Owns the scheduling of requests over token ids: a bounded waiting queue, admission into the
running batch, batched prefill, one decode step for every running row, and the removal of rows
that finish or are cancelled. It knows nothing of HTTP, text or chat templates (serve/ and the
chat layer sit above it); one worker thread owns the model, and callers talk to it through
`submit` and each request's `sink` and `cancel`.

A step (`Batcher.step`):
1. drop running rows whose request was cancelled;
2. decode: feed every running row its last token, one (R, 1) forward over the shared KV cache,
   choose each row's next token, hand it to the request's sink, drop finished rows;
3. admit: take waiting requests up to `max_rows` running rows (and `max_prefill_tokens`
   padded prompt tokens per step), prefill them together (left-padded), choose their first
   token, and merge their cache rows into the running cache (`KVCache.merge`).

Design decisions:
- Exactness. Each request keeps its own `TokenChooser` (generation.py): its penalty state and
  its own seeded torch.Generator, drawn over its row only. Positions come from each row's count
  of real tokens and attention reads only valid slots, so a request decodes the tokens it would
  decode alone with `generate`, whoever it shares the batch with and whenever it arrives
  (tested for several arrival patterns, greedy and seeded sampling). Rows without penalties
  are chosen in groups: one argmax for the greedy ones, one softmax and argmax for the sampled
  ones of equal settings, each row with its own uniform draw (sampling.choose samples by
  inverse transform), so sampling costs one tiny draw per row, not a processor chain.
- One cache, left-padded: every row's slots end at the cache's last slot, so a step is one
  (R, 1) forward. New rows are prefilled in their own cache and merged in right-aligned; the
  merge also trims the slots no running row uses. Memory is bounded by `max_rows` x (the
  longest row + `growth` slots): capacity grows in `growth`-slot chunks (a merge of the cache
  with itself) instead of being reserved for the whole context, and a drop that leaves
  `growth` or more dead slots on the left trims them.
- Prefill and decode alternate within one step rather than running concurrently: on CPU both
  compete for the same cores, and a bounded prefill (`max_prefill_tokens`) keeps the pause it
  causes to running streams bounded too.
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
from .sampling import choose

log = logging.getLogger(__name__)

# sink(token, finish_reason): one call per generated token, finish_reason None until the last
# one ("stop": it is a stop token; "length": the budget is spent). sink(None, "error") when the
# batch failed (request.error holds the exception) or the batcher closed under it.
Sink = Callable[[int | None, str | None], None]


COUNTERS = ("steps", "tokens", "admitted", "finished", "cancelled")  # totals since start


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
    _batcher: Batcher | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Stop generating for this request (thread-safe). A waiting request leaves the queue
        now; a running row leaves the batch at the start of the next step. No more sink calls
        are made after the current one."""
        self.cancelled = True
        if self._batcher is not None:
            self._batcher._forget(self)


@dataclass(eq=False)
class _Row:
    """A running request: its chooser, tokens generated so far and stop ids."""

    request: Request
    chooser: TokenChooser
    stops: frozenset[int]
    generated: int = 0


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
    ):
        if max_rows < 1 or max_waiting < 0 or growth < 1 or max_prefill_tokens < 1:
            raise ValueError(
                "max_rows, growth and max_prefill_tokens must be >= 1, max_waiting >= 0"
            )
        self.model = model
        self.max_rows, self.max_waiting = max_rows, max_waiting
        ctx = model.config.max_position_embeddings
        self.max_len = min(max_len or ctx, ctx)
        self.max_prefill_tokens, self.growth = max_prefill_tokens, growth
        self.device = next(model.parameters()).device

        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        # Owned by whoever runs `step` (the worker thread once started):
        self._rows: list[_Row] = []  # cache row j is self._rows[j]
        self._cache: KVCache | None = None
        self._last: torch.Tensor | None = None  # (R,) long: each row's newest, unfed token
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
    def idle(self) -> bool:
        return not self._rows and not self._waiting

    def stats(self) -> dict[str, int]:
        """Running rows, waiting requests, cache slots in use and allocated, and counters."""
        cache = self._cache
        return {
            "running": len(self._rows),
            "waiting": len(self._waiting),
            "max_rows": self.max_rows,
            "max_waiting": self.max_waiting,
            "cache_length": 0 if cache is None else cache.length,
            "cache_capacity": 0 if cache is None else cache.max_len,
            **{k: self.counters[k] for k in COUNTERS},
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
            self._waiting.clear()
        self._rows, self._cache, self._last = [], None, None
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
        rows, self._rows, self._cache, self._last = self._rows, [], None, None
        for row in rows:
            row.request.error = exc
            self._send(row.request, None, "error")

    # --- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step: drop cancelled rows, decode one token for every running row,
        admit and prefill waiting requests."""
        cancelled = [j for j, row in enumerate(self._rows) if row.request.cancelled]
        self.counters["cancelled"] += len(cancelled)
        self._drop(cancelled)
        if self._rows:
            self._decode()
        self._admit()
        self.counters["steps"] += 1

    def _decode(self) -> None:
        cache = self._cache
        if cache.length + 1 > cache.max_len:
            cache = self._cache = KVCache.merge([cache], self._capacity(cache.used()))
        logits = self.model(self._last[:, None], cache=cache, logits_to_keep=1).logits[:, -1]
        self._last = self._choose(logits, self._rows)
        self._drop(self._emit(self._rows, self._last))

    def _admit(self) -> None:
        batch: list[Request] = []
        with self._cond:
            while self._waiting and len(self._rows) + len(batch) < self.max_rows:
                longest = max([len(r.prompt) for r in batch] + [len(self._waiting[0].prompt)])
                if batch and longest * (len(batch) + 1) > self.max_prefill_tokens:
                    break  # the padded prefill would exceed its budget; next step
                batch.append(self._waiting.popleft())
        if not batch:
            return
        self.counters["admitted"] += len(batch)
        mcfg = self.model.config
        done: set[int] = set()
        try:
            prompts = [r.prompt for r in batch]
            ids, mask = left_pad(prompts, mcfg.pad_token_id, mcfg.vocab_size, self.device)
            fresh = self.model.new_cache(len(batch), ids.shape[1])
            logits = self.model(ids, attention_mask=mask, cache=fresh, logits_to_keep=1).logits
            rows = [self._new_row(r) for r in batch]
            first = self._choose(logits[:, -1], rows)
            done.update(self._emit(rows, first))
            keep = [j for j in range(len(rows)) if j not in done]
            if not keep:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=self.device)
                fresh.reorder(index)
                first = first[index]
            rows = [rows[j] for j in keep]
            caches = [fresh] if self._cache is None else [self._cache, fresh]
            used = max(c.used() for c in caches)
            self._cache = KVCache.merge(caches, self._capacity(used, self._rows + rows))
        except Exception as exc:  # fail the new requests; the caller fails the running ones
            for j, request in enumerate(batch):
                if j not in done:
                    request.error = exc
                    self._send(request, None, "error")
            raise
        self._rows = self._rows + rows
        self._last = first if self._last is None else torch.cat([self._last, first])

    def _new_row(self, request: Request) -> _Row:
        mcfg = self.model.config
        stops = stop_token_ids(request.config, mcfg.eos_token_id)
        prompt = torch.tensor([request.prompt], device=self.device)
        chooser = TokenChooser(request.config, prompt, None, mcfg.vocab_size, stops)
        return _Row(request, chooser, frozenset(stops))

    def _capacity(self, used: int, rows: Sequence[_Row] | None = None) -> int:
        """Slots to allocate for a window of `used` slots: `growth` more, or fewer when no row
        can need them (each row needs one slot per token it may still feed)."""
        rows = self._rows if rows is None else rows
        ahead = max((row.request.budget - row.generated for row in rows), default=1)
        return used + max(1, min(self.growth, ahead))

    def _choose(self, logits: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
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
        finished = []
        for j, (row, token) in enumerate(zip(rows, tokens.tolist())):
            row.generated += 1
            reason = None
            if token in row.stops:
                reason = "stop"
            elif row.generated >= row.request.budget:
                reason = "length"
            if row.request.cancelled:
                finished.append(j)
                self.counters["cancelled"] += 1
                continue
            if reason is None and (row.chooser.seen is not None or row.chooser.counts is not None):
                row.chooser.record(tokens[j : j + 1])
            self.counters["tokens"] += 1
            if not self._send(row.request, token, reason):
                finished.append(j)
                self.counters["cancelled"] += 1
            elif reason is not None:
                finished.append(j)
                self.counters["finished"] += 1
        return finished

    def _send(self, request: Request, token: int | None, reason: str | None) -> bool:
        """Call the request's sink; a sink that raises cancels its request."""
        try:
            request.sink(token, reason)
            return True
        except Exception:
            log.exception("a sink raised; its request is cancelled")
            request.cancelled = True
            return False

    def _drop(self, finished: list[int]) -> None:
        """Remove rows `finished` (indices into self._rows) from the batch and the cache."""
        if not finished:
            return
        gone = set(finished)
        keep = [j for j in range(len(self._rows)) if j not in gone]
        self._rows = [self._rows[j] for j in keep]
        if not keep:
            self._cache = self._last = None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.reorder(index)
        self._last = self._last[index]
        used = self._cache.used()
        if self._cache.length - used >= self.growth:  # trim the dead slots on the left
            self._cache = KVCache.merge([self._cache], self._capacity(used))
