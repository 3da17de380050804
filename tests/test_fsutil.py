"""fsutil: the one owner of atomic writes. Files and folders appear whole or not at all, and no
other module renames anything into place (checkpoints, shards, GGUF, .pth, reports)."""

import ast
import json
import os
from pathlib import Path

import pytest

import minimind
from minimind import fsutil
from minimind.fsutil import AtomicFile, AtomicFolder, atomic_write, committed_folder

ROOT = Path(minimind.__file__).resolve().parent.parent


def file_moves(source: str) -> list[tuple[int, str]]:
    """(line, call) of every call that creates a temp file, renames or fsyncs: os.replace,
    os.rename, os.fsync, tempfile.mkstemp, and Path.replace/rename (one argument; str.replace
    takes two)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr, owner = node.func.attr, node.func.value
        module = owner.id if isinstance(owner, ast.Name) else ""
        if module == "os" and attr in ("replace", "rename", "fsync"):
            found.append((node.lineno, f"os.{attr}"))
        elif module == "tempfile" and attr in ("mkstemp", "NamedTemporaryFile"):
            found.append((node.lineno, f"tempfile.{attr}"))
        elif attr in ("replace", "rename") and len(node.args) == 1 and not node.keywords:
            found.append((node.lineno, f".{attr}(...)"))
    return found


def test_only_fsutil_renames_files_into_place():
    files = [*sorted((ROOT / "minimind").rglob("*.py")), *sorted((ROOT / "bench").glob("*.py"))]
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {call}"
        for path in files
        if path.name != "fsutil.py"
        for line, call in file_moves(path.read_text(encoding="utf-8"))
    ]
    assert offenders == [], "write through minimind.fsutil (AtomicFile, AtomicFolder) instead"
    assert file_moves((ROOT / "minimind" / "fsutil.py").read_text())  # the checker finds them


def test_atomic_file_commits_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic_write(path, lambda f: f.write(b"old"))
    with pytest.raises(RuntimeError, match="killed"), AtomicFile(path) as out:
        out.tmp.write_bytes(b"half of the ne")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]  # no temp left
    with AtomicFile(path) as out:  # a writer that wants a path (GGUFWriter, save_file)
        assert out.tmp.parent == path.parent and out.tmp.name.startswith(".report.json.")
        out.tmp.write_bytes(b"new")
        assert path.read_bytes() == b"old"  # nothing is visible before the commit
    assert path.read_bytes() == b"new"
    with pytest.raises(ValueError, match="not beside"):
        AtomicFile(path, tmp=tmp_path / "elsewhere.tmp")


def test_bench_reports_go_through_fsutil(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    path = tmp_path / "results" / "x.json"
    report.write_report({"a": 1}, path)
    calls = []
    monkeypatch.setattr(fsutil, "fsync_file", lambda p: calls.append(Path(p)))
    report.write_report({"a": 2}, path)
    assert json.loads(path.read_text()) == {"a": 2}
    # the temp file was fsynced before the rename (the old writer never fsynced)
    assert len(calls) == 1 and calls[0].parent == path.parent and calls[0] != path
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_atomic_folder_swaps_whole_folders_and_readers_fall_back(tmp_path):
    path = tmp_path / "ck"

    def write(text: str) -> None:
        with AtomicFolder(path) as f:
            (f.staging / "a.txt").write_text(text)
            (f.staging / "sub").mkdir()
            (f.staging / "sub" / "b.txt").write_text(text)

    write("1")
    with pytest.raises(RuntimeError), AtomicFolder(path) as f:
        (f.staging / "a.txt").write_text("2")
        raise RuntimeError
    assert (path / "a.txt").read_text() == "1" and (path / "sub" / "b.txt").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == [".ck.lock", "ck"]
    write("2")
    assert (path / "a.txt").read_text() == "2"
    path.rename(tmp_path / "ck.old")  # what a kill between the two renames leaves
    assert committed_folder(path) == tmp_path / "ck.old"
    write("3")
    assert committed_folder(path) == path and (path / "a.txt").read_text() == "3"
    assert sorted(os.listdir(tmp_path)) == [".ck.lock", "ck"]

    def refuse(p: Path) -> None:
        raise ValueError(f"not replacing {p}")

    with pytest.raises(ValueError, match="not replacing"), AtomicFolder(path, check=refuse):
        pass
    assert (path / "a.txt").read_text() == "3"
