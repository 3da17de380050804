"""Batched, streaming generation over token ids with the preallocated KV cache.

Owns the decoding loop: left-pad the prompts into one batch, prefill them in one forward pass,
then feed one token per row per step, applying the logits processors of sampling.py, until each
row meets a stop token or its length budget. It knows nothing of text: no tokenizer, no chat
template (those belong to the tokenizer and the chat/serve layers above). It does not change
the model's train/eval mode; callers put the model in eval mode (dropout off).

Design decisions:
- Left padding, so every row's next token sits in the last column and one (B, 1) step serves
  the whole batch; the model counts positions over real tokens only, so a padded row decodes
  exactly as it would alone.
- The cache is sized to the longest prompt plus the token budget, not to the model's maximum
  context: the buffers are allocated (and zeroed) once per call.
- Decode steps run over a StaticKVCache (steps.py: fixed shapes, no host sync, optionally
  compiled with `compile=True`).
- A row that finishes is dropped from the batch at once (`KVCache.reorder`), rather than
  decoded along and ignored: a drop copies the cache once, while a dead row costs its share of
  every later step (attention over its keys, the head, the processors). The measured trade is
  in bench/RESULTS.md ("Why the code is shaped so").
- One host transfer per step (the new tokens, needed anyway to stream them and to test the
  stop condition); the processors run on the device.
- With GenerationConfig.draft, `stream` hands the call to speculative.py (a draft model or
  n-gram prompt lookup proposes tokens that the model verifies several at a time).
- The choice of a token and its state (penalties, seeded generator) is `TokenChooser`, shared
  with the continuous batcher (batcher.py), which keeps one per request: the same code path is
  what makes a batched request sample exactly as it does here alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from minimind.model import MiniMindForCausalLM

from .sampling import choose, presence_frequency_penalty, repetition_penalty
from .steps import Stepper


@dataclass
class GenerationConfig:
    """What to generate and how to choose tokens; validated at construction.

    temperature 0 means greedy (top_k/top_p then have no effect). stop_token_ids None means
    the model's eos token. The stop token that ends a row is included in its output.
    max_len caps prompt + new tokens in the cache (None: the model's max_position_embeddings).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    repetition_penalty: float = 1.0  # over prompt and generated tokens (CTRL / transformers)
    presence_penalty: float = 0.0  # over generated tokens (OpenAI)
    frequency_penalty: float = 0.0  # over generated tokens (OpenAI)
    stop_token_ids: Sequence[int] | None = None
    min_new_tokens: int = 0  # stop tokens are suppressed before this many new tokens
    # Seeds a private torch.Generator: the same seed, prompts and settings give the same tokens.
    # None draws a fresh seed. The global RNG is never used.
    seed: int | None = None
    max_len: int | None = None
    # Execution, not choice: decode steps through torch.compile (steps.py). Same tokens up to
    # float reassociation; the first call compiles (tens of seconds on a CPU). With a draft:
    # speculative.py's fixed-shape verification and draft steps (needs num_draft_tokens).
    compile: bool = False
    # fuse=False never touches parameter storage (decoding from a model being trained, see
    # MiniMindForCausalLM.new_cache); same tokens, a little slower.
    fuse: bool = True
    # Also return each chosen token's log-probability under the distribution it was sampled
    # from before top-k/top-p and penalties: log_softmax(logits / temperature), or of the
    # raw logits when greedy (Step.logprobs, Completion.logprobs). For RL rollouts.
    logprobs: bool = False
    # Speculative decoding (speculative.py): a draft model with the target's vocabulary, or
    # "ngram" (prompt lookup, no second model), proposes num_draft_tokens tokens per row that
    # the model checks in one forward; None: no speculation. Greedy output is unchanged and
    # sampled output keeps the model's distribution (the accept/reject rule).
    draft: Any = field(default=None, repr=False)
    # Draft tokens per round; None adapts it to the acceptance (starting at 4; not compiled).
    num_draft_tokens: int | None = None

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            errors.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            errors.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            errors.append(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            errors.append(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                errors.append(f"{name} must be finite, got {value}")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            errors.append(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if self.max_len is not None and self.max_len < 2:
            errors.append(f"max_len must be >= 2, got {self.max_len}")
        if self.stop_token_ids is not None:
            self.stop_token_ids = tuple(self.stop_token_ids)
            if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
                errors.append(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids}")
        if self.num_draft_tokens is not None and (
            not isinstance(self.num_draft_tokens, int) or not 1 <= self.num_draft_tokens <= 64
        ):
            errors.append(
                f"num_draft_tokens must be an integer in 1..64 or None (adaptive), got "
                f"{self.num_draft_tokens!r}"
            )
        if isinstance(self.draft, str) and self.draft != "ngram":
            errors.append(f"draft must be a model, 'ngram' or None, got {self.draft!r}")
        if errors:
            raise ValueError("invalid GenerationConfig: " + "; ".join(errors))


class Completion(list):
    """One row's generated token ids (a plain list[int]) plus `finish_reason`: "stop" when it
    ended on a stop token (the last id), "length" when it ran out of budget; and `logprobs`
    (one float per token) when GenerationConfig.logprobs was set; `speculation` (the call's
    speculative.SpeculationStats) when GenerationConfig.draft was set."""

    def __init__(self, tokens: Sequence[int] = (), finish_reason: str | None = None):
        super().__init__(tokens)
        self.finish_reason = finish_reason
        self.logprobs: list[float] | None = None
        self.speculation = None

    def __repr__(self) -> str:
        return f"Completion({list(self)!r}, finish_reason={self.finish_reason!r})"


@dataclass
class Step:
    """One decoding step, for every prompt row in order.

    tokens[i]: the new token of row i, or None when row i had finished before this step (with
    a draft, also when row i's accepted run in this round ended before the step).
    finish_reasons[i]: "stop" / "length" on the step at which row i finishes, else None.
    """

    tokens: list[int | None]
    finish_reasons: list[str | None]
    logprobs: list[float | None] | None = None  # when GenerationConfig.logprobs
    # with GenerationConfig.draft: the call's running speculative.SpeculationStats
    speculation: Any = None


def stop_token_ids(cfg: GenerationConfig, eos_token_id: int) -> tuple[int, ...]:
    """The ids that end a row: cfg.stop_token_ids, or the model's eos when that is None."""
    return tuple(cfg.stop_token_ids) if cfg.stop_token_ids is not None else (eos_token_id,)


def _resolve(config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    if config is None:
        return GenerationConfig(**overrides)
    return dataclasses.replace(config, **overrides) if overrides else config


def left_pad(
    prompts: list[list[int]], pad_id: int, vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts right-aligned into one batch: -> ids (B, T) long and mask (B, T) bool (None
    when no row is padded). Rejects empty prompts and ids outside [0, vocab_size)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, t - len(p) :] = True
    lo, hi = int(ids[mask].min()), int(ids[mask].max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {lo}..{hi}")
    return ids.to(device), (None if bool(mask.all()) else mask.to(device))


def stream(
    model: MiniMindForCausalLM,
    prompts: list[list[int]],
    config: GenerationConfig | None = None,
    **overrides,
) -> Iterator[Step]:
    """An iterator of one `Step` per decoding step, until every row has finished.

    `config` and/or keyword overrides of GenerationConfig's fields, e.g.
    `stream(model, [[1, 2, 3]], max_new_tokens=16, temperature=0)`. Bad arguments raise here,
    at the call, not at the first step.
    """
    cfg = _resolve(config, overrides)
    mcfg = model.config
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, mcfg.pad_token_id, mcfg.vocab_size, device)
    max_len = cfg.max_len or mcfg.max_position_embeddings
    budget = min(cfg.max_new_tokens, max_len - ids.shape[1])
    if budget < 1:
        raise ValueError(
            f"the longest prompt ({ids.shape[1]} tokens) leaves no room in max_len={max_len}"
        )
    if cfg.draft is not None:
        from . import speculative  # imports this module

        speculative.check_draft(model, cfg.draft)
        speculative.check_config(cfg)
        return speculative.speculative_decode(model, ids, mask, cfg, budget, Step)
    return _decode(model, ids, mask, cfg, budget)


class TokenChooser:
    """The next-token choice of one GenerationConfig over a batch of rows, with its state.

    Owns what the choice remembers between steps: which tokens each row has seen (repetition
    penalty: prompt and output), how often each was generated (presence/frequency), and the
    seeded torch.Generator. `generate` makes one for its whole batch; the continuous batcher
    (batcher.py) one per request, with one row, so a request samples exactly as it would alone.

    ids (B, T) long, mask (B, T) bool or None (left padding) are the prompts.
    """

    def __init__(
        self,
        cfg: GenerationConfig,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        vocab_size: int,
        stop_ids: Sequence[int],
    ):
        self.cfg = cfg
        b, device = ids.shape[0], ids.device
        # seen (B, V) bool: in prompt or output; counts (B, V): occurrences in the output.
        self.seen = self.counts = None
        if cfg.repetition_penalty != 1.0:
            real = torch.ones_like(ids, dtype=torch.float32) if mask is None else mask.float()
            self.seen = torch.zeros(b, vocab_size, device=device).scatter_add_(1, ids, real) > 0
        if cfg.presence_penalty != 0.0 or cfg.frequency_penalty != 0.0:
            self.counts = torch.zeros(b, vocab_size, device=device)
        self.generator = None
        if cfg.temperature > 0:
            self.generator = torch.Generator(device=device)
            if cfg.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(cfg.seed)
        self.stop_tensor = torch.tensor(tuple(stop_ids), dtype=torch.long, device=device)

    def plain(self, step: int) -> tuple | None:
        """When no processor changes the logits at `step` (no penalty, no stop suppression),
        what the choice is: ("argmax",) or ("sample", temperature, top_k, top_p); else None.
        Rows with the same answer may be chosen together (`sampling.choose` with each row's
        `uniform`), exactly as each alone."""
        cfg = self.cfg
        if self.seen is not None or self.counts is not None:
            return None
        if step < cfg.min_new_tokens and self.stop_tensor.numel() > 0:
            return None
        if cfg.temperature == 0:
            return ("argmax",)
        return ("sample", cfg.temperature, cfg.top_k, cfg.top_p)

    def uniform(self, device: torch.device) -> torch.Tensor:
        """This row's next sampling draw (1, 1), as `__call__` would draw it for one row."""
        return torch.rand(1, 1, generator=self.generator, device=device)

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """logits (B, V) of the step-th new token -> token ids (B,)."""
        cfg = self.cfg
        logits = logits.float()
        if self.seen is not None:
            logits = repetition_penalty(logits, self.seen, cfg.repetition_penalty)
        if self.counts is not None:
            logits = presence_frequency_penalty(
                logits, self.counts, cfg.presence_penalty, cfg.frequency_penalty
            )
        if step < cfg.min_new_tokens:
            logits = logits.index_fill(1, self.stop_tensor, float("-inf"))
        return choose(logits, cfg.temperature, cfg.top_k, cfg.top_p, self.generator)

    def keep(self, index: torch.Tensor) -> None:
        """Keep rows `index` (LongTensor) of the penalty state, as KVCache.reorder does."""
        self.seen = None if self.seen is None else self.seen[index]
        self.counts = None if self.counts is None else self.counts[index]

    def record(self, tok: torch.Tensor) -> None:
        """Count the chosen tokens tok (B,) of the rows that go on."""
        rows = torch.arange(tok.shape[0], device=tok.device)
        if self.seen is not None:
            self.seen[rows, tok] = True
        if self.counts is not None:
            self.counts[rows, tok] += 1


@torch.inference_mode()
def _decode(
    model: MiniMindForCausalLM,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    cfg: GenerationConfig,
    budget: int,
) -> Iterator[Step]:
    """The loop behind `stream`: ids (B, T) left-padded, mask (B, T) or None, budget >= 1."""
    mcfg = model.config
    device = ids.device
    b, t = ids.shape
    stop_ids = stop_token_ids(cfg, mcfg.eos_token_id)
    stepper = Stepper(model, b, t, budget, compile=cfg.compile, fuse=cfg.fuse)
    chooser = TokenChooser(cfg, ids, mask, mcfg.vocab_size, stop_ids)
    stop_set = set(stop_ids)

    # cache row j holds prompt row rows[j] (None: finished, decoded along when rows cannot be
    # dropped, see steps.py)
    rows: list[int | None] = list(range(b))
    logits = stepper.prefill(ids, mask)
    for step in range(budget):
        tok = chooser(logits, step)  # (b',), b' = rows in the cache

        tokens: list[int | None] = [None] * b
        reasons: list[str | None] = [None] * b
        logprobs: list[float | None] | None = None
        if cfg.logprobs:
            scaled = logits.float() / cfg.temperature if cfg.temperature > 0 else logits.float()
            lp = (scaled.gather(1, tok[:, None]).squeeze(1) - scaled.logsumexp(-1)).tolist()
            logprobs = [None] * b
        keep = []  # cache rows that go on
        for j, token in enumerate(tok.tolist()):
            if rows[j] is None:
                continue
            tokens[rows[j]] = token
            if logprobs is not None:
                logprobs[rows[j]] = lp[j]
            if token in stop_set:
                reasons[rows[j]] = "stop"
            elif step == budget - 1:
                reasons[rows[j]] = "length"
            else:
                keep.append(j)
        yield Step(tokens, reasons, logprobs)
        if not keep:
            return

        if len(keep) < sum(r is not None for r in rows):
            if stepper.drops_rows:
                index = torch.tensor(keep, device=device)
                stepper.reorder(index)
                chooser.keep(index)
                tok = tok[index]
                rows = [rows[j] for j in keep]
            else:
                rows = [r if j in keep else None for j, r in enumerate(rows)]
        chooser.record(tok)
        logits = stepper.step(tok)


def generate(
    model: MiniMindForCausalLM,
    prompts: list[list[int]],
    config: GenerationConfig | None = None,
    **overrides,
) -> list[Completion]:
    """The new tokens of each prompt (stop token included), with its finish reason.

    Arguments as for `stream`, e.g. `generate(model, prompts, max_new_tokens=64, top_p=0.9,
    seed=0)`, or with speculative decoding `generate(model, prompts, max_new_tokens=64,
    draft="ngram")`. Each Completion is a list[int] with a `.finish_reason` attribute.
    """
    out = [Completion() for _ in prompts]
    for step in stream(model, prompts, config, **overrides):
        if step.speculation is not None:
            for completion in out:
                completion.speculation = step.speculation
        lps = step.logprobs if step.logprobs is not None else [None] * len(out)
        for completion, token, reason, lp in zip(out, step.tokens, step.finish_reasons, lps):
            if token is not None:
                completion.append(token)
                if lp is not None:
                    if completion.logprobs is None:
                        completion.logprobs = []
                    completion.logprobs.append(lp)
            if reason is not None:
                completion.finish_reason = reason
    return out
