"""Self-describing checkpoint folders: written atomically, read strictly.

Owns the on-disk layout of our own checkpoints, the atomic write, and strict weight loading
(every missing, unexpected or mis-shaped key is named). Training, inference and conversion all
read and write checkpoints here, so inference never imports the training package. It does not
own what goes into a resume state (the training engine decides) nor foreign formats (MiniMind2
`.pth`, transformers folders, GGUF: `minimind.convert`).

A checkpoint is a folder::

    config.json         {"model_type": "minimind", "format_version": 1, **ModelConfig.to_dict()}
    model.safetensors   the weights; a tied head is stored once (under the embedding's name);
                        metadata: format_version, dtype, tied ({alias: stored name})
    tokenizer*.json ... the tokenizer folder's files, when one was given
    meta.json           free JSON metadata (training step, loss, data position), optional
    trainer_state.pt    torch.save'd resume state (optimizer, scheduler, RNG, sampler), optional
    <anything else>     files the training engine adds (CheckpointWriter.add_file)

Atomicity is `minimind.fsutil.AtomicFolder`'s: a checkpoint is staged in a hidden sibling
folder and swapped in by renames under a per-path lock, so a kill at any moment leaves the
previous (or the new) checkpoint loadable, never a half-written one, and readers
(`resolve_checkpoint`, and every loader here through `fsutil.read_snapshot`) fall back to
`P.old` when a save was killed between its two renames. This module adds what makes the
folder a checkpoint: the files above, the refusal to replace a folder that is not one, and the
strict reads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from minimind.fsutil import (
    AtomicFolder,
    FolderChangedError,
    committed_folder,
    old_path,
    read_snapshot,
)
from minimind.model import MiniMindForCausalLM, ModelConfig

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "META_NAME",
    "TRAINER_STATE_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "CheckpointWriter",
    "load_checkpoint",
    "load_checkpoint_weights",
    "load_config",
    "load_trainer_state",
    "load_weights",
    "read_meta",
    "resolve_checkpoint",
    "save_checkpoint",
]

FORMAT_VERSION = 1  # bump when a reader of the old layout would misread the new one
MODEL_TYPE = "minimind"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
META_NAME = "meta.json"
TRAINER_STATE_NAME = "trainer_state.pt"
RESERVED_NAMES = frozenset({CONFIG_NAME, WEIGHTS_NAME, META_NAME, TRAINER_STATE_NAME})
# Tokenizer folders are copied whole, except what would clash with or bloat a checkpoint
# (a checkpoint folder given as tokenizer_dir must not donate its weights or config).
_NOT_TOKENIZER_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".gguf", ".ckpt")

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into, or is unreadable."""


def load_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = ""
) -> None:
    """Copy `state_dict` into `model` strictly, casting dtype; name every mismatch at once.

    A tied head may be absent from `state_dict` (it is the embedding).
    """
    own = model.state_dict()
    # Tied parameters (the head and the embedding) share storage: one name of a group suffices.
    groups: dict[int, list[str]] = {}
    for name, p in own.items():
        groups.setdefault(p.data_ptr(), []).append(name)
    missing = sorted(
        name
        for names in groups.values()
        if not any(n in state_dict for n in names)
        for name in names
    )
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: expected {tuple(own[k].shape)}, found {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(own[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped keys: {'; '.join(shapes)}")
    if problems:
        where = f" from {source}" if source else ""
        raise CheckpointError(f"cannot load weights{where}: " + " | ".join(problems))
    with torch.no_grad():
        for k, v in state_dict.items():
            own[k].copy_(v.to(own[k].dtype))


# --- dtypes ------------------------------------------------------------------------------


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"checkpoint dtype must be a floating type, got {dtype}")
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown dtype {dtype!r}; use fp32, bf16, fp16 or a torch.dtype"
        ) from None


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _dtype_from_name(name: str) -> torch.dtype | None:
    if name in _DTYPES:
        return _DTYPES[name]
    found = getattr(torch, name, None)
    return found if isinstance(found, torch.dtype) else None


# --- JSON files ---------------------------------------------------------------------------


def _write_json(file: Path, data: Mapping[str, Any], what: str) -> None:
    try:
        # allow_nan=False: NaN/Infinity are not JSON and other tools reject them.
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} is not JSON-serialisable: {e}") from e
    file.write_text(text + "\n", encoding="utf-8")


def _read_json(file: Path, folder: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"checkpoint {folder}: {file.name} is missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder}: {file.name} is not valid JSON: {e}") from e


# --- writing -----------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP/DataParallel and torch.compile wrappers (clean key names)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _dedupe_and_cast(
    state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (tensors to store, {alias: stored name}) for safetensors, which refuses shared memory.

    Names that view the very same memory (a tied head) are stored once, under the first name
    (the embedding comes before lm_head); load_weights accepts a tied group with one name.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        tensors[name] = t.to("cpu", target).contiguous()
    # A kept tensor may still share storage with another (a partial view, or a no-op .to()
    # of tensors that share a buffer); safetensors rejects that, so give those their own copy.
    owners: set[int] = set()
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in owners:
            tensors[name] = t.clone()
        owners.add(ptr)
    return tensors, aliases


class CheckpointWriter:
    """Stage a checkpoint folder beside `path` and swap it in atomically on commit.

    The lower-level API under `save_checkpoint`, for the training engine's resume state::

        with CheckpointWriter(path) as w:        # locks, clears stale temps, makes w.staging
            w.write_model(model, dtype="bf16")   # config.json + model.safetensors (required)
            w.copy_tokenizer(tokenizer_dir)
            w.write_meta({"step": step})
            w.write_trainer_state({"optimizer": opt.state_dict(), "rng": rng_states})
            w.add_file("sampler.json", json.dumps(sampler.state_dict()))
            w.add_file("optim", lambda p: dcp.save(sharded_state, checkpoint_id=p))
        # exit without an exception: commit (fsync, swap); with one: discard, P untouched

    `w.staging` is the folder being built; anything written under it is committed too.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).absolute()
        if not self.path.name or self.path.name in (".", ".."):
            raise CheckpointError(f"not a checkpoint folder path: {path}")
        self._folder = AtomicFolder(self.path, self._refuse_foreign, self._refuse_incomplete)

    @property
    def staging(self) -> Path | None:
        """The folder being built (None when not open)."""
        return self._folder.staging

    # -- lifecycle (fsutil.AtomicFolder's transaction) ---------------------------------
    def __enter__(self) -> CheckpointWriter:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def open(self) -> Path:
        """Lock the path, delete stale temps of dead writers, create the staging folder."""
        return self._folder.open()

    def commit(self) -> Path:
        """Make the staged folder the checkpoint at `path` (config and weights required)."""
        self._staging()
        return self._folder.commit()

    def abort(self) -> None:
        """Discard the staged folder; the checkpoint at `path` is left as it was."""
        self._folder.abort()

    def _refuse_incomplete(self, staging: Path) -> None:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (staging / name).is_file():
                raise CheckpointError(
                    f"checkpoint {self.path}: nothing wrote {name} (call write_model)"
                )

    # -- what goes in ------------------------------------------------------------------
    def write_model(self, model: nn.Module, dtype: str | torch.dtype | None = None) -> None:
        """config.json and model.safetensors from a MiniMind model (DDP/compile unwrapped).

        Saved as it is: merge LoRA adapters first, or the checkpoint will not load strictly.
        """
        model = _unwrap(model)
        config = getattr(model, "config", None)
        if not isinstance(config, ModelConfig):
            raise TypeError(f"{type(model).__name__} has no ModelConfig at .config")
        self.write_weights(model.state_dict(), config, dtype)

    def write_weights(
        self,
        state_dict: Mapping[str, torch.Tensor],
        config: ModelConfig,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        """config.json and model.safetensors from a full (gathered, unsharded) state dict.

        dtype: "fp32" | "bf16" | "fp16" | a torch.dtype | None (keep each tensor's dtype);
        casts floating tensors only.
        """
        self._staging()  # fail before the (slow) cast when not open
        target = _as_dtype(dtype)
        tensors, aliases = _dedupe_and_cast(state_dict, target)
        floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
        stored = _dtype_name(floats.pop()) if len(floats) == 1 else "mixed"
        header = {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION}
        _write_json(self._new_file(CONFIG_NAME), {**header, **config.to_dict()}, CONFIG_NAME)
        metadata = {
            "format": "pt",  # what transformers' safetensors reader expects
            "format_version": str(FORMAT_VERSION),
            "dtype": stored,
            "tied": json.dumps(aliases),
        }
        save_file(tensors, str(self._new_file(WEIGHTS_NAME)), metadata=metadata)

    def copy_tokenizer(self, tokenizer_dir: str | os.PathLike[str]) -> None:
        """Copy the files of a tokenizer folder (tokenizer.json, tokenizer_config.json, ...).

        Weight files, reserved checkpoint names, hidden files and subfolders are skipped, so
        a checkpoint folder may serve as the tokenizer source.
        """
        src = Path(tokenizer_dir)
        if not src.is_dir() and old_path(src).is_dir():
            src = old_path(src)  # a checkpoint killed mid-swap
        if not src.is_dir():
            raise CheckpointError(f"tokenizer folder {tokenizer_dir} does not exist")
        if not any((src / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            raise CheckpointError(
                f"tokenizer folder {src} has neither tokenizer.json nor tokenizer_config.json"
            )
        for f in sorted(src.iterdir()):
            if (
                f.is_file()
                and f.name not in RESERVED_NAMES
                and not f.name.startswith(".")
                and not f.name.endswith(_NOT_TOKENIZER_SUFFIXES)
            ):
                shutil.copyfile(f, self._new_file(f.name))

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """meta.json: free JSON metadata (step, tokens seen, loss); read back by read_meta."""
        _write_json(self._new_file(META_NAME), dict(meta), META_NAME)

    def write_trainer_state(self, state: Mapping[str, Any]) -> None:
        """trainer_state.pt: torch.save of the resume state; read back by load_trainer_state.

        Keep it to tensors and plain Python containers/numbers/strings so that it loads with
        weights_only=True (e.g. torch.get_rng_state(), optimizer.state_dict()).
        """
        torch.save(dict(state), self._new_file(TRAINER_STATE_NAME))

    def add_file(self, name: str, data: bytes | str | Callable[[Path], Any]) -> Path:
        """Add `name` (a relative path, may contain '/') to the checkpoint.

        data: bytes; str (written as UTF-8); or a callable that writes a file or a folder at
        the path it is given (e.g. `lambda p: torch.save(obj, p)`). Returns that path.
        """
        rel = PurePosixPath(name)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts or "\\" in name:
            raise CheckpointError(f"extra file name must be a relative path inside: {name!r}")
        if str(rel) in RESERVED_NAMES:
            raise CheckpointError(f"{name} is written by CheckpointWriter itself, not add_file")
        target = self._new_file(str(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, (bytes, bytearray, memoryview)):
            target.write_bytes(bytes(data))
        elif isinstance(data, str):
            target.write_text(data, encoding="utf-8")
        elif callable(data):
            data(target)
            if not target.exists():
                raise CheckpointError(f"the writer of {name} did not create {target}")
        else:
            raise TypeError(f"extra file {name}: expected bytes, str or callable(path)")
        return target

    # -- internals ---------------------------------------------------------------------
    def _staging(self) -> Path:
        if self.staging is None:
            raise RuntimeError(f"CheckpointWriter for {self.path} is not open")
        return self.staging

    def _new_file(self, name: str) -> Path:
        target = self._staging() / name
        if target.exists():
            raise CheckpointError(f"checkpoint {self.path}: {name} was already written")
        return target

    @staticmethod
    def _refuse_foreign(path: Path) -> None:
        # The swap deletes what was at P: never do that to a folder that is not a checkpoint
        # (save_checkpoint("out", ...) must not wipe out/).
        if path.is_symlink() and not path.exists():
            raise CheckpointError(f"{path} is a dangling symlink, not a checkpoint folder")
        if not path.exists():
            return
        if not path.is_dir():
            raise CheckpointError(f"{path} exists and is not a folder; refusing to replace it")
        if any(path.iterdir()) and not (
            (path / CONFIG_NAME).is_file() or (path / WEIGHTS_NAME).is_file()
        ):
            raise CheckpointError(
                f"{path} is a non-empty folder without {CONFIG_NAME}: not a checkpoint, "
                "refusing to replace it"
            )


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    trainer_state: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes | str | Callable[[Path], Any]] | None = None,
) -> Path:
    """Write `model` as a checkpoint folder at `path`, atomically; returns the folder.

    dtype: "fp32" | "bf16" | "fp16" | torch.dtype | None (keep the model's).
    tokenizer_dir: a tokenizer folder whose files are copied in.
    extra: JSON metadata -> meta.json (read_meta).
    trainer_state: resume state -> trainer_state.pt (load_trainer_state).
    extra_files: {relative name: bytes | str | callable(path)} (see CheckpointWriter.add_file).
    """
    with CheckpointWriter(path) as w:
        w.write_model(model, dtype=dtype)
        if tokenizer_dir is not None:
            w.copy_tokenizer(tokenizer_dir)
        if extra is not None:
            w.write_meta(extra)
        if trainer_state is not None:
            w.write_trainer_state(trainer_state)
        for name, data in (extra_files or {}).items():
            w.add_file(name, data)
    return w.path


# --- reading -----------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The folder to read for checkpoint `path`: `path`, or `path.old` if a save was killed
    between its two renames. Every reader (infer, convert, train resume) goes through this."""
    p = Path(path)
    found = committed_folder(p)
    if found is not None:
        return found
    if p.exists():
        raise CheckpointError(f"{p} is a file, not a checkpoint folder")
    raise CheckpointError(f"no checkpoint folder at {p}")


def _config_from(folder: Path) -> ModelConfig:
    data = _read_json(folder / CONFIG_NAME, folder)
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {folder}: {CONFIG_NAME} is not a JSON object")
    data = dict(data)
    model_type = data.pop("model_type", None)
    version = data.pop("format_version", None)
    if model_type != MODEL_TYPE or not isinstance(version, int):
        raise CheckpointError(
            f"checkpoint {folder}: {CONFIG_NAME} is not from minimind.checkpoint "
            f"(model_type={model_type!r}, format_version={version!r}); transformers folders "
            "and MiniMind2 .pth files are read by minimind.convert"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {folder}: format_version {version} is newer than this minimind "
            f"reads ({FORMAT_VERSION}); upgrade minimind"
        )
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {folder}: {CONFIG_NAME}: {e}") from e


def _read(path: str | os.PathLike[str], read: Callable[[Path], Any]) -> Any:
    """read(folder) on the resolved folder, as one consistent snapshot (fsutil.read_snapshot:
    a save racing the read makes it read again, never mix two saves)."""

    def named(folder: Path) -> Any:
        try:
            return read(folder)
        except FileNotFoundError as e:
            raise CheckpointError(f"checkpoint {folder}: {e}") from e

    try:
        return read_snapshot(path, named, resolve_checkpoint)
    except FolderChangedError as e:
        raise CheckpointError(f"checkpoint {e}") from None


def load_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig of checkpoint `path` (strict: unknown fields are an error)."""
    return _read(path, _config_from)


def _meta_from(folder: Path) -> dict[str, Any]:
    if not (folder / META_NAME).exists():
        return {}
    data = _read_json(folder / META_NAME, folder)
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {folder}: {META_NAME} is not a JSON object")
    return data


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `extra` dict saved with the checkpoint (meta.json); {} when none was saved."""
    return _read(path, _meta_from)


def load_trainer_state(
    path: str | os.PathLike[str], map_location: Any = "cpu", weights_only: bool = True
) -> dict[str, Any]:
    """The resume state saved with the checkpoint (trainer_state.pt)."""

    def read(folder: Path) -> dict[str, Any]:
        file = folder / TRAINER_STATE_NAME
        if not file.is_file():
            raise CheckpointError(f"checkpoint {folder}: {TRAINER_STATE_NAME} is missing")
        try:
            return torch.load(file, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {folder}: cannot read {TRAINER_STATE_NAME}: {e}"
            ) from e

    return _read(path, read)


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        raise CheckpointError(f"checkpoint {folder}: {WEIGHTS_NAME} is missing")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error type for a corrupt file
        raise CheckpointError(f"checkpoint {folder}: cannot read {WEIGHTS_NAME}: {e}") from e
    return tensors, metadata


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> tuple[MiniMindForCausalLM, ModelConfig]:
    """-> (model in eval mode on `device`, its config), loaded strictly.

    dtype: "fp32" | "bf16" | "fp16" | torch.dtype | None (the dtype stored in the file).
    Raises CheckpointError naming the folder (and the keys) for anything missing or wrong.
    """
    target = _as_dtype(dtype)
    folder, config, (tensors, metadata) = _read(
        path, lambda f: (f, _config_from(f), _read_weights(f))
    )
    if target is None:  # as stored; fp32 when the file mixes dtypes
        target = _dtype_from_name(metadata.get("dtype", "")) or torch.float32
    model = MiniMindForCausalLM(config).to(target)
    load_weights(model, tensors, source=str(folder / WEIGHTS_NAME))
    return model.to(device).eval(), config


def load_checkpoint_weights(path: str | os.PathLike[str], model: nn.Module) -> Path:
    """Copy the weights of checkpoint `path` into the already built `model`, strictly; -> the
    folder read. The training engine resumes this way: its model exists before the checkpoint
    is read (adapted with LoRA, for one), so config.json is not consulted here."""
    folder, (tensors, _metadata) = _read(path, lambda f: (f, _read_weights(f)))
    load_weights(model, tensors, source=str(folder / WEIGHTS_NAME))
    return folder
