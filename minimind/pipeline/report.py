"""The pipeline's report card: one dict in, report.json + report.md + plots/*.png + report.html.

Owns how a finished run is shown: the layout of the card, how each kind of number is written,
the plots, and the compact table printed at the end of `minimind demo`. It measures nothing and
runs nothing: the pipeline (minimind/pipeline/__init__.py) hands it one dict and every number
on the card is rendered from that dict alone, so `report.json` is the card's source of truth
and a test can read the markdown tables back (`read_tables`, `parse_cell`) and compare.

Design:
- The card is built once as a list of blocks (heading, paragraph, table, image, list,
  preformatted text) and rendered twice, to markdown and to HTML, so the two say the same thing
  cell for cell. The HTML is one self-contained page: inline CSS, the PNGs as base64 `data:`
  URIs, no external reference, so it can be mailed or opened offline.
- Every file is written atomically (`minimind.fsutil.atomic_write`): an interrupted run leaves
  the previous card or the new one, never half of one. Plots from an earlier run that this run
  did not draw (a stage now skipped) are removed, so plots/ matches the card.
- Plots use matplotlib's object API on the Agg canvas (no pyplot, no global backend switch),
  imported inside the one function that draws, so importing this module stays cheap.

The dict (the pipeline produces it; every key but `stages[].name` and `stages[].status` may be
missing, and a skipped or failed stage shows its `reason`)::

    title, created (ISO-8601), workdir, total_wall_s, budget_s (None: no budget)
    environment: git_commit, data_hash, hardware, python, torch, libraries {name: version}
    config: {name: value}
    stages: [{name, title, status: done|reused|skipped|failed, reason, wall_s, tokens,
              tokens_per_s, steps,
              metrics: [{name, label, split: trained|held-out|None, before, after,
                         unit: accuracy|loss|ratio|seconds|<any>, chance, n}],
              curves: {train: [[step, loss]], eval: [[step, loss]]},
              artifacts: {label: relative path}, notes: [str]}]
    goals: [{name, target (text), value, met: bool|None, detail}]
    samples: [{stage, prompt, reply}]
    next: [command]

Optional keys this module also reads: a goal's `unit` (how its value is written; without it a
target containing "%" means an accuracy, one containing "point" a change in points), a goal's
`metric` ("stage/metric name") and `threshold` (in the metric's unit) to mark the goal on the
metrics chart, and a metric's `headline: false` to keep an accuracy off that chart.

How numbers are written (units of a metric; a goal uses the same table):
accuracy 0.656 -> "65.6%" (a change: "+10.4 pt"), loss -> 3 decimals, seconds -> "12.3 s",
ratio -> 3 significant digits, any other unit -> 4 significant digits and the unit's name;
counts get thousands separators; a missing value is "—".
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from minimind.fsutil import atomic_write

MISSING = "—"
OK, NOT_OK = "✓", "✗"
PLOTS = "plots"
STATUSES = ("done", "reused", "skipped", "failed")


# --- numbers ---------------------------------------------------------------------------------


def format_value(value: float | None, unit: str | None = None) -> str:
    """One measured value as the card writes it.

    >>> format_value(0.656, "accuracy"), format_value(1.0, "accuracy")
    ('65.6%', '100.0%')
    >>> format_value(1.4523, "loss"), format_value(12.34, "seconds"), format_value(None, "loss")
    ('1.452', '12.3 s', '—')
    >>> format_value(0.00012345, "ratio"), format_value(2.5, "bits/byte"), format_value(7, None)
    ('0.000123', '2.5 bits/byte', '7')
    """
    if value is None:
        return MISSING
    if unit == "accuracy":
        return f"{100 * value:.1f}%"
    if unit == "points":  # a change of an accuracy, given as a fraction
        return f"{100 * value:+.1f} pt"
    if unit == "loss":
        return f"{value:.3f}"
    if unit == "seconds":
        return f"{value:.1f} s"
    if unit == "ratio":
        return f"{value:.3g}"
    return f"{value:.4g}" + (f" {unit}" if unit else "")


def format_change(before: float | None, after: float | None, unit: str | None = None) -> str:
    """`after - before`, signed; an accuracy's change in percentage points.

    >>> format_change(0.429, 0.721, "accuracy"), format_change(3.56, 1.45, "loss")
    ('+29.2 pt', '-2.110')
    >>> format_change(None, 0.5, "accuracy")
    '—'
    """
    if before is None or after is None:
        return MISSING
    delta = after - before
    if unit in ("accuracy", "points"):
        return f"{100 * delta:+.1f} pt"
    if unit == "loss":
        return f"{delta:+.3f}"
    if unit == "seconds":
        return f"{delta:+.1f} s"
    if unit == "ratio":
        return f"{delta:+.3g}"
    return f"{delta:+.4g}" + (f" {unit}" if unit else "")


def format_count(value: int | float | None) -> str:
    """A count (steps, tokens, tokens/s, n) with thousands separators.

    >>> format_count(1234567), format_count(None), format_count(1234.6)
    ('1,234,567', '—', '1,235')
    """
    return MISSING if value is None else f"{round(value):,}"


def format_seconds(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def parse_cell(cell: str) -> float | None:
    """A number as written on the card, read back (the inverse of the formatters, to their
    precision): percentages and points as fractions, units and separators dropped.

    >>> parse_cell("65.6%"), parse_cell("+10.4 pt"), parse_cell("1,234"), parse_cell("12.3 s")
    (0.656, 0.104, 1234.0, 12.3)
    >>> parse_cell("—") is None, parse_cell("-2.110"), parse_cell("2.5 bits/byte")
    (True, -2.11, 2.5)
    """
    cell = cell.strip()
    if cell == MISSING:
        return None
    m = re.fullmatch(r"([+-]?[0-9][0-9,]*(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)\s*(%|pt)?(?:\s.*)?", cell)
    if m is None:
        raise ValueError(f"not a number as the report card writes one: {cell!r}")
    value = float(m.group(1).replace(",", ""))
    return round(value / 100, 12) if m.group(2) else value


def goal_unit(goal: dict) -> str | None:
    """How a goal's value is written: its `unit`, else guessed from the target's text.

    >>> goal_unit({"target": ">= 80% held-out"}), goal_unit({"target": "+10 points"})
    ('accuracy', 'points')
    >>> goal_unit({"target": "<= 600 s", "unit": "seconds"}), goal_unit({"target": "beats SFT"})
    ('seconds', None)
    """
    if goal.get("unit"):
        return goal["unit"]
    target = str(goal.get("target") or "")
    if "point" in target:
        return "points"
    return "accuracy" if "%" in target else None


def met_mark(met: bool | None) -> str:
    return MISSING if met is None else (OK if met else NOT_OK)


# --- the card as blocks ----------------------------------------------------------------------


@dataclass
class Heading:
    level: int
    text: str
    id: str = ""


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: str  # one letter per column: "l" or "r"
    id: str = ""


@dataclass
class Image:
    alt: str
    path: Path  # the PNG on disk; the markdown links it relatively, the HTML embeds it


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Pre:
    text: str


def _slug(text: str) -> str:
    """A heading's anchor or a plot's file name.

    >>> _slug("Knowledge distillation / student")
    'knowledge-distillation-student'
    """
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _goals_met(report: dict) -> tuple[int, int]:
    goals = report.get("goals") or []
    return sum(g.get("met") is True for g in goals), len(goals)


def summary_line(report: dict) -> str:
    """The card's first line: total time against the budget, goals met, stages run.

    >>> summary_line({"total_wall_s": 483.24, "budget_s": 600, "goals": [{"met": True},
    ...     {"met": False}], "stages": [{"status": "done"}, {"status": "skipped"}]})
    'Finished in 483.2 s of a 600 s budget · goals met 1/2 · stages: 1 done, 1 skipped'
    """
    total, budget = report.get("total_wall_s"), report.get("budget_s")
    if total is None:
        parts = ["Unfinished (no total time)"]
    elif budget is None:
        parts = [f"Finished in {total:.1f} s (no time budget)"]
    else:
        over = " — over budget" if total > budget else ""
        parts = [f"Finished in {total:.1f} s of a {budget:g} s budget{over}"]
    met, count = _goals_met(report)
    parts.append(f"goals met {met}/{count}")
    stages = report.get("stages") or []
    counts = [(s, sum(st.get("status") == s for st in stages)) for s in STATUSES]
    if stages:
        parts.append("stages: " + ", ".join(f"{n} {s}" for s, n in counts if n))
    return " · ".join(parts)


def _goal_rows(report: dict) -> list[list[str]]:
    rows = []
    for g in report.get("goals") or []:
        value = format_value(g.get("value"), goal_unit(g))
        name, target, detail = (str(g.get(k) or "") for k in ("name", "target", "detail"))
        rows.append([name, target, value, met_mark(g.get("met")), detail])
    return rows


def _stage_row(s: dict) -> list[str]:
    note = (s.get("reason") or "") if s.get("status") in ("skipped", "failed") else ""
    return [
        _stage_title(s),
        str(s.get("status", "")),
        format_seconds(s.get("wall_s")),
        format_count(s.get("steps")),
        format_count(s.get("tokens")),
        format_count(s.get("tokens_per_s")),
        note,
    ]


def _stage_title(s: dict) -> str:
    title, name = s.get("title") or s["name"], s["name"]
    return title if title == name else f"{title} ({name})"


def _metric_rows(s: dict) -> list[list[str]]:
    rows = []
    for m in s.get("metrics") or []:
        unit = m.get("unit")
        rows.append(
            [
                str(m.get("label") or m.get("name", "")),
                str(m.get("split") or MISSING),
                format_value(m.get("before"), unit),
                format_value(m.get("after"), unit),
                format_change(m.get("before"), m.get("after"), unit),
                format_value(m.get("chance"), unit),
                format_count(m.get("n")),
            ]
        )
    return rows


def _scalar(value) -> str:
    if value is None:
        return MISSING
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


GOALS_HEADER = ["goal", "target", "reached", "met", "detail"]
STAGES_HEADER = ["stage", "status", "wall s", "steps", "tokens", "tokens/s", "note"]
METRICS_HEADER = ["measure", "split", "before", "after", "change", "chance", "n"]


def build_blocks(report: dict, plots: dict[str, Path]) -> list:
    """The card's content in order; `plots` maps "metrics" and "loss:<stage name>" to PNGs."""
    title = report.get("title") or "MiniMind report"
    blocks: list = [Heading(1, title, "top"), Para(summary_line(report))]
    when = [f"created {report['created']}" if report.get("created") else ""]
    when.append(f"workdir {report['workdir']}" if report.get("workdir") else "")
    if any(when):
        blocks.append(Para(" · ".join(w for w in when if w)))

    blocks.append(Heading(2, "Goals", "goals"))
    if report.get("goals"):
        blocks.append(Table(GOALS_HEADER, _goal_rows(report), "llrll", "goals-table"))
    else:
        blocks.append(Para("No goals were set for this run."))

    stages = report.get("stages") or []
    blocks.append(Heading(2, "Stages", "stages"))
    rows = [_stage_row(s) for s in stages]
    blocks.append(Table(STAGES_HEADER, rows, "llrrrrl", "stages-table"))
    if "metrics" in plots:
        blocks.append(Image("Accuracies before and after each stage", plots["metrics"]))

    for s in stages:
        blocks.append(Heading(3, _stage_title(s), "stage-" + _slug(s["name"])))
        status = s.get("status", "")
        if status in ("skipped", "failed"):
            blocks.append(Para(f"{status.capitalize()}: {s.get('reason') or 'no reason given'}"))
        if s.get("metrics"):
            blocks.append(
                Table(METRICS_HEADER, _metric_rows(s), "llrrrrr", "metrics-" + _slug(s["name"]))
            )
        if f"loss:{s['name']}" in plots:
            blocks.append(Image(f"{_stage_title(s)}: loss", plots[f"loss:{s['name']}"]))
        if s.get("notes"):
            blocks.append(Bullets([str(n) for n in s["notes"]]))
        if s.get("artifacts"):
            files = " · ".join(f"{k} {v}" for k, v in s["artifacts"].items())
            blocks.append(Para(f"Files: {files}"))

    if report.get("samples"):
        blocks.append(Heading(2, "Sample chats", "samples"))
        for x in report["samples"]:
            blocks.append(Heading(4, str(x.get("stage", ""))))
            blocks.append(Pre(f"user:  {x.get('prompt', '')}\nmodel: {x.get('reply', '')}"))

    if report.get("config"):
        blocks.append(Heading(2, "Configuration", "config"))
        rows = [[str(k), _scalar(v)] for k, v in report["config"].items()]
        blocks.append(Table(["setting", "value"], rows, "ll", "config-table"))

    env = report.get("environment") or {}
    if env:
        blocks.append(Heading(2, "Environment", "environment"))
        rows = [
            [key, _scalar(env.get(key))]
            for key in ("git_commit", "data_hash", "hardware", "python", "torch")
            if key in env
        ]
        rows += [[str(k), _scalar(v)] for k, v in (env.get("libraries") or {}).items()]
        blocks.append(Table(["", "version / value"], rows, "ll", "environment-table"))

    if report.get("next"):
        blocks.append(Heading(2, "Next", "next"))
        blocks.append(Pre("\n".join(str(c) for c in report["next"])))
    return blocks


# --- markdown --------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list, out_dir: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |"]
            lines.append("|" + "|".join("---:" if a == "r" else "---" for a in b.align) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path.relative_to(out_dir).as_posix()})")
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {i.replace(chr(10), ' ')}" for i in b.items))
        elif isinstance(b, Pre):
            # a fence longer than any run of backticks inside, so any reply is shown verbatim
            fence = "`" * max(3, 1 + max((len(r) for r in re.findall("`+", b.text)), default=0))
            out.append(f"{fence}text\n{b.text}\n{fence}")
    return "\n\n".join(out) + "\n"


def read_tables(markdown: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every table of a card written by `render_markdown`, as (the heading above it, header,
    rows of cells), escapes undone: what a test compares with report.json.

    >>> read_tables("## Goals\\n\\n| a | b |\\n|---|---:|\\n| x \\\\| y | 1.0% |\\n")
    [('Goals', ['a', 'b'], [['x | y', '1.0%']])]
    """
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    heading, current, fence = "", None, ""
    for line in markdown.splitlines():
        if fence or line.startswith("```"):  # a sample reply may hold "|" or "#" lines
            opening = re.match(r"`{3,}", line)
            if not fence:
                fence = opening.group(0)
            elif line == fence:
                fence = ""
            current = None
            continue
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not line.startswith("|"):
            current = None
            continue
        cells = _split_row(line.strip())
        if current is None:
            current = (heading, cells, [])
            tables.append(current)
        elif not all(re.fullmatch(r"-+:?", c) for c in cells):
            current[2].append(cells)
    return tables


def _split_row(line: str) -> list[str]:
    """`| a | b\\|c |` -> ['a', 'b|c']: the inverse of `_md_cell` (backslash escapes)."""
    cells, cell, chars = [], [], iter(line[1:])
    for ch in chars:
        if ch == "\\":
            cell.append(next(chars, ""))
        elif ch == "|":
            cells.append("".join(cell).strip())
            cell = []
        else:
            cell.append(ch)
    return cells


# --- HTML ------------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; background: #fff; }
h1 { font-size: 1.8em; margin-bottom: .2em; }
h2 { border-bottom: 2px solid #e3e6ec; padding-bottom: .2em; margin-top: 1.8em; }
h3 { margin-top: 1.6em; } h4 { margin: 1em 0 .3em; color: #4a5468; }
p.lead { font-size: 1.1em; font-weight: 600; }
table { border-collapse: collapse; margin: .6em 0 1em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d8dce4; padding: .3em .7em; text-align: left; vertical-align: top; }
th { background: #f3f5f9; } td.r, th.r { text-align: right; white-space: nowrap; }
td.ok { color: #0a7d32; font-weight: 700; } td.bad { color: #c0262d; font-weight: 700; }
img { max-width: 100%; height: auto; border: 1px solid #eceef3; }
figure { margin: .8em 0; } figcaption { color: #5b6577; font-size: .9em; }
pre { background: #f6f8fa; padding: .8em 1em; overflow-x: auto; white-space: pre-wrap; }
"""


def _html_cell(tag: str, text: str, align: str) -> str:
    cls = ["r"] if align == "r" else []
    if tag == "td" and text in (OK, NOT_OK):
        cls.append("ok" if text == OK else "bad")
    attr = f' class="{" ".join(cls)}"' if cls else ""
    return f"<{tag}{attr}>{html.escape(text)}</{tag}>"


def render_html(blocks: list) -> str:
    title = next((b.text for b in blocks if isinstance(b, Heading)), "report")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
    ]
    first_para = True
    for b in blocks:
        if isinstance(b, Heading):
            id_ = f' id="{html.escape(b.id)}"' if b.id else ""
            out.append(f"<h{b.level}{id_}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = ' class="lead"' if first_para else ""
            out.append(f"<p{cls}>{html.escape(b.text)}</p>")
            first_para = False
        elif isinstance(b, Table):
            id_ = f' id="{html.escape(b.id)}"' if b.id else ""
            head = "".join(_html_cell("th", h, a) for h, a in zip(b.header, b.align))
            body = "".join(
                "<tr>" + "".join(_html_cell("td", c, a) for c, a in zip(row, b.align)) + "</tr>"
                for row in b.rows
            )
            out.append(f"<table{id_}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            alt = html.escape(b.alt)
            out.append(
                f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
                f"<figcaption>{alt}</figcaption></figure>"
            )
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Pre):
            out.append(f"<pre>{html.escape(b.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --- plots -----------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> Path:
    def write(f) -> None:
        os.fchmod(f.fileno(), 0o644)  # a card is for reading: not the temp file's 0600
        f.write(text.encode("utf-8"))

    return atomic_write(path, write)


def _save_png(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # the Agg canvas, whatever backend pyplot would pick

    # no "Software" stamp: the same figure gives the same bytes across matplotlib versions
    def write(f) -> None:
        os.fchmod(f.fileno(), 0o644)
        fig.savefig(f, format="png", dpi=110, metadata={"Software": None})

    atomic_write(path, write)


def _loss_plot(stage: dict, path: Path) -> bool:
    """Train and eval loss against the optimizer step; False when the stage logged none."""
    from matplotlib.figure import Figure

    curves = stage.get("curves") or {}
    train, evals = curves.get("train") or [], curves.get("eval") or []
    if not train and not evals:
        return False
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), lw=1.2, color="#3b6fd8", label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", ms=4, lw=1.6, color="#e0592a", label="eval (held out)")
    ax.set(xlabel="step", ylabel="loss", title=f"{_stage_title(stage)}: loss")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    _save_png(fig, path)
    return True


def _goal_levels(report: dict) -> dict[str, float]:
    """Goal thresholds keyed by "stage/metric" or metric name, in the metric's unit."""
    levels = {}
    for g in report.get("goals") or []:
        threshold = g.get("threshold")
        if threshold is None:  # ">= 80%" -> 0.8; a change ("+10 points") has no fixed level
            m = re.search(r"([0-9]+(?:\.[0-9]+)?)\s*%", str(g.get("target") or ""))
            threshold = float(m.group(1)) / 100 if m and "point" not in g["target"] else None
        if threshold is not None:
            levels[g.get("metric") or g.get("name", "")] = threshold
    return levels


def _metrics_plot(report: dict, path: Path) -> bool:
    """One horizontal bar pair (before, after) per accuracy of every stage, the chance level
    and the goal marked on each; False when no stage measured an accuracy."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import PercentFormatter

    levels = _goal_levels(report)
    rows = []
    for s in report.get("stages") or []:
        for m in s.get("metrics") or []:
            if m.get("unit") != "accuracy" or m.get("headline") is False:
                continue
            if m.get("before") is None and m.get("after") is None:
                continue
            label = f"{s.get('title') or s['name']}: {m.get('label') or m.get('name')}"
            label += f" ({m['split']})" if m.get("split") else ""
            key = f"{s['name']}/{m.get('name')}"
            goal = levels.get(key, levels.get(str(m.get("name"))))
            rows.append((label, m.get("before"), m.get("after"), m.get("chance"), goal))
    if not rows:
        return False
    fig = Figure(figsize=(8.4, 1.4 + 0.5 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    for y, (_, before, after, chance, goal) in enumerate(rows):
        for value, dy, color in ((before, -0.2, "#b7bfcc"), (after, 0.2, "#3b6fd8")):
            if value is None or math.isnan(value):
                continue
            ax.barh(y + dy, value, height=0.38, color=color)
            ax.text(value + 0.01, y + dy, f"{100 * value:.1f}%", va="center", fontsize=7)
        if chance is not None:
            ax.plot([chance, chance], [y - 0.45, y + 0.45], color="black", ls=":", lw=1.5)
        if goal is not None:
            ax.plot([goal, goal], [y - 0.45, y + 0.45], color="#c0262d", ls="--", lw=1.5)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()  # the first stage on top, as in the tables
    ax.set_xlim(0, 1.1)
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.grid(axis="x", alpha=0.3)
    handles = [
        Patch(color="#b7bfcc", label="before"),
        Patch(color="#3b6fd8", label="after"),
        Line2D([], [], color="black", ls=":", label="chance"),
        Line2D([], [], color="#c0262d", ls="--", label="goal"),
    ]
    fig.legend(handles=handles, loc="outside upper center", ncols=4, fontsize=8, frameon=False)
    _save_png(fig, path)
    return True


def draw_plots(report: dict, plot_dir: Path) -> dict[str, Path]:
    """Every plot of the card under `plot_dir`, keyed "metrics" and "loss:<stage name>"; PNGs
    of this module's names that this call did not draw are removed."""
    import warnings

    plots: dict[str, Path] = {}
    used: set[str] = set()
    with warnings.catch_warnings():
        # a label in a script DejaVu Sans lacks (Chinese) draws as boxes, not an error
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        if _metrics_plot(report, plot_dir / "metrics.png"):
            plots["metrics"] = plot_dir / "metrics.png"
        for s in report.get("stages") or []:
            name = f"loss_{_slug(s['name'])}"
            while name in used:  # two stages whose names differ only in punctuation
                name += "_"
            if _loss_plot(s, plot_dir / f"{name}.png"):
                used.add(name)
                plots[f"loss:{s['name']}"] = plot_dir / f"{name}.png"
    keep = set(plots.values())
    for old in [*plot_dir.glob("loss_*.png"), plot_dir / "metrics.png"]:
        if old.exists() and old not in keep:
            old.unlink()
    return plots


# --- the entry points ------------------------------------------------------------------------


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write the card for `report` into `out_dir`; returns every file written, keyed by its
    path relative to `out_dir` ("report.json", "report.md", "report.html", "plots/<x>.png")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    written = {"report.json": _write_text(out_dir / "report.json", text)}
    plots = draw_plots(report, out_dir / PLOTS)
    written |= {p.relative_to(out_dir).as_posix(): p for p in plots.values()}
    blocks = build_blocks(report, plots)
    written["report.md"] = _write_text(out_dir / "report.md", render_markdown(blocks, out_dir))
    written["report.html"] = _write_text(out_dir / "report.html", render_html(blocks))
    return written


def _text_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)]
        lines.append("  ".join(cells).rstrip())
    return lines


def print_summary(report: dict) -> str:
    """The compact table the pipeline prints at the end: the summary line, the goals, and per
    stage its status, wall time and first metric (the pipeline lists the headline one first).

    >>> print(print_summary({"title": "demo", "total_wall_s": 12.0, "budget_s": None,
    ...     "goals": [{"name": "facts", "target": ">= 80%", "value": 0.656, "met": False}],
    ...     "stages": [{"name": "sft", "status": "done", "wall_s": 9.5, "metrics": [
    ...         {"label": "held-out facts", "before": None, "after": 0.656, "unit": "accuracy"}]},
    ...         {"name": "lora", "status": "skipped", "reason": "not built yet"}]}))
    demo — Finished in 12.0 s (no time budget) · goals met 0/1 · stages: 1 done, 1 skipped
    <BLANKLINE>
    goal   target  reached  met
    facts  >= 80%    65.6%  ✗
    <BLANKLINE>
    stage  status   wall s  headline
    sft    done        9.5  held-out facts: 65.6%
    lora   skipped       —  not built yet
    """
    lines = [f"{report.get('title') or 'MiniMind report'} — {summary_line(report)}"]
    goals = [row[:4] for row in _goal_rows(report)]
    if goals:
        lines += ["", *_text_table(GOALS_HEADER[:4], goals, "llrl")]
    rows = []
    for s in report.get("stages") or []:
        if s.get("status") in ("skipped", "failed"):
            headline = s.get("reason") or ""
        elif s.get("metrics"):
            m = s["metrics"][0]
            unit, before, after = m.get("unit"), m.get("before"), m.get("after")
            label = m.get("label") or m.get("name", "")
            if before is None:
                headline = f"{label}: {format_value(after, unit)}"
            else:
                headline = f"{label}: {format_value(before, unit)} -> {format_value(after, unit)}"
        else:
            headline = ""
        rows.append(
            [s["name"], str(s.get("status", "")), format_seconds(s.get("wall_s")), headline]
        )
    if rows:
        lines += ["", *_text_table(["stage", "status", "wall s", "headline"], rows, "llrl")]
    return "\n".join(lines)
