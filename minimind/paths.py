"""Where MiniMind reads and writes by default: one base directory, movable with MINIMIND_HOME.

MiniMind users expect `dataset/`, `out/` and `checkpoints/` beside the code, so in a source
checkout the base is the repository root; an installed package without a checkout uses
~/.minimind. Nothing here depends on the current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    env = os.environ.get("MINIMIND_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if (REPO_ROOT / "pyproject.toml").is_file():
        return REPO_ROOT
    return Path.home() / ".minimind"


def dataset_dir() -> Path:
    return home() / "dataset"


def out_dir() -> Path:
    return home() / "out"


def checkpoints_dir() -> Path:
    return home() / "checkpoints"
