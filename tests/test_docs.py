"""The documentation cites only what a clone holds: README and docs/ link to files that exist
(and to headings that exist in them), every `minimind.x.y` a docstring or comment names can be
imported, and `make test` ends with one line per skip reason."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A document named in the text, linked or not: RESULTS.md, docs/FORMATS.md, ...
DOC_NAME = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[A-Z][A-Z_]*\.md)\b")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading.

    >>> slug("bench/serve.py — the API server (issue 3)")
    'benchservepy--the-api-server-issue-3'
    """
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_and_named_documents_exist_in_the_clone(doc):
    text = doc.read_text(encoding="utf-8")
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            missing.append(f"link {target}: no {file.relative_to(REPO)}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            missing.append(f"link {target}: no heading #{anchor} in {file.name}")
    for name in DOC_NAME.findall(text):
        if not (REPO / name).exists():
            missing.append(f"names {name}, which the clone does not hold")
    assert missing == []


def test_formats_reference_covers_every_format():
    text = (REPO / "docs" / "FORMATS.md").read_text(encoding="utf-8")
    for heading in (
        "data-files-json-lines",
        "tokenizer",
        "chat-template-and-sft-loss-mask",
        "token-shards",
        "checkpoint-folder",
        "step-checkpoints-resume",
        "lora-adapter-folder",
        "minimind2-pth-weights",
        "pipeline-record-and-report-card",
    ):
        assert heading in anchors(REPO / "docs" / "FORMATS.md"), heading
    # the files each section names are the ones the code writes
    from minimind import adapter, checkpoint
    from minimind.data import shards
    from minimind.pipeline.runner import STATE_FILE

    for name in (checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME, checkpoint.META_NAME):
        assert f"`{name}`" in text
    assert f"`{checkpoint.TRAINER_STATE_NAME}`" in text and f"`{STATE_FILE}`" in text
    assert f"`{adapter.CONFIG_NAME}`" in text and f"`{adapter.WEIGHTS_NAME}`" in text
    assert f"`{shards.META}`" in text and '"minimind-lora"' in text


MODULE_REF = re.compile(r"(?<![\w./-])minimind(?:\.[A-Za-z_]\w*)+")


def resolves(ref: str) -> bool:
    """`minimind.a.b.c` names a module, or an attribute of the longest importable prefix."""
    parts = ref.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_module_the_code_names_exists():
    stale = [
        f"{path.relative_to(REPO)}:{i}: {ref}"
        for path in sorted((REPO / "minimind").rglob("*.py"))
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for ref in (m.group(0).rstrip(".") for m in MODULE_REF.finditer(line))
        if not resolves(ref)
    ]
    assert stale == []


def test_pytest_ends_with_a_line_per_skip_reason(tmp_path):
    """pyproject's addopts carry -rs, so `make test` says what skipped and why."""
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n"
        "def test_runs():\n    pass\n\n"
        "@pytest.mark.parametrize('i', range(3))\n"
        "def test_skips(i):\n    pytest.skip('no llama_cpp here')\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_skips.py")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^SKIPPED \[3\] .*test_skips\.py:\d+: no llama_cpp here$", out.stdout, re.M)


def test_design_measurements_live_in_results_not_in_docstrings():
    """Docstrings state the design and point to bench/RESULTS.md for the A/B behind it."""
    from minimind.infer import generation, steps
    from minimind.model import layers
    from minimind.tokenizer import fast

    # A/B figures: "before -> after", "410 vs 310", "0.5 ms per", "16 MB of text per"
    figure = re.compile(
        r"\d[\d,]*(?:\.\d+)? ?(?:->|vs) ?\d|\d ms per|\d[\d,]* (?:useful )?tokens/s"
    )
    for doc in (steps.__doc__, layers.InputGroup.__doc__, generation.__doc__, fast.__doc__):
        assert not figure.search(doc) and "bench/RESULTS.md" in doc
    results = (REPO / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    section = results[results.index("## Why the code is shaped so") :]
    for measured in ("7.31 -> 6.38", "165 -> 198", "208 -> 252", "368 -> 737", "about 16"):
        assert measured in section
