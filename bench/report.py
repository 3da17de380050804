"""How every benchmark writes its JSON report: whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, path: Path) -> None:
    """`report` as indented JSON at `path` (parents made; written to a temp file, then renamed,
    so an interrupted run never leaves half a file where the last good one was)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
