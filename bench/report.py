"""How every benchmark writes its JSON report: whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

from minimind.fsutil import atomic_write


def write_report(report: dict, path: Path) -> None:
    """`report` as indented JSON at `path` (parents made), through `fsutil.atomic_write`
    (temp file, fsync, rename), so an interrupted run never leaves half a file where the last
    good one was."""
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
