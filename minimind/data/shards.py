"""Token shards on disk: the folder format, its writer and its memory-mapped reader.

Owns: the layout of a prepared folder (below), `token_dtype`, `ShardWriter` (one shard,
written through temp files and published by renames), `Shards` (the reader: documents,
masks and any token range of the whole stream, through `np.memmap`), and `atomic_write_text`.
Does not own: turning jsonl into shards (prepare.py: parsing, tokenizing, workers,
idempotence), batching (packing.py, padding.py), data order (sampler.py).

A prepared folder:

    meta.json                  what was prepared from what: the input's and the tokenizer's
                               blake2b, the settings, `complete`, the shard names, totals
    shard_00000.tokens.bin     the token stream, raw little-endian uint16 (vocabulary up to
                               65536 ids) or uint32; documents back to back
    shard_00000.index.bin      int64 document offsets into this shard's tokens, n_docs + 1
                               values from 0: document i is tokens[index[i]:index[i+1]]
    shard_00000.mask.bin       (sft, reasoning, dpo) uint8 per token: 1 = trained (the
                               assistant targets of `encode_chat`); one byte, not one bit,
                               so a mask slice is a plain memmap slice like the tokens
    shard_00000.answers.jsonl  (rlaif) one line per document: {"answer": str | null}
    shard_00000.json           the shard's record, written last: counts, input byte and
                               line range, file sizes. A shard is finished iff this file
                               exists and every file it names has the size it records

What a document is, per kind:
- pretrain: bos, the text's ids, eos (`<|im_start|>` ... `<|im_end|>`, ids 1 and 2 in
  MiniMind2's vocabulary), as MiniMind frames a pretraining sample: the bos embedding, also
  the first token of every chat turn, is trained from the first stage on, and a document
  read with a leading bos is what the model saw. (Version 1 folders framed `text + eos`;
  readers refuse them and training's data cache rebuilds them.)
- sft, reasoning: the conversation as `encode_chat` renders it, with its loss mask.
- dpo: two documents per record, chosen at 2i and rejected at 2i + 1, each with its mask;
  one stream with pair-aligned indexes keeps a pair in the same shard and makes pair i two
  contiguous reads.
- rlaif: the prompt (every message but the last) rendered with the generation prompt; the
  `answer` of the record in the side file, line for line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from minimind.fsutil import AtomicFile

FORMAT = "minimind-shards"
FORMAT_VERSION = 2  # 2: pretrain documents begin with bos
META = "meta.json"
MASKED_KINDS = ("sft", "reasoning", "dpo")  # kinds with a loss-mask file
TMP_SUFFIX = ".tmp"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of the vocabulary.

    >>> token_dtype(6400), token_dtype(65536), token_dtype(65537)
    (dtype('uint16'), dtype('uint16'), dtype('uint32'))
    """
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(index: int) -> str:
    """The file-name stem of shard `index`.

    >>> shard_name(7)
    'shard_00007'
    """
    return f"shard_{index:05d}"


def _atomic(path: Path) -> AtomicFile:
    # Temp names `NAME.tmp` (not fsutil's random hidden ones): prepare.py's clean-up knows them.
    return AtomicFile(path, tmp=path.with_name(path.name + TMP_SUFFIX))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` through a temp file, fsync, rename (fsutil.AtomicFile): a reader sees the
    old file or the new one, never half of one, whatever kills the writer."""
    with _atomic(path) as out:
        out.tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def shard_files(kind: str) -> dict[str, str]:
    """{role: file suffix} of one shard of `kind`.

    >>> sorted(shard_files("dpo")), sorted(shard_files("rlaif"))
    (['index', 'mask', 'tokens'], ['answers', 'index', 'tokens'])
    """
    files = {"tokens": ".tokens.bin", "index": ".index.bin"}
    if kind in MASKED_KINDS:
        files["mask"] = ".mask.bin"
    if kind == "rlaif":
        files["answers"] = ".answers.jsonl"
    return files


def finished_shard(folder: Path, index: int) -> dict[str, Any] | None:
    """The record of shard `index` when it is finished (see the module docstring), else None."""
    record_path = folder / f"{shard_name(index)}.json"
    if not record_path.is_file():
        return None
    try:
        record = read_json(record_path)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return None
    for name, size in record["files"].items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size:
            return None
    return record


class ShardWriter:
    """Writes one shard, streaming: `add` appends a chunk of documents, `finish` publishes.

    Every file goes to `<name>.tmp` first (an fsutil.AtomicFile); `finish` commits them, then
    writes the shard record last, so a shard killed at any point has no record and is rewritten
    by the next run. Memory holds one chunk, whatever the shard's size.
    """

    def __init__(self, folder: Path, index: int, kind: str, dtype: np.dtype, start: dict[str, int]):
        self.folder, self.index, self.dtype = folder, index, np.dtype(dtype)
        self.name = shard_name(index)
        self.paths = {role: folder / (self.name + suf) for role, suf in shard_files(kind).items()}
        self.outs = {role: _atomic(p) for role, p in self.paths.items()}
        # Open across add() calls until finish() or abort(): a context manager cannot span them.
        self.files = {role: open(out.tmp, "wb") for role, out in self.outs.items()}  # noqa: SIM115
        self.start = dict(start)  # input_start (byte), line_start: where this shard's input begins
        self.tokens = self.docs = 0
        self.counts: dict[str, Any] = {}
        np.zeros(1, np.int64).tofile(self.files["index"])  # index[0] = 0

    def add(
        self,
        tokens: np.ndarray,
        lengths: np.ndarray,
        mask: np.ndarray | None = None,
        answers: Iterable[str] = (),
        counts: dict[str, Any] | None = None,
    ) -> None:
        """Append documents: `tokens` (N,) back to back, `lengths` (n_docs,), `mask` (N,) uint8
        for masked kinds, `answers` one JSON line each for rlaif; `counts` are summed into the
        shard record (numbers, and dicts of numbers)."""
        self.files["tokens"].write(np.ascontiguousarray(tokens, self.dtype).tobytes())
        ends = self.tokens + np.cumsum(lengths, dtype=np.int64)
        self.files["index"].write(ends.tobytes())
        if "mask" in self.files:
            self.files["mask"].write(np.ascontiguousarray(mask, np.uint8).tobytes())
        if "answers" in self.files:
            self.files["answers"].write("".join(a + "\n" for a in answers).encode("utf-8"))
        self.tokens += len(tokens)
        self.docs += len(lengths)
        for key, value in (counts or {}).items():
            if isinstance(value, dict):
                into = self.counts.setdefault(key, {})
                for k, v in value.items():
                    into[k] = into.get(k, 0) + v
            else:
                self.counts[key] = self.counts.get(key, 0) + value

    def finish(self, end: dict[str, int]) -> dict[str, Any]:
        """Publish the shard; `end` holds input_end, the byte after its input. Returns its
        record."""
        sizes = {}
        for role, f in self.files.items():
            f.close()
            path = self.outs[role].commit()  # fsync, rename, fsync the folder
            sizes[path.name] = path.stat().st_size
        record = {
            "name": self.name,
            "docs": self.docs,
            "tokens": self.tokens,
            **self.start,
            **end,
            **self.counts,
            "files": sizes,
        }
        write_json(self.folder / f"{self.name}.json", record)
        return record

    def abort(self) -> None:
        """Close and delete the temp files (best effort; the next run deletes leftovers)."""
        for role, f in self.files.items():
            f.close()
            self.outs[role].abort()


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    # np.memmap refuses an empty file; an empty shard is legal (every line blank or skipped).
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class Shards:
    """A prepared folder, read through memory maps: the whole token stream as one array-like.

    `len(shards)` counts records: documents, or pairs for dpo. Positions are global: token
    `t` of the stream, document `i` of the folder, across shard boundaries. Pickling drops
    the maps (they are reopened on first use), so a DataLoader worker receives a few
    kilobytes, not the data.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: no prepared shards here (run `data prepare`)")
        self.meta = read_json(meta_path)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not a {FORMAT} folder")
        if self.meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: {FORMAT} v{self.meta.get('version')}, this reader needs "
                f"v{FORMAT_VERSION} (v2 frames pretrain documents bos + text + eos); prepare "
                "it again (`minimind data prepare --overwrite`)"
            )
        if not self.meta["complete"]:
            raise ValueError(f"{meta_path}: preparation did not finish; run `data prepare` again")
        self.kind: str = self.meta["kind"]
        self.dtype = np.dtype(self.meta["settings"]["dtype"])
        self.records = [read_json(self.folder / f"{n}.json") for n in self.meta["shards"]]
        # token_starts[s] is the global position of shard s's first token; (n_shards + 1,)
        self.token_starts = np.cumsum([0] + [r["tokens"] for r in self.records], dtype=np.int64)
        self.num_tokens = int(self.token_starts[-1])
        self.num_docs = sum(r["docs"] for r in self.records)
        self._maps: dict[str, list[np.ndarray]] | None = None
        self._offsets: np.ndarray | None = None

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The tokenizer facts recorded at preparation: blake2b, vocab_size, bos/eos/pad ids."""
        return self.meta["tokenizer"]

    def __len__(self) -> int:
        return self.num_docs // 2 if self.kind == "dpo" else self.num_docs

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None, "_offsets": None}

    def _dtype(self, role: str) -> np.dtype:
        return np.dtype({"tokens": self.dtype, "index": np.int64, "mask": np.uint8}[role])

    def _map(self, role: str) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = {}
        if role not in self._maps:
            suffix = shard_files(self.kind)[role]
            dtype = self._dtype(role)
            names = self.meta["shards"]
            self._maps[role] = [_memmap(self.folder / (n + suffix), dtype) for n in names]
        return self._maps[role]

    @property
    def offsets(self) -> np.ndarray:
        """Global document offsets, (num_docs + 1,) int64: document i is tokens[o[i]:o[i+1]]."""
        if self._offsets is None:
            parts = [np.zeros(1, np.int64)]
            parts += [idx[1:] + base for idx, base in zip(self._map("index"), self.token_starts)]
            self._offsets = np.concatenate(parts)
        return self._offsets

    def _range(self, role: str, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        maps = self._map(role)
        first = int(np.searchsorted(self.token_starts, start, side="right")) - 1
        parts, s = [], first
        while start < stop:
            base = int(self.token_starts[s])
            end = min(stop, int(self.token_starts[s + 1]))
            parts.append(maps[s][start - base : end - base])
            start, s = end, s + 1
        if len(parts) == 1:
            return np.asarray(parts[0])
        return np.concatenate(parts) if parts else np.zeros(0, self._dtype(role))

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole stream (a view when inside one shard)."""
        return self._range("tokens", start, stop)

    def mask(self, start: int, stop: int) -> np.ndarray:
        """The loss mask of tokens [start, stop) (sft, reasoning and dpo only)."""
        if self.kind not in MASKED_KINDS:
            raise ValueError(f"{self.kind} shards have no loss mask")
        return self._range("mask", start, stop)

    def doc_span(self, i: int) -> tuple[int, int]:
        """(start, stop) of document i in the global token stream."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} outside [0, {self.num_docs})")
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def doc(self, i: int) -> np.ndarray:
        return self.tokens(*self.doc_span(i))

    def doc_mask(self, i: int) -> np.ndarray:
        return self.mask(*self.doc_span(i))

    def doc_lengths(self) -> np.ndarray:
        """Tokens per document, (num_docs,) int64."""
        return np.diff(self.offsets)

    def answers(self) -> list[str | None]:
        """The rlaif `answer` of every document, in order (None where the record had none)."""
        if self.kind != "rlaif":
            raise ValueError(f"{self.kind} shards have no answers")
        suffix = shard_files("rlaif")["answers"]
        out = []
        for name in self.meta["shards"]:
            with open(self.folder / (name + suffix), encoding="utf-8") as f:
                out += [json.loads(line)["answer"] for line in f]
        return out
