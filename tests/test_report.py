"""minimind.pipeline.report (the report card): every file written, report.json equal to the
dict, every number on the markdown card read back and compared with the dict, the HTML saying
the same cell for cell with its PNGs embedded, skipped stages showing their reason, stale plots
removed, the terminal summary; and the page opened in Debian's chromium via playwright.

The report dict below is FAKE: hand-written test input shaped like a real run's (numbers in
the range of bench/RESULTS.md's run L), since the card must render whatever the pipeline
measured. Nothing here trains."""

from __future__ import annotations

import base64
import copy
import html
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from minimind.pipeline.report import (
    MISSING,
    NOT_OK,
    OK,
    parse_cell,
    print_summary,
    read_tables,
    write_report,
)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACT = Path(__file__).parent / "artifacts" / "report_card.png"


def _curve(start: float, end: float, steps: int, every: int) -> list[list[float]]:
    """A falling loss curve, logged every `every` steps (wiggles so it looks logged)."""
    return [
        [s, round(end + (start - end) * math.exp(-s / (steps / 4)) + 0.03 * math.sin(s), 4)]
        for s in range(0, steps + 1, every)
    ]


def fake_report() -> dict:
    """A report dict as the pipeline hands it over (fake: test input only)."""
    sft_metrics = [
        ("facts", "trained", None, 1.0, 0.14, 192),
        ("facts", "held-out", None, 0.65625, 0.14, 192),
        ("arithmetic", "trained", None, 0.9125, 0.082, 160),
        ("arithmetic", "held-out", None, 0.634146, 0.085, 164),
    ]
    return {
        "title": "MiniMind demo — report card",
        "created": "2026-12-04T10:15:00+00:00",
        "workdir": "/tmp/runs/demo",
        "total_wall_s": 483.27,
        "budget_s": 600.0,
        "environment": {
            "git_commit": "ce7fe3c0d1",
            "data_hash": "sha256:9f1c2ab4",
            "hardware": "2 CPU cores (x86_64), no GPU",
            "python": "3.11.9",
            "torch": "2.13.0+cpu",
            "libraries": {"tokenizers": "0.22.1", "transformers": "5.0.0", "matplotlib": "3.11"},
        },
        "config": {
            "preset": "demo",
            "parameters": 2_031_616,
            "pretrain_lr": 0.003,
            "pretrain_batch": 8,
            "split_digits": True,
            "eval_limit": None,
        },
        "stages": [
            {
                "name": "pretrain",
                "title": "Pretraining",
                "status": "done",
                "reason": None,
                "wall_s": 275.41,
                "tokens": 3_145_728,
                "tokens_per_s": 11421.7,
                "steps": 3072,
                "metrics": [
                    {
                        "name": "eval_loss",
                        "label": "held-out loss",
                        "split": "held-out",
                        "before": 7.6243,
                        "after": 0.9512,
                        "unit": "loss",
                        "chance": None,
                        "n": 1234,
                    },
                    {
                        "name": "bits_per_byte",
                        "label": "bits per byte",
                        "split": "held-out",
                        "before": None,
                        "after": 0.4123,
                        "unit": "bits/byte",
                        "chance": None,
                        "n": None,
                    },
                ],
                "curves": {
                    "train": _curve(7.6, 0.9, 3072, 25),
                    "eval": _curve(7.6, 0.95, 3072, 512),
                },
                "artifacts": {"checkpoint": "out/pretrain_64"},
                "notes": ["3 epochs of 8 windows of 128 tokens per step"],
            },
            {
                "name": "sft",
                "title": "Supervised fine-tuning",
                "status": "done",
                "reason": None,
                "wall_s": 113.02,
                "tokens": 1_310_720,
                "tokens_per_s": 11597.2,
                "steps": 1440,
                "metrics": [
                    {
                        "name": f"{task}_{split}",
                        "label": task,
                        "split": split,
                        "before": before,
                        "after": after,
                        "unit": "accuracy",
                        "chance": chance,
                        "n": n,
                    }
                    for task, split, before, after, chance, n in sft_metrics
                ],
                "curves": {
                    "train": _curve(3.1, 0.2, 1440, 25),
                    "eval": _curve(3.1, 0.25, 1440, 480),
                },
                "artifacts": {"checkpoint": "out/full_sft_64"},
                "notes": [],
            },
            {
                "name": "lora",
                "title": "LoRA (identity)",
                "status": "skipped",
                "reason": "the LoRA identity stage has not landed in the pipeline yet",
                "wall_s": None,
                "tokens": None,
                "tokens_per_s": None,
                "steps": None,
                "metrics": [],
                "curves": {},
                "artifacts": {},
                "notes": [],
            },
            {
                "name": "grpo",
                "title": "GRPO",
                "status": "reused",
                "reason": None,
                "wall_s": 0.4,
                "tokens": 201_326,
                "tokens_per_s": None,
                "steps": 128,
                "metrics": [
                    {
                        "name": "arith_rl",
                        "label": "arithmetic on the RL pairs",
                        "split": "trained",
                        "before": 0.428571,
                        "after": 0.720779,
                        "unit": "accuracy",
                        "chance": 0.075,
                        "n": 154,
                    },
                    {
                        "name": "reward_s",
                        "label": "time per step",
                        "split": None,
                        "before": None,
                        "after": 0.37,
                        "unit": "seconds",
                        "chance": None,
                        "n": None,
                    },
                ],
                "curves": {"train": _curve(0.9, 0.4, 128, 4), "eval": []},
                "artifacts": {},
                "notes": ["reused: inputs unchanged since the last run"],
            },
            {
                "name": "export",
                "title": "Exports",
                "status": "failed",
                "reason": "GGUF export: `gguf` is not installed (pip install -e '.[gguf]')",
                "wall_s": 1.25,
                "tokens": None,
                "tokens_per_s": None,
                "steps": None,
                "metrics": [
                    {
                        "name": "hf_diff",
                        "label": "max |logit diff| vs transformers",
                        "split": None,
                        "before": None,
                        "after": 2.384e-06,
                        "unit": "ratio",
                        "chance": None,
                        "n": None,
                    }
                ],
                "curves": {"train": [], "eval": []},
                "artifacts": {"transformers": "out/demo-hf"},
                "notes": [],
            },
        ],
        "goals": [
            {
                "name": "sft/facts_held-out",
                "target": ">= 80% held-out facts after SFT",
                "value": 0.65625,
                "met": False,
                "detail": "binds the wrong relation in unseen phrasings",
            },
            {
                "name": "sft/arithmetic_held-out",
                "target": ">= 60% held-out arithmetic after SFT",
                "value": 0.634146,
                "met": True,
                "detail": "",
            },
            {
                "name": "grpo_gain",
                "target": "GRPO raises arithmetic by >= 10 points",
                "value": 0.292208,
                "met": True,
                "detail": "on the RL operand pairs | C:\\runs\\",
            },
            {
                "name": "time",
                "target": "<= 600 s on 2 cores",
                "value": 483.27,
                "unit": "seconds",
                "met": True,
                "detail": "",
            },
            {
                "name": "distill",
                "target": "student beats SFT-only student",
                "value": None,
                "met": None,
                "detail": "not measured: stage skipped",
            },
        ],
        "samples": [
            {
                "stage": "sft",
                "prompt": "Could you tell me Mira's occupation?",
                "reply": "Mira is a teacher.",
            },
            {"stage": "sft", "prompt": "伊万来自哪个镇？", "reply": "伊万来自青石镇。"},
            {
                "stage": "reason",
                "prompt": "What is 12 + 7?",
                "reply": "<think>\n12 + 7 = 19 ```\n| not | a table |\n# nor a heading\n</think>\n"
                "<answer>\n19\n</answer>",
            },
        ],
        "next": [
            "minimind chat --load_from /tmp/runs/demo/out/full_sft_64",
            "minimind serve --load_from /tmp/runs/demo/out/full_sft_64",
            "minimind web --load_from /tmp/runs/demo/out/full_sft_64",
        ],
    }


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    report = fake_report()
    out = tmp_path_factory.mktemp("card")
    return report, out, write_report(copy.deepcopy(report), out)


# --- reading numbers back --------------------------------------------------------------------

# half a unit of the last digit each format writes (parse_cell gives fractions for "%" and "pt")
TOLERANCE = {"accuracy": 0.0005, "points": 0.0005, "loss": 0.0005, "seconds": 0.05, None: 0.0}


def assert_shows(cell: str, value: float | None, unit: str | None, what: str) -> None:
    """`cell` is `value` written in `unit`, to the precision the card promises."""
    if value is None:
        assert cell == MISSING, f"{what}: {cell!r} for a missing value"
        return
    got = parse_cell(cell)
    assert got is not None, f"{what}: {cell!r} for {value}"
    if unit in TOLERANCE:
        assert abs(got - value) <= TOLERANCE[unit] + 1e-9, f"{what}: {cell!r} is not {value}"
    else:  # ratio: 3 significant digits, other units 4
        assert math.isclose(got, value, rel_tol=5e-3), f"{what}: {cell!r} is not {value}"
    if unit == "accuracy":
        assert cell.endswith("%"), f"{what}: {cell!r}"
    if unit not in TOLERANCE and unit != "ratio":
        assert cell.endswith(f" {unit}"), f"{what}: {cell!r} lacks its unit"


def assert_count(cell: str, value: float | None, what: str) -> None:
    if value is None:
        assert cell == MISSING, f"{what}: {cell!r}"
    else:
        assert parse_cell(cell) == round(value), f"{what}: {cell!r} is not {value}"


def tables_by_heading(md: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    tables = read_tables(md)
    assert len({h for h, _, _ in tables}) == len(tables), "one table per heading"
    return {h: (header, rows) for h, header, rows in tables}


# --- the files -------------------------------------------------------------------------------


def test_every_file_written_and_json_round_trips(card):
    report, out, written = card
    expected = {"report.json", "report.md", "report.html", "plots/metrics.png"}
    expected |= {f"plots/loss_{s}.png" for s in ("pretrain", "sft", "grpo")}
    assert set(written) == expected  # no loss plot for lora (skipped) or export (no curves)
    for rel, path in written.items():
        assert path == out / rel and path.stat().st_size > 0, rel
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(
        Path(r).name for r in expected if r.startswith("plots/")
    )
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temp file behind
    assert json.loads((out / "report.json").read_text("utf-8")) == report


def test_markdown_numbers_equal_the_dict(card):
    report, out, _ = card
    md = (out / "report.md").read_text("utf-8")
    tables = tables_by_heading(md)
    lines = md.splitlines()
    assert lines[0] == f"# {report['title']}"
    assert lines[2] == "Finished in 483.3 s of a 600 s budget · goals met 3/5 · stages: " + (
        "2 done, 1 reused, 1 skipped, 1 failed"
    )

    header, rows = tables["Goals"]
    assert header == ["goal", "target", "reached", "met", "detail"]
    assert len(rows) == len(report["goals"])
    units = ["accuracy", "accuracy", "points", "seconds", None]
    for row, goal, unit in zip(rows, report["goals"], units, strict=True):
        assert row[:2] == [goal["name"], goal["target"]]
        assert_shows(row[2], goal["value"], unit, f"goal {goal['name']}")
        assert row[3] == {True: OK, False: NOT_OK, None: MISSING}[goal["met"]]
        assert row[4] == goal["detail"]
    assert rows[0][2] == "65.6%" and rows[2][2] == "+29.2 pt"  # as the brief writes them

    header, rows = tables["Stages"]
    assert header == ["stage", "status", "wall s", "steps", "tokens", "tokens/s", "note"]
    for row, stage in zip(rows, report["stages"], strict=True):
        assert stage["name"] in row[0] and row[1] == stage["status"]
        assert_shows(row[2], stage["wall_s"], "seconds", f"{stage['name']} wall s")
        for cell, key in zip(row[3:6], ("steps", "tokens", "tokens_per_s")):
            assert_count(cell, stage[key], f"{stage['name']} {key}")
        assert row[6] == (stage["reason"] if stage["status"] in ("skipped", "failed") else "")

    checked = 0
    for stage in report["stages"]:
        heading = f"{stage['title']} ({stage['name']})"
        if not stage["metrics"]:
            assert heading not in tables
            continue
        header, rows = tables[heading]
        assert header == ["measure", "split", "before", "after", "change", "chance", "n"]
        for row, m in zip(rows, stage["metrics"], strict=True):
            what, unit = f"{stage['name']}/{m['name']}", m["unit"]
            assert row[0] == m["label"] and row[1] == (m["split"] or MISSING)
            assert_shows(row[2], m["before"], unit, f"{what} before")
            assert_shows(row[3], m["after"], unit, f"{what} after")
            change = None if m["before"] is None else m["after"] - m["before"]
            assert_shows(row[4], change, "points" if unit == "accuracy" else unit, f"{what} change")
            assert_shows(row[5], m["chance"], unit, f"{what} chance")
            assert_count(row[6], m["n"], f"{what} n")
            checked += 1
    assert checked == 9

    _, rows = tables["Configuration"]
    assert rows == [
        ["preset", "demo"],
        ["parameters", "2031616"],
        ["pretrain_lr", "0.003"],
        ["pretrain_batch", "8"],
        ["split_digits", "True"],
        ["eval_limit", MISSING],
    ]
    _, rows = tables["Environment"]
    env = report["environment"]
    assert dict(rows) == {
        **{k: env[k] for k in ("git_commit", "data_hash", "hardware", "python", "torch")},
        **env["libraries"],
    }


def test_markdown_links_plots_and_keeps_samples_verbatim(card):
    report, out, written = card
    md = (out / "report.md").read_text("utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(r for r in written if r.startswith("plots/"))
    for sample in report["samples"]:
        assert f"user:  {sample['prompt']}\nmodel: {sample['reply']}" in md
    assert "````text\nuser:  What is 12 + 7?" in md  # the reply holds ```: a longer fence
    assert "```text\n" + "\n".join(report["next"]) + "\n```" in md


class _Page(HTMLParser):
    """The parts of report.html a test compares: headings, table cells, image sources, and
    every URL-bearing attribute."""

    def __init__(self):
        super().__init__()
        self.headings, self.tables, self.images, self.urls = [], [], [], []
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "action") and v]
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        if tag in ("th", "td", "h1", "h2", "h3", "h4"):
            self._text = []

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self.tables[-1][-1].append("".join(self._text))
        elif tag in ("h1", "h2", "h3", "h4"):
            self.headings.append("".join(self._text))
        if tag in ("th", "td", "h1", "h2", "h3", "h4"):
            self._text = None


def test_html_says_what_the_markdown_says_and_embeds_its_plots(card):
    _, out, written = card
    md = (out / "report.md").read_text("utf-8")
    page = (out / "report.html").read_text("utf-8")
    parsed = _Page()
    parsed.feed(page)
    assert parsed.tables == [[header, *rows] for _, header, rows in read_tables(md)]
    headings, fenced = [], False
    for line in md.splitlines():  # every line outside the tables: headings, text, code
        if line.startswith("```"):
            fenced = not fenced if line.strip("`") in ("text", "") else fenced
        elif fenced:
            assert html.escape(line) in page, line  # verbatim in a <pre>
        elif line.startswith("#"):
            headings.append(line.lstrip("#").strip())
        elif line.startswith("- "):
            assert f"<li>{html.escape(line[2:])}</li>" in page, line
        elif line and line[0] not in "|!":
            assert f">{html.escape(line)}</p>" in page, line
    assert parsed.headings == headings
    plots = [p for r, p in written.items() if r.startswith("plots/")]
    assert len(parsed.images) == len(plots)
    embedded = sorted(base64.b64decode(src.split(",", 1)[1]) for src in parsed.images)
    assert embedded == sorted(p.read_bytes() for p in plots)
    assert all(u.startswith("data:image/png;base64,") for u in parsed.urls)  # self-contained
    assert "http://" not in page and "https://" not in page and "url(" not in page


def test_plots_are_images(card):
    image = pytest.importorskip("matplotlib.image")
    _, _, written = card
    for rel, path in written.items():
        if rel.endswith(".png"):
            pixels = image.imread(path)
            assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, rel
            assert pixels.std() > 0.01, f"{rel} is blank"
    tall, short = (
        image.imread(written["plots/metrics.png"]),
        image.imread(written["plots/loss_sft.png"]),
    )
    assert tall.shape[0] > short.shape[0]  # one bar pair per accuracy: 4 SFT + 1 GRPO rows


def test_skipped_and_failed_stages_show_their_reason(card):
    report, out, _ = card
    md = (out / "report.md").read_text("utf-8")
    page = (out / "report.html").read_text("utf-8")
    for stage in report["stages"]:
        if stage["status"] in ("skipped", "failed"):
            line = f"{stage['status'].capitalize()}: {stage['reason']}"
            section = md.split(f"### {stage['title']} ({stage['name']})")[1].split("\n### ")[0]
            assert line in section
            assert html.escape(line) in page


def test_minimal_report_and_stale_plots(tmp_path):
    full = fake_report()
    write_report(full, tmp_path)
    assert (tmp_path / "plots" / "loss_pretrain.png").exists()
    minimal = {"stages": [{"name": "pretrain", "status": "skipped", "reason": "--from sft"}]}
    written = write_report(minimal, tmp_path)  # the same folder: the old plots must go
    assert set(written) == {"report.json", "report.md", "report.html"}
    assert list((tmp_path / "plots").iterdir()) == []
    md = (tmp_path / "report.md").read_text("utf-8")
    assert "No goals were set for this run." in md and "Skipped: --from sft" in md
    assert "Unfinished (no total time) · goals met 0/0 · stages: 1 skipped" in md
    assert "<img" not in (tmp_path / "report.html").read_text("utf-8")


def test_print_summary():
    report = fake_report()
    text = print_summary(report)
    lines = text.splitlines()
    assert lines[0].startswith(f"{report['title']} — Finished in 483.3 s of a 600 s budget")
    goal_rows = {line.split()[0]: line for line in lines if line.startswith(("sft/", "grpo_"))}
    assert goal_rows["sft/facts_held-out"].endswith(f"65.6%  {NOT_OK}")
    assert goal_rows["sft/arithmetic_held-out"].endswith(f"63.4%  {OK}")
    assert goal_rows["grpo_gain"].endswith(f"+29.2 pt  {OK}")
    stage_rows = {line.split()[0]: line.split(None, 3)[1:] for line in lines[-5:]}
    assert stage_rows["pretrain"] == ["done", "275.4", "held-out loss: 7.624 -> 0.951"]
    assert stage_rows["sft"] == ["done", "113.0", "facts: 100.0%"]
    assert stage_rows["grpo"] == ["reused", "0.4", "arithmetic on the RL pairs: 42.9% -> 72.1%"]
    assert stage_rows["lora"] == ["skipped", MISSING, report["stages"][2]["reason"]]
    assert stage_rows["export"][:2] == ["failed", "1.2"]
    assert all(len(line) < 140 for line in lines)  # a terminal's width, not a page's


def test_parse_cell_names_what_it_cannot_read():
    with pytest.raises(ValueError, match="'n/a'"):
        parse_cell("n/a")


# --- the page in a browser -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_report_in_chromium(card, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(
            "no /usr/bin/chromium: `make test` installs Debian's chromium when run as root with "
            "apt-get (or: apt-get install chromium)"
        )
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    report, out, written = card
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "report.html").as_uri())
            page.wait_for_load_state("load")
            assert page.title() == report["title"]
            assert page.get_by_role("heading", level=1).inner_text() == report["title"]
            goals = page.locator("#goals-table")
            assert goals.is_visible()
            text = goals.inner_text()
            for goal in report["goals"]:
                assert goal["target"] in text
            for shown in ("65.6%", "63.4%", "+29.2 pt", "483.3 s", OK, NOT_OK):
                assert shown in text
            sizes = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])"
            )
            assert len(sizes) == sum(r.startswith("plots/") for r in written)
            assert all(done and w > 0 and h > 0 for done, w, h in sizes), sizes
            # the page itself, then only data: URIs: nothing fetched from anywhere
            assert [u for u in requests if not u.startswith("data:")] == [
                (out / "report.html").as_uri()
            ]
            shot = tmp_path / "report_card.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    ARTIFACT.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACT)
