"""Fetching MiniMind's public data files from the Hugging Face or ModelScope hub.

Owns: the names of the public files, the two hubs' repositories and pages, `download`, and
the message that tells an offline user how to place the files by hand.
Does not own: validating the files (formats.py, `data check`), tokenizing them (prepare.py).

The hub clients are imported inside `download`, only for the source asked for:
huggingface_hub comes with transformers, modelscope is optional, and a missing one is a
`DownloadError` saying what to install. HF_HUB_OFFLINE=1 (the usual offline switch) stops
either source before any connection; a connection failure gives the same hand-placement
message. A file already in the folder is not downloaded again.
"""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path

from minimind import paths

SOURCES = ("huggingface", "modelscope")
REPOS = {"huggingface": "jingyaogong/minimind_dataset", "modelscope": "gongjy/minimind_dataset"}
PAGES = {
    "huggingface": "https://huggingface.co/datasets/jingyaogong/minimind_dataset/tree/main",
    "modelscope": "https://www.modelscope.cn/datasets/gongjy/minimind_dataset/files",
}
FILES = (
    "pretrain_hq.jsonl",
    "sft_mini_512.jsonl",
    "sft_512.jsonl",
    "sft_1024.jsonl",
    "sft_2048.jsonl",
    "lora_identity.jsonl",
    "lora_medical.jsonl",
    "dpo.jsonl",
    "rlaif-mini.jsonl",
    "r1_mix_1024.jsonl",
)
_TRUE = ("1", "on", "yes", "true")


class DownloadError(RuntimeError):
    """The file could not be fetched; the text says why and how to place it by hand."""


def resolve_name(name: str) -> str:
    """The public file name for `name`, with or without `.jsonl`.

    >>> resolve_name("sft_mini_512"), resolve_name("dpo.jsonl")
    ('sft_mini_512.jsonl', 'dpo.jsonl')
    >>> resolve_name("sft_4096")
    Traceback (most recent call last):
    ...
    ValueError: unknown data file 'sft_4096'; known: pretrain_hq, sft_mini_512, sft_512, sft_1024, sft_2048, lora_identity, lora_medical, dpo, rlaif-mini, r1_mix_1024
    """
    file = name if name.endswith(".jsonl") else f"{name}.jsonl"
    if file not in FILES:
        known = ", ".join(f.removesuffix(".jsonl") for f in FILES)
        raise ValueError(f"unknown data file {name!r}; known: {known}")
    return file


def by_hand(files: list[str], out_dir: Path) -> str:
    """How to place `files` without this command."""
    pages = "\n".join(f"  {PAGES[s]}" for s in SOURCES)
    names = "\n".join(f"  {f}" for f in files)
    return (
        f"To place the files by hand, download them in a browser from\n{pages}\n"
        f"and save them in {out_dir} with these exact names:\n{names}\n"
        "then `minimind data check FILE` validates each one."
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the hub cannot be reached", of whatever client is
    installed (their HTTP libraries differ between versions)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    candidates = {
        "huggingface_hub.errors": ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "HfHubHTTPError"),
        "requests.exceptions": ("ConnectionError", "Timeout", "HTTPError"),
        "httpx": ("TransportError",),
        "httpx2": ("TransportError",),
    }  # fmt: skip
    for module, names in candidates.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(errors)


def _unreachable(exc: BaseException) -> bool:
    network = _network_errors()
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, network):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _fetch(source: str, file: str, out_dir: Path) -> Path:
    if source == "huggingface":
        module, install = "huggingface_hub", "pip install huggingface_hub"
    else:
        module, install = "modelscope.hub.file_download", "pip install modelscope"
    try:
        client = importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise DownloadError(f"the {package} package is not installed ({install})") from None
    if source == "huggingface":
        got = client.hf_hub_download(REPOS[source], file, repo_type="dataset", local_dir=out_dir)
    else:
        got = client.dataset_file_download(REPOS[source], file, local_dir=str(out_dir))
    return Path(got)


def download(
    name: str, source: str = "huggingface", out_dir: str | os.PathLike | None = None
) -> Path:
    """Fetch one public file into `out_dir` (default: the dataset folder); returns its path.

    Raises ValueError for an unknown name or source, DownloadError when offline, when the
    hub cannot be reached, or when the client package is missing.
    """
    file = resolve_name(name)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r} (expected {' or '.join(SOURCES)})")
    out = Path(out_dir) if out_dir is not None else paths.dataset_dir()
    target = out / file
    if target.is_file():
        return target
    if _offline():
        reason = "offline (HF_HUB_OFFLINE is set), no connection tried"
    else:
        out.mkdir(parents=True, exist_ok=True)
        try:
            return _fetch(source, file, out)
        except DownloadError as exc:  # the client package is missing
            reason = str(exc)
        except Exception as exc:
            if not _unreachable(exc):
                raise
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    raise DownloadError(f"could not fetch {file} from {source}: {reason}\n{by_hand([file], out)}")
