"""`minimind pipeline` (`minimind demo`, `make demo`: the README's first command): every stage
of the pipeline, end to end, offline, evaluated after each stage, with a report card.

The package: `recipe` (the flags), `stages` (what each stage does and measures), `runner`
(which stages run, which are reused, where a killed run resumes), `progress` (one display
for the whole run with its ETA), `measure` (held-out measurements), `card` (the report's
content and the quality goals), `report` (report.md / .json / .html and the plots).

Everything lands under `--workdir`: dataset/, tokenizer/, shards/, checkpoints/ (the engine's
run folders: metrics.jsonl, step checkpoints), out/ (exported models), pipeline.json (the
runner's record), report/ (the report card).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

from minimind import paths
from minimind.pipeline.recipe import Recipe

__all__ = ["Recipe", "main", "run"]


def run(
    workdir: Path,
    seed: int = 0,
    recipe: Recipe | None = None,
    *,
    max_steps: int | None = None,
    eval_limit: int | None = None,
    start_from: str | None = None,
    until: str | None = None,
    budget_s: float | None = None,
    save_every: int | None = None,
) -> dict:
    """Run (or reuse) every stage under `workdir`; write the report card; return its dict."""
    import torch

    from minimind.pipeline.card import BUDGET_S, build_card
    from minimind.pipeline.progress import Display
    from minimind.pipeline.report import print_summary, write_report
    from minimind.pipeline.runner import Runner
    from minimind.pipeline.stages import STEPS
    from minimind.pipeline.stages import Run as Context

    recipe = recipe or Recipe()
    workdir = Path(workdir)
    limits = {"max_steps": max_steps, "eval_limit": eval_limit}
    smoke = max_steps is not None or eval_limit is not None
    budget = budget_s if budget_s is not None else (None if smoke else BUDGET_S)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    runner = Runner(
        workdir, STEPS, recipe, seed=seed, limits=limits, start_from=start_from, until=until
    )
    plan = runner.plan()
    display = Display([s.name for s in STEPS], plan)
    context = Context(workdir, recipe, seed, runner, display, limits, save_every)
    results = runner.run(context, lambda i, s, action: display.start(i, s.name, s.title, action))
    display.finish_stage()
    card = build_card(
        results,
        recipe,
        workdir=workdir,
        seed=seed,
        total_s=time.perf_counter() - t0,
        budget_s=budget,
        limits=limits,
    )
    written = write_report(card, workdir / "report")
    print("\n" + print_summary(card))
    print(f"\nreport card: {written['report.md']}  (also report.html, report.json, plots/)")
    for line in card["next"]:
        print(f"   {line}")
    return card


def main(argv: list[str] | None = None) -> int:
    from minimind.pipeline.stages import STEPS

    parser = argparse.ArgumentParser(
        prog="minimind pipeline", description=__doc__.split("\n")[0].strip("`")
    )
    parser.add_argument("--workdir", type=Path, default=paths.home() / "runs" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--from",
        dest="start_from",
        choices=[s.name for s in STEPS],
        help="rerun this stage and every stage after it (earlier ones are reused)",
    )
    parser.add_argument(
        "--until",
        choices=[s.name for s in STEPS],
        help="stop after this stage (the later ones are reported as skipped)",
    )
    for f in fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, type=int, choices=(0, 1), default=int(f.default))
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    parser.add_argument("--max-steps", type=int, default=None, help="cap each stage (smoke runs)")
    parser.add_argument(
        "--eval-limit", type=int, default=None, help="questions per eval file (smoke runs)"
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=None,
        help="optimizer steps between step checkpoints, where a killed stage resumes (200)",
    )
    args = parser.parse_args(argv)
    recipe = Recipe(**{f.name: type(f.default)(getattr(args, f.name)) for f in fields(Recipe)})
    t0 = time.perf_counter()
    run(
        args.workdir,
        args.seed,
        recipe,
        max_steps=args.max_steps,
        eval_limit=args.eval_limit,
        start_from=args.start_from,
        until=args.until,
        save_every=args.save_every,
    )
    print(
        f"\npipeline finished in {time.perf_counter() - t0:.0f}s; everything is in {args.workdir}"
    )
    return 0
