"""The teacher's top-k cache for knowledge distillation: what is stored, the folder format (write
and read), its key, and the resumable build. Issue 11's memory option: the teacher runs once
over the data, and the student then trains from the cache without loading it.

Owns: `teacher_topk` (a teacher's logits -> the stored rows), `cache_key`/`key_digest` and the
teacher identities (`files_digest`, `module_digest`), `build` (run a teacher over a dataset,
part by part, resumable, split over ranks), `finalize`, `TeacherCache` (the memory-mapped
reader, refusing a stale or unfinished folder) and `CachedItems` (dataset items with their
teacher rows). Does not own the loss over the rows (stages/distill.py `distill_topk_loss`).

What is stored, per labelled position (every position of a packed window; the assistant
targets of an SFT row), in the order `labels.reshape(-1) != -100` visits them:
- `values` (k,) float16 (or float32): the k largest teacher log-probabilities at temperature
  T, log softmax(z / T), largest first; clamped to float16's range (exp of the floor is 0).
- `indices` (k,) their token ids: uint16 for a vocabulary up to 65536, else int32.
- `tail` () float32: log of the teacher's probability mass outside the top k (log sum over
  the other V - k tokens of softmax(z / T)), computed in fp32 from the full distribution;
  -inf when k = V (there is no tail).
The approximation the loss makes with these rows: the distribution is coarsened to k + 1
events, the top-k tokens one by one and "any other token" as one bucket holding the tail
mass, for the teacher and the student alike (the student's bucket is logsumexp of its own
log-probs outside the teacher's top k). We keep the tail bucket rather than renormalising the
teacher over its top k: renormalising inflates the teacher's confidence (a teacher with 40%
of its mass in the tail becomes one with none), whereas the coarsened divergence is exactly
the divergence between the two distributions seen through that partition. By the chain rule
of relative entropy (Cover & Thomas, Elements of Information Theory, Thm 2.5.3), KL(p || q) =
KL(p_coarse || q_coarse) + E_p[KL within the tail], so the cached forward KL is a lower bound
of the full one missing only the within-tail term; the same data-processing argument holds for
reverse KL and JSD. With k = V the partition is the vocabulary and the loss is the full one.

A cache folder:

    meta.json                 format, version, `key` (below) and its digest, k, vocab size,
                              dtypes, item count, items per part, `complete`; written first
                              (complete false) and rewritten when every part is finished
    part_00000.offsets.bin    int64, items_in_part + 1 values from 0: item j of the part owns
                              rows offsets[j]:offsets[j+1]
    part_00000.values.bin     (rows, k) values
    part_00000.indices.bin    (rows, k) indices
    part_00000.tail.bin       (rows,) float32
    part_00000.json           the part's record, written last: item range, rows, file sizes.
                              A part is finished iff this file exists and every file it names
                              has the size it records

Staleness: the key is the teacher's identity (a content digest of its weight and config files,
or of a module's tensors, plus its loading overrides), the data's identity (the shards' source
and tokenizer digests, document and token counts, the preparation's cut), how items are cut
(packed or not, seq_len, item count), k, the temperature and the values dtype. Opening or
building a folder whose key differs raises `StaleCacheError` naming every differing field; it
is never rebuilt silently (delete the folder, or name another).
Resume: `build` skips finished parts, and a killed build leaves only temp files (each file is
written to a temp name, fsynced and renamed), so running it again continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from minimind.fsutil import atomic_write

FORMAT = "minimind-teacher-topk"
FORMAT_VERSION = 1
META = "meta.json"
IGNORE_INDEX = -100
VALUE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
ROLES = ("offsets", "values", "indices", "tail")


class StaleCacheError(ValueError):
    """A cache folder built for another teacher, data, k, seq_len or temperature."""


def teacher_topk(
    logits: torch.Tensor, k: int, temperature: float, values_dtype: str = "float16"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, V) teacher logits -> (values (N, k) `values_dtype`, indices (N, k) int64,
    tail (N,) float32): the stored rows (module docstring). Used by the cache builder and by
    the live top-k loss alike, so the two see the same numbers.

    >>> z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> v, i, tail = teacher_topk(z, 2, 1.0, "float32")
    >>> i.tolist(), [round(x, 3) for x in v.exp()[0].tolist()], round(tail.exp().item(), 3)
    ([[0, 1]], [0.5, 0.3], 0.2)
    """
    log_p = (logits.float() / temperature).log_softmax(-1)
    values, indices = log_p.topk(k, dim=-1)  # largest first
    if k < log_p.shape[-1]:
        tail = log_p.scatter(1, indices, float("-inf")).logsumexp(-1)
    else:
        tail = torch.full(log_p.shape[:1], float("-inf"), device=log_p.device)
    dtype = VALUE_DTYPES[values_dtype]
    values = values.clamp(min=torch.finfo(dtype).min).to(dtype)
    return values, indices, tail


def index_dtype(vocab_size: int) -> np.dtype:
    """The stored token-id dtype.

    >>> index_dtype(6400), index_dtype(151936)
    (dtype('uint16'), dtype('int32'))
    """
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def _digest(chunks: Iterator[bytes]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def files_digest(path: str | os.PathLike) -> str:
    """Content digest of a teacher on disk: the file itself (a MiniMind2 .pth), or a folder's
    config and weight files (*.json except tokenizer files, *.safetensors, *.bin, *.pth), by
    name and content. Reads the files, never builds the model."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file()
            and not p.name.startswith(".")
            and (p.suffix in (".safetensors", ".bin", ".pth") or p.name == "config.json")
        )

    def chunks():
        for f in files:
            yield f.name.encode() + b"\0"
            with open(f, "rb") as fh:
                while block := fh.read(1 << 22):
                    yield block

    return _digest(chunks())


def module_digest(model: torch.nn.Module) -> str:
    """Content digest of a module's state dict (names, dtypes, shapes, values)."""

    def chunks():
        for name, t in sorted(model.state_dict().items()):
            t = t.detach().cpu().contiguous()
            yield f"{name}:{t.dtype}:{tuple(t.shape)}".encode()
            yield t.reshape(-1).view(torch.uint8).numpy().tobytes()

    return _digest(chunks())


def cache_key(
    *,
    teacher: dict[str, Any],
    data: dict[str, Any],
    packed: bool,
    seq_len: int,
    items: int,
    k: int,
    temperature: float,
    values_dtype: str,
) -> dict[str, Any]:
    """Everything a cache's rows depend on (module docstring), as JSON-ready values."""
    return {
        "teacher": teacher,
        "data": data,
        "packed": packed,
        "seq_len": seq_len,
        "items": items,
        "k": k,
        "temperature": float(temperature),
        "values_dtype": values_dtype,
    }


def key_digest(key: dict[str, Any]) -> str:
    """A short digest of a key (the resume fingerprint holds it).

    >>> len(key_digest({"k": 32}))
    16
    """
    text = json.dumps(key, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _differences(got: Any, want: Any, at: str = "") -> list[str]:
    """The paths where two JSON values differ, with both values.

    >>> _differences({"k": 8, "t": {"a": 1}}, {"k": 32, "t": {"a": 1}})
    ['k: 8 in the cache, 32 in this run']
    """
    if isinstance(got, dict) and isinstance(want, dict):
        out = []
        for name in sorted(set(got) | set(want)):
            sub = f"{at}.{name}" if at else name
            out += _differences(got.get(name), want.get(name), sub)
        return out
    return [] if got == want else [f"{at}: {got!r} in the cache, {want!r} in this run"]


def _part_name(p: int) -> str:
    return f"part_{p:05d}"


def _part_files(p: int) -> dict[str, str]:
    return {role: f"{_part_name(p)}.{role}.bin" for role in ROLES}


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def check_key(folder: Path, meta: dict[str, Any], key: dict[str, Any]) -> None:
    """StaleCacheError naming every field where the folder's key differs from `key`."""
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise StaleCacheError(f"{folder / META}: not a {FORMAT} v{FORMAT_VERSION} folder")
    diffs = _differences(meta.get("key"), key)
    if diffs:
        raise StaleCacheError(
            f"the teacher cache {folder} is stale: it was built for another run ("
            + "; ".join(diffs)
            + "). Delete the folder to rebuild it, or pass another --teacher_cache"
        )


def finished_part(folder: Path, p: int) -> dict[str, Any] | None:
    """Part `p`'s record when the part is finished (module docstring), else None."""
    try:
        record = json.loads((folder / f"{_part_name(p)}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for name, size in record.get("files", {}).items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size:
            return None
    return record


def _parts(items: int, part_items: int) -> int:
    return max(1, -(-items // part_items))


def start(
    folder: str | os.PathLike,
    key: dict[str, Any],
    *,
    vocab_size: int,
    part_items: int = 1024,
) -> dict[str, Any]:
    """Create the folder and its unfinished meta.json, or check an existing folder's key
    (StaleCacheError). Returns the meta. Run by one process before `build`."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is not None:
        check_key(folder, meta, key)
        return meta
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "key": key,
        "digest": key_digest(key),
        "k": key["k"],
        "vocab_size": vocab_size,
        "values_dtype": key["values_dtype"],
        "indices_dtype": index_dtype(vocab_size).name,
        "items": key["items"],
        "part_items": part_items,
        "parts": _parts(key["items"], part_items),
        "complete": False,
    }
    _write_json(folder / META, meta)
    return meta


@torch.no_grad()
def build(
    folder: str | os.PathLike,
    key: dict[str, Any],
    dataset: Dataset,
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    teacher: torch.nn.Module,
    *,
    device: torch.device,
    autocast: Callable[[], Any],
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] | None = None,
) -> int:
    """Write this rank's unfinished parts (parts p with p % world_size == rank) of the cache
    of `dataset` (every item, in index order; `collate` makes batches with `input_ids` and
    `labels`) under `teacher` (frozen, on `device`, run under `autocast`). `start` must have
    run. Returns the number of parts written now."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"{folder / META}: call teacher_cache.start first")
    check_key(folder, meta, key)
    k, temperature, per = key["k"], key["temperature"], meta["part_items"]
    idx_dtype = np.dtype(meta["indices_dtype"])
    written = 0
    for p in range(rank, meta["parts"], world_size):
        if finished_part(folder, p) is not None:
            continue
        lo, hi = p * per, min(meta["items"], (p + 1) * per)
        counts, values, indices, tails = [], [], [], []
        for s in range(lo, hi, batch_size):
            batch = collate([dataset[i] for i in range(s, min(s + batch_size, hi))])
            labels = batch["labels"].to(device)
            flat = labels.reshape(-1)
            at = (flat != IGNORE_INDEX).nonzero().squeeze(1)
            with autocast():
                logits = teacher(batch["input_ids"].to(device), logits_at=at).logits
            v, i, t = teacher_topk(logits, k, temperature, key["values_dtype"])
            counts.append((labels != IGNORE_INDEX).sum(1).cpu().numpy())
            values.append(v.cpu().numpy())
            indices.append(i.cpu().numpy().astype(idx_dtype))
            tails.append(t.cpu().numpy())
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
        arrays = {
            "offsets": offsets,
            "values": np.concatenate(values).reshape(-1, k),
            "indices": np.concatenate(indices).reshape(-1, k),
            "tail": np.concatenate(tails).astype(np.float32),
        }
        files = _part_files(p)
        for role, array in arrays.items():
            atomic_write(folder / files[role], lambda f, a=array: f.write(a.tobytes()))
        sizes = {files[r]: int(arrays[r].nbytes) for r in ROLES}
        record = {"items": [lo, hi], "rows": int(offsets[-1]), "files": sizes}
        _write_json(folder / f"{_part_name(p)}.json", record)
        written += 1
        if log is not None:
            log(f"teacher cache {folder.name}: part {p + 1}/{meta['parts']} ({hi} items)")
    return written


def finalize(folder: str | os.PathLike, key: dict[str, Any]) -> dict[str, Any]:
    """Mark the cache complete once every part is finished (one process, after every rank's
    `build`); a missing part is an error naming it."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"{folder / META}: no teacher cache here")
    check_key(folder, meta, key)
    missing = [p for p in range(meta["parts"]) if finished_part(folder, p) is None]
    if missing:
        raise ValueError(f"teacher cache {folder}: parts {missing} are unfinished; run the build")
    if not meta["complete"]:
        rows = sum(finished_part(folder, p)["rows"] for p in range(meta["parts"]))
        meta.update(complete=True, rows=rows)
        _write_json(folder / META, meta)
    return meta


def is_complete(folder: str | os.PathLike, key: dict[str, Any]) -> bool:
    """True when `folder` holds a finished cache for `key`; False when it is absent or
    unfinished; StaleCacheError when it was built for another key."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is None:
        return False
    check_key(folder, meta, key)
    return bool(meta["complete"])


class TeacherCache:
    """A finished cache folder, read through memory maps. `rows(i)` -> item i's (values (n, k),
    indices (n, k) int64, tail (n,)) numpy arrays. Pickling drops the maps (a DataLoader
    worker reopens them)."""

    def __init__(self, folder: str | os.PathLike, key: dict[str, Any]):
        self.folder = Path(folder)
        meta = _read_meta(self.folder)
        if meta is None:
            raise FileNotFoundError(f"{self.folder / META}: no teacher cache here")
        check_key(self.folder, meta, key)
        if not meta["complete"]:
            raise ValueError(f"teacher cache {self.folder} is unfinished: run the build again")
        self.meta = meta
        self.k, self.vocab_size = meta["k"], meta["vocab_size"]
        self.part_items = meta["part_items"]
        self._maps: list[dict[str, np.ndarray]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def __len__(self) -> int:
        return self.meta["items"]

    def nbytes(self) -> int:
        """Bytes on disk (every part file and the records)."""
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())

    def _part(self, p: int) -> dict[str, np.ndarray]:
        if self._maps is None:
            self._maps = [None] * self.meta["parts"]
        if self._maps[p] is None:
            files, k = _part_files(p), self.k
            dtypes = {
                "offsets": np.int64,
                "values": np.dtype(self.meta["values_dtype"]),
                "indices": np.dtype(self.meta["indices_dtype"]),
                "tail": np.float32,
            }
            maps = {}
            for role in ROLES:
                path = self.folder / files[role]
                if path.stat().st_size == 0:  # np.memmap refuses an empty file
                    maps[role] = np.zeros(0, dtypes[role])
                else:
                    maps[role] = np.memmap(path, dtype=dtypes[role], mode="r")
            for role in ("values", "indices"):
                maps[role] = maps[role].reshape(-1, k)
            self._maps[p] = maps
        return self._maps[p]

    def rows(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} outside the cache's [0, {len(self)})")
        m = self._part(i // self.part_items)
        j = i % self.part_items
        lo, hi = int(m["offsets"][j]), int(m["offsets"][j + 1])
        return (
            np.array(m["values"][lo:hi]),  # copies: torch wants writable arrays
            m["indices"][lo:hi].astype(np.int64),
            np.array(m["tail"][lo:hi]),
        )


class CachedItems(Dataset):
    """Items of a view (stage.IndexView over the cached dataset) as dicts with their teacher
    rows: {"input_ids", "labels", "teacher_values", "teacher_indices", "teacher_tail"}
    (a packed window's (input_ids, labels) tuple becomes the same dict)."""

    def __init__(self, view, cache: TeacherCache):
        self.view, self.cache = view, cache

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.view.indices[i]
        item = self.view.base[index]
        if isinstance(item, tuple):
            item = {"input_ids": item[0], "labels": item[1]}
        values, indices, tail = self.cache.rows(index)
        n = int((item["labels"] != IGNORE_INDEX).sum())
        if n != len(tail):
            raise StaleCacheError(
                f"teacher cache {self.cache.folder}: item {index} has {len(tail)} rows but "
                f"{n} labelled tokens; the cache does not belong to this data"
            )
        return {
            **item,
            "teacher_values": torch.from_numpy(values),
            "teacher_indices": torch.from_numpy(indices),
            "teacher_tail": torch.from_numpy(tail),
        }

    @property
    def lengths(self):
        return self.view.lengths


def collate_rows(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The teacher rows of a batch's items, concatenated in item order: the order of the
    batch's labelled positions, `labels.reshape(-1) != -100`, for right-padded rows."""
    return {
        name: torch.cat([it[name] for it in items])
        for name in ("teacher_values", "teacher_indices", "teacher_tail")
    }
