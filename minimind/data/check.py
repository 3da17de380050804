"""`data check`: validate a data file and describe it (kind, counts, bad lines, lengths).

Owns: `check_file` (one streaming pass over a file, through `formats.RecordReader`), the
`CheckReport` it returns, `LengthStats`, and `format_report` for printing.
Does not own: the record schemas and error messages (formats.py), the command line (cli.py),
chat rendering (minimind.tokenizer).

Lengths are measured per sequence and named by what was measured:
- `text_chars` / `text_tokens`: the pretrain `text`;
- `chat_chars` / `chat_tokens`: the conversation rendered with the ChatML template
  (minimind.tokenizer.chat.render), i.e. the sequence a chat stage trains on; dpo has
  `chosen_chat_*` and `rejected_chat_*`.
Token lengths need a tokenizer: any object with `encode(str)` returning a list of ids (or a
`tokenizers.Encoding`), used through its `encode_batch` when it has one, or the path of a
`tokenizer.json` (or of the folder holding one), encoded without special tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from minimind.data.formats import (
    Conversation,
    DataError,
    DPORecord,
    Kind,
    OnError,
    PretrainRecord,
    ReadSummary,
    Record,
    RecordReader,
    RLAIFRecord,
    StrPath,
    iter_json_values,
)
from minimind.tokenizer.chat import render

_DESCRIPTIONS = {
    "text": "the pretrain text",
    "chat": "the conversation rendered with the chat template",
    "chosen_chat": "the chosen conversation rendered with the chat template",
    "rejected_chat": "the rejected conversation rendered with the chat template",
}
_TOKENIZE_BATCH = 1024


@dataclass
class LengthStats:
    """An exact length distribution; memory grows with the number of distinct lengths only.

    >>> s = LengthStats()
    >>> for n in (3, 5, 5, 40):
    ...     s.add(n)
    >>> s.count, s.min, s.max, s.mean, s.quantile(0.5)
    (4, 3, 40, 13.25, 5)
    >>> s.histogram()
    [(0, 8, 3), (8, 16, 0), (16, 32, 0), (32, 64, 1)]
    >>> LengthStats(Counter({20: 1, 40: 2})).histogram()
    [(16, 32, 1), (32, 64, 2)]
    """

    counts: Counter[int] = field(default_factory=Counter)

    def add(self, n: int) -> None:
        self.counts[n] += 1

    @property
    def count(self) -> int:
        return self.counts.total()

    @property
    def min(self) -> int:
        return min(self.counts, default=0)

    @property
    def max(self) -> int:
        return max(self.counts, default=0)

    @property
    def mean(self) -> float:
        n = self.count
        return sum(k * v for k, v in self.counts.items()) / n if n else 0.0

    def quantile(self, q: float) -> int:
        """The smallest length with at least a fraction `q` of sequences at or below it."""
        need, seen = q * self.count, 0
        for length in sorted(self.counts):
            seen += self.counts[length]
            if seen >= need:
                return length
        return 0

    def histogram(self) -> list[tuple[int, int, int]]:
        """(low, high, count) buckets [low, high): [0, 8), [8, 16), then doubling; from the
        bucket holding the minimum to the one holding the maximum."""
        buckets, low, high = [], 0, 8
        while True:
            if high > self.min:
                count = sum(v for k, v in self.counts.items() if low <= k < high)
                buckets.append((low, high, count))
            if high > self.max:
                return buckets
            low, high = high, high * 2


@dataclass
class CheckReport:
    """What `check_file` found. `kind` is None when it could not be detected."""

    path: str
    kind: Kind | None
    kind_detected: bool
    lines: int
    records: int
    blank_lines: int
    bad_lines: int
    bad_reasons: dict[str, int]
    bad_examples: list[str]
    lengths: dict[str, LengthStats]
    stopped_early: bool = False  # max_records was reached before the end of the file


def _token_counter(tokenizer: Any) -> Callable[[list[str]], list[int]] | None:
    """A function from a batch of texts to their token counts, or None without a tokenizer."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, str | PathLike):
        from tokenizers import Tokenizer  # only `data check` with a tokenizer file needs it

        path = Path(tokenizer)
        loaded = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
        return lambda texts: [
            len(e.ids) for e in loaded.encode_batch(texts, add_special_tokens=False)
        ]
    # encode_batch, where there is one, runs in parallel in Rust (tokenizers and our Tokenizer).
    batch = getattr(tokenizer, "encode_batch", None)
    if callable(batch):
        return lambda texts: [len(getattr(out, "ids", out)) for out in batch(texts)]
    encode = getattr(tokenizer, "encode", None)
    if not callable(encode):
        raise TypeError("tokenizer must have an encode(str) method or be a tokenizer.json path")
    return lambda texts: [len(getattr(out, "ids", out)) for out in map(encode, texts)]


def _rendered(conv: Conversation) -> str:
    return render([m.to_dict() for m in conv.messages], tools=conv.tools)


def _measured(record: Record) -> list[tuple[str, str]]:
    """(name, string) pairs whose lengths are recorded for one record."""
    if isinstance(record, PretrainRecord):
        return [("text", record.text)]
    if isinstance(record, DPORecord):
        return [
            ("chosen_chat", _rendered(record.chosen)),
            ("rejected_chat", _rendered(record.rejected)),
        ]
    conv = record.conversation if isinstance(record, RLAIFRecord) else record
    return [("chat", _rendered(conv))]


def check_file(
    path: StrPath,
    kind: Kind | None = None,
    tokenizer: Any = None,
    on_error: OnError = "skip",
    *,
    max_records: int | None = None,
    max_examples: int = 5,
) -> CheckReport:
    """Validate `path` as `kind` (detected when None) and measure its records.

    With `on_error="skip"` (the default) bad lines are counted and the first `max_examples` are
    kept; with `"raise"` the first bad line raises `DataError`. When the kind cannot be detected
    the report has `kind=None` and counts only the lines that are not JSON at all.
    `max_records` stops after that many valid records (`stopped_early` says so).
    """
    count_tokens = _token_counter(tokenizer)
    try:
        reader = RecordReader(path, kind, on_error=on_error, max_examples=max_examples)
    except DataError as err:
        if kind is not None or err.reason != "undetectable" or on_error == "raise":
            raise
        summary = ReadSummary(str(path), max_examples=max_examples)
        for _ in iter_json_values(path, summary, "skip"):
            pass
        return _report(summary, None, True, {}, False)

    lengths: dict[str, LengthStats] = {}
    pending: list[tuple[str, str]] = []  # (name, text) waiting to be tokenized in one batch

    def tokenize_pending() -> None:
        if count_tokens is not None and pending:
            for (name, _), n in zip(pending, count_tokens([text for _, text in pending])):
                lengths.setdefault(f"{name}_tokens", LengthStats()).add(n)
        pending.clear()

    stopped = False
    for record in reader:
        for name, text in _measured(record):
            lengths.setdefault(f"{name}_chars", LengthStats()).add(len(text))
            pending.append((name, text))
        if len(pending) >= _TOKENIZE_BATCH:
            tokenize_pending()
        if max_records is not None and reader.summary.records >= max_records:
            stopped = True
            break
    tokenize_pending()
    return _report(reader.summary, reader.kind, kind is None, lengths, stopped)


def _report(
    s: ReadSummary, kind: Kind | None, detected: bool, lengths: dict, stopped: bool
) -> CheckReport:
    return CheckReport(
        path=s.path,
        kind=kind,
        kind_detected=detected,
        lines=s.lines,
        records=s.records,
        blank_lines=s.blank_lines,
        bad_lines=s.bad_lines,
        bad_reasons=dict(s.reasons.most_common()),
        bad_examples=list(s.examples),
        lengths=lengths,
        stopped_early=stopped,
    )


def format_report(report: CheckReport, *, bar_width: int = 40) -> str:
    """The report as text for a terminal: counts, bad-line examples, length histograms.

    >>> r = CheckReport("a.jsonl", "pretrain", True, 3, 2, 0, 1, {"invalid_json": 1},
    ...                 ["a.jsonl:2: invalid JSON"], {"text_chars": LengthStats(Counter({5: 2}))})
    >>> print(format_report(r, bar_width=4))
    a.jsonl
      kind: pretrain (detected)
      lines: 3 = 2 records + 1 bad + 0 blank
      bad lines by reason: invalid_json 1
        a.jsonl:2: invalid JSON
      text_chars (the pretrain text): n=2 min=5 p50=5 p90=5 p99=5 max=5 mean=5.0
        [0, 8) 2 ####
    """
    kind = "unknown (could not be detected)" if report.kind is None else report.kind
    how = " (detected)" if report.kind_detected and report.kind is not None else ""
    out = [report.path, f"  kind: {kind}{how}"]
    counts = (
        f"  lines: {report.lines} = {report.records} records + {report.bad_lines} bad"
        f" + {report.blank_lines} blank"
    )
    if report.stopped_early:
        counts += f" (stopped after {report.records} records)"
    out.append(counts)
    if report.bad_reasons:
        out.append(
            "  bad lines by reason: " + ", ".join(f"{r} {n}" for r, n in report.bad_reasons.items())
        )
        out.extend(f"    {e}" for e in report.bad_examples)
    for name, stats in report.lengths.items():
        measured = _DESCRIPTIONS[name.rsplit("_", 1)[0]]
        summary = " ".join(
            [
                f"n={stats.count} min={stats.min}",
                *(f"p{round(q * 100)}={stats.quantile(q)}" for q in (0.5, 0.9, 0.99)),
                f"max={stats.max} mean={stats.mean:.1f}",
            ]
        )
        out.append(f"  {name} ({measured}): {summary}")
        buckets = stats.histogram()
        peak = max(c for _, _, c in buckets) or 1
        label_width = max(len(f"[{lo}, {hi})") for lo, hi, _ in buckets)
        count_width = len(str(peak))
        for lo, hi, c in buckets:
            bar = "#" * round(bar_width * c / peak)
            out.append(f"    {f'[{lo}, {hi})':<{label_width}} {c:>{count_width}} {bar}".rstrip())
    return "\n".join(out)
