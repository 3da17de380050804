"""`data prepare`: a jsonl file -> token shards (shards.py's format), in parallel, streaming,
resumable.

Owns: `prepare` and its `PrepareReport`; cutting the input into chunks of lines; tokenizing
a chunk per kind (`ChunkEncoder`); the worker pool; the idempotence rules; `file_blake2b`.
Does not own: the on-disk format and its reader (shards.py), record validation (formats.py),
the chat template and loss masks (minimind.tokenizer), the command line (commands.py).

How it runs:
- The input is cut into chunks of at most `chunk_lines` lines and `chunk_bytes` bytes. The
  cuts depend on the input alone, and a shard closes at the first chunk end after it holds
  `shard_tokens` tokens, so the shards depend on the input, the tokenizer and the settings,
  never on the number of workers: 1 and N workers write byte-identical folders.
- Workers (processes, `forkserver` where available: no threads inherited) each hold the
  tokenizer and decode, validate and tokenize whole chunks; the parent reads, writes and keeps
  at most 2 chunks per worker in flight, consuming results in chunk order. Memory is bounded
  by that, whatever the input size. Each worker sets TOKENIZERS_PARALLELISM=false: the pool is
  the parallelism, one core per worker. `workers=1` runs in this process instead (the
  tokenizers library may then use its own threads unless TOKENIZERS_PARALLELISM=false).
  Workers import the caller's main module, so a script that calls `prepare(workers=N)`
  needs the usual `if __name__ == "__main__":` guard and should import torch lazily.
- Idempotence: meta.json records the blake2b of the input's content and of tokenizer.json,
  the tokenizer's special ids and the settings that shape the shards, and a cheap stamp of
  the input (size, mtime, blake2b of a few sampled blocks: `source_stamp`) that
  `cached_differences` compares without reading the whole file (training's data cache). A rerun with the same
  facts skips finished shards and resumes after the last one (at its input byte offset); a
  rerun with different facts raises `StaleShardsError` naming what changed, unless
  `overwrite`. A folder of an older format version with the same facts is ours to redo: it
  is rebuilt without asking. `on_error` is not such a setting: a finished shard has no bad line under
  "raise", so it is the same shard under "skip".
- Kill safety: see shards.py; here, leftover temp files and the files of unfinished shards
  are deleted before a run resumes.
- `max_seq_len` is the model context T. A chat or dpo document keeps its first T + 1 tokens
  (T inputs and the last label); an rlaif prompt keeps its last T tokens (the generation
  prompt must survive). Pretrain documents are never cut: packing cuts windows across them.
  Cut documents are counted as `truncated`. An sft or reasoning document whose cut leaves no
  assistant token would only train on nothing (and a batch of such rows is a step with loss 0),
  so it is dropped and counted as `untrained`: the report says to raise `max_seq_len`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minimind.tokenizer import Tokenizer, encode_chat, load_tokenizer

from . import shards as fmt

# Workers receive raw lines, not a file to open with RecordReader, so they use formats.py's
# one-line decoder directly.
from .formats import (
    BLANK,
    KINDS,
    Conversation,
    DataError,
    Kind,
    OnError,
    ReadSummary,
    Record,
    StrPath,
    check_on_error,
    decode_line,
    detect_kind,
    parse_record,
)

CHUNK_LINES = 1024
CHUNK_BYTES = 4 << 20
SHARD_TOKENS = 1 << 24  # 32 MiB of uint16 tokens per shard: the unit of resume
HASH_BLOCK = 8 << 20
SAMPLE_BLOCK = 1 << 20  # bytes per sampled block of `source_stamp`
_COUNT_KEYS = ("lines", "records", "blank_lines", "bad_lines", "truncated", "untrained")


class StaleShardsError(RuntimeError):
    """The output folder holds shards prepared from another input, tokenizer or settings."""


def file_blake2b(path: StrPath) -> str:
    """blake2b (128-bit) of a file's content, read in blocks (constant memory)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def tokenizer_file(path: StrPath) -> Path:
    """The tokenizer.json of a tokenizer folder (or the file itself)."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


_tokenizer_file = tokenizer_file


def source_stamp(path: StrPath) -> dict[str, Any]:
    """A cheap identity of a file's content: its size, mtime and the blake2b of up to three
    SAMPLE_BLOCK blocks (start, middle, end). An edit changes at least the mtime; a copy
    with the same content but another mtime differs here and is then compared by the full
    blake2b (prepare)."""
    st = os.stat(path)
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, st.st_size // 2 - SAMPLE_BLOCK // 2),
                              max(0, st.st_size - SAMPLE_BLOCK)}):  # fmt: skip
            f.seek(offset)
            h.update(f.read(SAMPLE_BLOCK))
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sample_blake2b": h.hexdigest()}


def cached_differences(
    folder: StrPath, data_path: StrPath, tokenizer: StrPath, **settings: Any
) -> list[str] | None:
    """Why `folder` is not a complete preparation of `data_path` with `tokenizer` and
    `settings` (kind, max_seq_len: the ones given are compared), judged by the input's
    stamp and the tokenizer's blake2b, never by reading the whole input. None: no prepared
    folder there; [] : up to date.
    """
    meta_path = Path(folder) / fmt.META
    if not meta_path.is_file():
        return None
    try:
        old = fmt.read_json(meta_path)
    except (OSError, ValueError):
        return ["meta.json is unreadable"]
    out = []
    if old.get("format") != fmt.FORMAT or old.get("version") != fmt.FORMAT_VERSION:
        out.append(f"format version {old.get('version')} -> {fmt.FORMAT_VERSION}")
    stamp, was = source_stamp(data_path), old.get("source", {})
    if was.get("bytes") != stamp["bytes"]:
        out.append(f"the input's size changed ({was.get('bytes')} -> {stamp['bytes']} bytes)")
    elif was.get("sample_blake2b") != stamp["sample_blake2b"]:
        out.append("the input's content changed")
    elif was.get("mtime_ns") != stamp["mtime_ns"]:
        out.append("the input was modified (mtime)")
    if old.get("tokenizer", {}).get("blake2b") != file_blake2b(tokenizer_file(tokenizer)):
        out.append("the tokenizer changed (tokenizer.json's blake2b differs)")
    for key, value in settings.items():
        if value is not None and old.get("settings", {}).get(key) != value:
            out.append(f"{key}: {old.get('settings', {}).get(key)} -> {value}")
    if not out and not old.get("complete"):
        out.append("preparation did not finish")
    return out


# ---------------------------------------------------------------- one chunk, in a worker


@dataclass
class Encoded:
    """A chunk's documents: `tokens` (N,) back to back, `lengths` (n_docs,), `mask` (N,)
    uint8 for masked kinds, `answers` (JSON lines) for rlaif, and what the lines held."""

    tokens: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray | None
    answers: list[str]
    summary: ReadSummary
    truncated: int = 0
    untrained: int = 0
    cpu_seconds: float = 0.0  # CPU time spent on this chunk, in whichever process did it

    def counts(self) -> dict[str, Any]:
        s = self.summary
        return {
            "lines": s.lines,
            "records": s.records,
            "blank_lines": s.blank_lines,
            "bad_lines": s.bad_lines,
            "reasons": dict(s.reasons),
            "truncated": self.truncated,
            "untrained": self.untrained,
        }


def _flatten(seqs: list[list[int]], dtype: np.dtype) -> np.ndarray:
    """Concatenate lists of ints into one array without a Python loop per token.

    >>> _flatten([[1, 2], [], [3]], np.dtype(np.uint16))
    array([1, 2, 3], dtype=uint16)
    """
    count = sum(map(len, seqs))
    return np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=count)


def _messages(conv: Conversation) -> list[dict[str, Any]]:
    return [m.to_dict() for m in conv.messages]


class ChunkEncoder:
    """Decodes, validates and tokenizes chunks of lines of one file: `encoder(first_line,
    lines) -> Encoded`. What a document is, per kind, is described in shards.py."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        kind: Kind,
        name: str,
        max_seq_len: int | None = None,
        on_error: OnError = "raise",
    ):
        self.tok, self.kind, self.name = tokenizer, kind, name
        self.max_seq_len, self.on_error = max_seq_len, on_error
        self.dtype = fmt.token_dtype(tokenizer.vocab_size)

    def _records(self, first_line: int, lines: list[bytes], summary: ReadSummary) -> list[Record]:
        records = []
        for lineno, raw in enumerate(lines, first_line):
            summary.lines += 1
            try:
                value = decode_line(raw, self.name, lineno)
                if value is BLANK:
                    summary.blank_lines += 1
                    continue
                record = parse_record(value, self.kind)
            except DataError as err:
                located = err if err.line is not None else err.at(self.name, lineno)
                summary.add_bad(located)
                if self.on_error == "raise":
                    raise located from None
                continue
            summary.records += 1
            records.append(record)
        return records

    def _chat(self, conv: Conversation) -> tuple[list[int], list[int]]:
        return encode_chat(self.tok, _messages(conv), conv.tools)

    def __call__(self, first_line: int, lines: list[bytes]) -> Encoded:
        cpu = time.process_time()
        summary = ReadSummary(self.name)
        records = self._records(first_line, lines, summary)
        masks: list[list[int]] | None = None
        answers: list[str] = []
        if self.kind == "pretrain":
            # bos + text + eos, as MiniMind frames a pretraining sample (shards.py).
            seqs = [
                [self.tok.bos_id, *ids, self.tok.eos_id]
                for ids in self.tok.encode_batch([r.text for r in records])
            ]
        elif self.kind in ("sft", "reasoning"):
            seqs, masks = map(list, zip(*map(self._chat, records))) if records else ([], [])
        elif self.kind == "dpo":
            pairs = [self._chat(c) for r in records for c in (r.chosen, r.rejected)]
            seqs, masks = [p[0] for p in pairs], [p[1] for p in pairs]
        else:  # rlaif
            seqs = []
            for r in records:
                msgs, tools = _messages(r.conversation)[:-1], r.conversation.tools
                seqs.append(encode_chat(self.tok, msgs, tools, add_generation_prompt=True)[0])
                answers.append(json.dumps({"answer": r.answer}, ensure_ascii=False))
        truncated = self._truncate(seqs, masks)
        untrained = 0
        if self.kind in ("sft", "reasoning") and masks is not None:
            kept = [i for i, m in enumerate(masks) if any(m[1:])]  # labels are mask[1:]
            untrained = len(seqs) - len(kept)
            seqs, masks = [seqs[i] for i in kept], [masks[i] for i in kept]
        return Encoded(
            tokens=_flatten(seqs, self.dtype),
            lengths=np.fromiter(map(len, seqs), np.int64, len(seqs)),
            mask=None if masks is None else _flatten(masks, np.dtype(np.uint8)),
            answers=answers,
            summary=summary,
            truncated=truncated,
            untrained=untrained,
            cpu_seconds=time.process_time() - cpu,
        )

    def _truncate(self, seqs: list[list[int]], masks: list[list[int]] | None) -> int:
        """Cut documents to the context in place (module docstring); returns how many."""
        T = self.max_seq_len
        if T is None or self.kind == "pretrain":
            return 0
        keep = slice(-T, None) if self.kind == "rlaif" else slice(0, T + 1)
        limit = T if self.kind == "rlaif" else T + 1
        cut = 0
        for i, ids in enumerate(seqs):
            if len(ids) > limit:
                cut += 1
                seqs[i] = ids[keep]
                if masks is not None:
                    masks[i] = masks[i][keep]
        return cut


_WORKER: ChunkEncoder | None = None


def _init_worker(tokenizer_path: str, kind: Kind, name: str, max_seq_len, on_error) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = ChunkEncoder(load_tokenizer(tokenizer_path), kind, name, max_seq_len, on_error)


def _encode_in_worker(first_line: int, lines: list[bytes]) -> Encoded:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER(first_line, lines)


# ---------------------------------------------------------------- the input, in chunks


@dataclass
class Chunk:
    start: int  # byte offset of the first line
    end: int  # byte offset after the last line
    first_line: int  # 1-based line number of the first line
    lines: list[bytes]


def read_chunks(
    path: StrPath, start: int = 0, first_line: int = 1, max_lines: int = CHUNK_LINES,
    max_bytes: int = CHUNK_BYTES,
) -> Iterator[Chunk]:  # fmt: skip
    """Chunks of whole lines from byte `start` (a line start), each at most `max_lines` lines
    and `max_bytes` bytes (or one line, if a single line is longer)."""
    with open(path, "rb") as f:
        f.seek(start)
        lines: list[bytes] = []
        size, pos, line = 0, start, first_line
        for raw in f:
            if lines and (len(lines) == max_lines or size + len(raw) > max_bytes):
                yield Chunk(pos, pos + size, line, lines)
                pos, line, lines, size = pos + size, line + len(lines), [], 0
            lines.append(raw)
            size += len(raw)
        if lines:
            yield Chunk(pos, pos + size, line, lines)


def _mp_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _encoded_chunks(
    chunks: Iterator[Chunk], encoder: ChunkEncoder, tokenizer_path: str, workers: int
) -> Iterator[tuple[Chunk, Encoded]]:
    """(chunk, its encoding) in input order; `chunk.lines` is dropped once sent."""
    if workers <= 1:
        for chunk in chunks:
            encoded = encoder(chunk.first_line, chunk.lines)
            chunk.lines = []
            yield chunk, encoded
        return
    e = encoder
    args = (tokenizer_path, e.kind, e.name, e.max_seq_len, e.on_error)
    pool = ProcessPoolExecutor(workers, _mp_context(), _init_worker, args)
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(_encode_in_worker, chunk.first_line, chunk.lines)))
            chunk.lines = []
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- the folder


_OURS = re.compile(r"^(shard_(\d{5})\..*|meta\.json(\.tmp)?)$")


def _clean(folder: Path, keep_shards: int, everything: bool = False) -> None:
    """Delete temp files and the files of shards >= keep_shards (all of ours if everything)."""
    for path in folder.iterdir():
        m = _OURS.match(path.name)
        if m is None:
            continue
        shard = m.group(2)
        stale = path.name.endswith(fmt.TMP_SUFFIX) or (
            shard is not None and int(shard) >= keep_shards
        )
        if everything or stale:
            path.unlink()


def _finished_prefix(folder: Path) -> list[dict[str, Any]]:
    records = []
    while (record := fmt.finished_shard(folder, len(records))) is not None:
        records.append(record)
    return records


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What makes an existing folder stale for a new run (empty: compatible).

    >>> a = {"version": 1, "source": {"blake2b": "x"}, "tokenizer": {"blake2b": "t"},
    ...      "settings": {"max_seq_len": 512}}
    >>> _differences(a, {**a, "settings": {"max_seq_len": 1024}})
    ['settings.max_seq_len: 512 -> 1024']
    """
    out = []
    if old.get("format") != new.get("format") or old.get("version") != new.get("version"):
        out.append(f"format version {old.get('version')} -> {new.get('version')}")
    if old.get("source", {}).get("blake2b") != new["source"]["blake2b"]:
        out.append("the input file's content changed (blake2b differs)")
    for section in ("tokenizer", "settings"):
        before, after = old.get(section, {}), new[section]
        for key in sorted(set(before) | set(after)):
            if key != "path" and before.get(key) != after.get(key):
                out.append(f"{section}.{key}: {before.get(key)} -> {after.get(key)}")
    return out


@dataclass
class PrepareReport:
    folder: Path
    kind: str
    shards: int = 0
    reused: int = 0
    docs: int = 0
    tokens: int = 0
    dtype: str = ""
    truncated: int = 0
    untrained: int = 0  # dropped: no assistant token within max_seq_len
    bytes_done: int = 0  # input bytes processed by this run
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time, plus the workers' time on chunks
    summary: ReadSummary = field(default_factory=lambda: ReadSummary(""))

    def format(self) -> str:
        rate = self.bytes_done / 1e6 / self.seconds if self.seconds else 0.0
        per_cpu = self.bytes_done / 1e6 / self.cpu_seconds if self.cpu_seconds else 0.0
        head = (
            f"{self.folder}: {self.kind}, {self.shards} shards ({self.reused} reused), "
            f"{self.docs} documents, {self.tokens} tokens ({self.dtype})"
        )
        if self.truncated:
            head += f", {self.truncated} truncated"
        if self.untrained:
            head += (
                f", {self.untrained} dropped (no assistant token within max_seq_len; raise it to "
                "train on them)"
            )
        work = (
            f"processed {self.bytes_done / 1e6:.1f} MB in {self.seconds:.1f} s ({rate:.1f} MB/s, "
            f"{per_cpu:.1f} MB per CPU-second)"
        )
        if self.reused == self.shards and not self.bytes_done:
            work = "up to date: every shard was already prepared"
        lines = [head, work]
        if self.summary.bad_lines:
            lines.append(self.summary.format())
        return "\n".join(lines)


def _merge(into: ReadSummary, part: ReadSummary) -> None:
    into.lines += part.lines
    into.records += part.records
    into.blank_lines += part.blank_lines
    into.bad_lines += part.bad_lines
    into.reasons.update(part.reasons)
    into.examples += part.examples[: max(0, into.max_examples - len(into.examples))]


def _progress(enabled: bool, total: int, done: int):
    """A started rich progress bar over input bytes on stderr, or None when disabled."""
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("prepare"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True),
    )  # fmt: skip
    bar.start()
    bar.add_task("prepare", total=total, completed=done)
    return bar


def _describe(data_path: Path, tokenizer: StrPath, tok: Tokenizer, settings: dict) -> dict:
    """The meta.json of a run that has not written anything yet."""
    tok_file = _tokenizer_file(tokenizer)
    return {
        "format": fmt.FORMAT,
        "version": fmt.FORMAT_VERSION,
        "kind": settings["kind"],
        "source": {
            "path": str(data_path.resolve()),
            **source_stamp(data_path),
            "blake2b": file_blake2b(data_path),
        },
        "tokenizer": {
            "path": str(tok_file.resolve()),
            "blake2b": file_blake2b(tok_file),
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
        },
        "settings": settings,
        "complete": False,
        "shards": [],
    }


def _totals(records: list[dict[str, Any]]) -> dict[str, int]:
    """Sums over shard records: docs, tokens and the line counts."""
    return {k: sum(r.get(k, 0) for r in records) for k in ("docs", "tokens", *_COUNT_KEYS)}


def _refuse_if_stale(folder: Path, meta: dict[str, Any]) -> None:
    meta_path = folder / fmt.META
    if meta_path.is_file():
        changes = _differences(fmt.read_json(meta_path), meta)
        if len(changes) == 1 and changes[0].startswith("format version"):
            _clean(folder, 0, everything=True)  # derived data of an older layout: redo it
            return
    else:  # shards without a meta.json cannot show what they were prepared from
        changes = ["shard files but no meta.json"] if any(folder.glob("shard_*")) else []
    if changes:
        raise StaleShardsError(
            f"{folder} holds shards prepared from something else:\n  "
            + "\n  ".join(changes)
            + "\nPass --overwrite to delete them and prepare again, or choose another --out."
        )


def prepare(
    data_path: StrPath,
    tokenizer: StrPath,
    out_dir: StrPath,
    *,
    kind: Kind | None = None,
    workers: int = 1,
    max_seq_len: int | None = None,
    on_error: OnError = "raise",
    overwrite: bool = False,
    shard_tokens: int = SHARD_TOKENS,
    chunk_lines: int = CHUNK_LINES,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = False,
) -> PrepareReport:
    """Tokenize `data_path` into shards in `out_dir` (see the module docstring).

    Raises `DataError` (file:line, field) on a bad line unless `on_error="skip"`, and
    `StaleShardsError` when `out_dir` holds shards of another input, tokenizer or settings.
    """
    check_on_error(on_error)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    if max_seq_len is not None and max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    started, cpu_started = time.perf_counter(), time.process_time()
    data_path, folder = Path(data_path), Path(out_dir)
    tok = load_tokenizer(tokenizer)
    kind = kind or detect_kind(data_path)
    dtype = fmt.token_dtype(tok.vocab_size)
    settings = {
        "kind": kind,
        "dtype": dtype.name,
        "max_seq_len": max_seq_len,
        "shard_tokens": shard_tokens,
        "chunk_lines": chunk_lines,
        "chunk_bytes": chunk_bytes,
    }
    meta = _describe(data_path, tokenizer, tok, settings)
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clean(folder, 0, everything=True)
    else:
        _refuse_if_stale(folder, meta)
    done = _finished_prefix(folder)
    _clean(folder, len(done))
    report = PrepareReport(folder, kind, dtype=dtype.name, reused=len(done))
    report.summary = ReadSummary(str(data_path))
    meta_path = folder / fmt.META
    old = fmt.read_json(meta_path) if meta_path.is_file() else {}
    if old.get("complete") and old.get("shards") == [r["name"] for r in done]:
        if old.get("source") != meta["source"]:  # same content, new stamp (touched, copied)
            fmt.write_json(meta_path, {**old, "source": meta["source"]})
    else:
        fmt.write_json(meta_path, meta)
        done += _write_shards(
            data_path, tokenizer, tok, folder, meta, done, workers, on_error, progress, report
        )
        meta.update(complete=True, shards=[r["name"] for r in done], totals=_totals(done))
        fmt.write_json(meta_path, meta)
    totals = _totals(done)
    report.shards = len(done)
    report.docs, report.tokens, report.truncated, report.untrained = (
        totals["docs"],
        totals["tokens"],
        totals["truncated"],
        totals["untrained"],
    )
    report.seconds = time.perf_counter() - started
    report.cpu_seconds += time.process_time() - cpu_started
    return report


def _write_shards(
    data_path: Path,
    tokenizer: StrPath,
    tok: Tokenizer,
    folder: Path,
    meta: dict[str, Any],
    done: list[dict[str, Any]],
    workers: int,
    on_error: OnError,
    progress: bool,
    report: PrepareReport,
) -> list[dict[str, Any]]:
    """Write the shards that follow the finished ones in `done`; returns their records."""
    settings, kind = meta["settings"], meta["kind"]
    # Resume where the last finished shard's input ended; a shard starts at a chunk start.
    byte = done[-1]["input_end"] if done else 0
    line = done[-1]["line_start"] + done[-1]["lines"] if done else 1
    chunks = read_chunks(data_path, byte, line, settings["chunk_lines"], settings["chunk_bytes"])
    encoder = ChunkEncoder(tok, kind, str(data_path), settings["max_seq_len"], on_error)
    new: list[dict[str, Any]] = []
    writer: fmt.ShardWriter | None = None
    bar = _progress(progress, meta["source"]["bytes"], byte)
    try:
        for chunk, encoded in _encoded_chunks(chunks, encoder, str(tokenizer), workers):
            if writer is None:
                start = {"input_start": chunk.start, "line_start": chunk.first_line}
                writer = fmt.ShardWriter(
                    folder, len(done) + len(new), kind, settings["dtype"], start
                )
            e = encoded
            writer.add(e.tokens, e.lengths, e.mask, e.answers, e.counts())
            _merge(report.summary, e.summary)
            report.bytes_done += chunk.end - chunk.start
            if workers > 1:  # in this process the chunk's time is already in process_time
                report.cpu_seconds += e.cpu_seconds
            byte = chunk.end
            if writer.tokens >= settings["shard_tokens"]:
                new.append(writer.finish({"input_end": byte}))
                writer = None
            if bar is not None:
                bar.update(bar.task_ids[0], completed=byte)
        if writer is not None:
            new.append(writer.finish({"input_end": byte}))
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        if bar is not None:
            bar.stop()
    return new
