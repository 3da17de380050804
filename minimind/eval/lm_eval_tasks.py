"""The demo corpus's evaluation tasks as lm-evaluation-harness task files, so an exported
transformers folder is scored by lm-eval offline, with the same prompts and the same scorer:

    minimind eval --write-lm-eval-tasks TASKS            # or write_lm_eval_tasks(data, TASKS)
    lm_eval --model hf --model_args pretrained=EXPORT --include_path TASKS --tasks minimind

Owns `write_lm_eval_tasks`: per task a data file (`minimind_{name}.jsonl`), a task file
(`minimind_{name}.yaml`, tag `minimind`) and one scoring module beside them
(`minimind_scoring.py`). Does not own the questions (minimind.data.demo), the chat template
(minimind.tokenizer.render) or the scorer (minimind.eval.tasks.score).

Decisions:
- Prompts are rendered here with our chat template (default system prompt, generation prompt),
  exactly the text `minimind eval` tokenizes, and stored as the docs' `prompt`; lm-eval is run
  WITHOUT `--apply_chat_template` (it would wrap the template in a second one). The exported
  tokenizer recognises `<|im_start|>`/`<|im_end|>` in the text, and lm-eval adds no bos to a
  prompt that starts with it. The ids equal ours as long as no question writes an added token
  itself (ours encodes message content as plain text; the demo's questions write none).
- Answer tasks are `generate_until`: greedy (`do_sample: false`), at most `max_new_tokens`,
  stopping at `<|im_end|>` as our generation stops at the eos id; lm-eval decodes without
  special tokens, as `answer_accuracy` does. Scoring is `process_results` calling
  minimind.eval.tasks.score (the last number for a numeric gold, a whole word otherwise), so
  lm-eval's `acc` and ours are one rule, not two that might drift (a fixed regex filter cannot
  express "this doc's gold as a whole word"). The scoring module therefore needs minimind
  importable where lm-eval runs.
- `minimind_dpo` is `multiple_choice` over [chosen reply, rejected reply], each followed by
  `<|im_end|>` and continuing the prompt with no delimiter: lm-eval's `acc` (the higher summed
  log-likelihood wins) is then `preference_accuracy`'s measure on the same tokens (the
  assistant tokens through `<|im_end|>`, the SFT loss mask), ties going to the chosen reply.
- The reasoning format rate is not written: it reads the reply's tags, which lm-eval's decoding
  drops as special tokens.
- Data paths in the task files are absolute (lm-eval resolves `data_files` against the working
  directory, not the task file): move the folder, write it again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# task name -> demo corpus file key (minimind.data.demo.FILE_NAMES); the answer tasks of cli.py
ANSWER_TASKS = {
    "facts_trained": "eval_facts_trained",
    "facts": "eval_facts",
    "arith_trained": "eval_arith_trained",
    "arith": "eval_arith",
    "arith_rl": "eval_arith_rl",
    "strangers": "eval_strangers",
    "identity": "eval_identity",
}
END = "<|im_end|>"

SCORING = '''"""Scoring for the minimind_* lm-evaluation-harness tasks (written by
minimind.eval.lm_eval_tasks): MiniMind's own rule, so lm-eval and `minimind eval` agree."""

from minimind.eval.tasks import score


def process_results(doc, results):
    return {"acc": float(score(results[0].strip(), doc["answer"]))}
'''


def _yaml(task: str, data_file: Path, body: list[str]) -> str:
    head = [
        "# written by minimind.eval.lm_eval_tasks; run lm_eval without --apply_chat_template",
        f"task: minimind_{task}",
        "tag:",
        "  - minimind",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file.resolve()))}",
        "test_split: test",
        "doc_to_text: prompt",
    ]
    tail = ["metadata:", "  version: 1.0"]
    return "\n".join(head + body + tail) + "\n"


def write_lm_eval_tasks(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tasks: list[str] | None = None,
    max_new_tokens: int = 24,
    limit: int | None = None,
) -> list[str]:
    """Write the task files of `tasks` (default: the answer tasks and dpo whose files are in
    `data_dir`, the demo corpus) into `out_dir`; the first `limit` items of each. Returns the
    lm-eval task names (`minimind_facts`, ...); all carry the tag `minimind`."""
    from minimind.data.formats import RecordReader
    from minimind.tokenizer import render

    from .cli import file_name

    data_dir, out = Path(data_dir), Path(out_dir)
    known = [*ANSWER_TASKS, "dpo"]
    if tasks is None:
        key = {**ANSWER_TASKS, "dpo": "eval_dpo"}
        tasks = [t for t in known if (data_dir / file_name(key[t])).is_file()]
    unknown = sorted(set(tasks) - set(known))
    if unknown:
        raise ValueError(f"no lm-eval task for {', '.join(unknown)}; known: {', '.join(known)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "minimind_scoring.py").write_text(SCORING, "utf-8")

    names = []
    for task in tasks:
        source = data_dir / file_name(ANSWER_TASKS.get(task, "eval_dpo"))
        if not source.is_file():
            raise FileNotFoundError(f"{data_dir} has no {source.name} (task {task})")
        docs = []
        for record in list(RecordReader(source))[:limit]:
            prompt = render([m.to_dict() for m in record.prompt], add_generation_prompt=True)
            doc = {"prompt": prompt, "question": record.prompt[-1].content}
            if task == "dpo":
                replies = (record.chosen.messages[-1], record.rejected.messages[-1])
                doc["choices"] = [m.content + END for m in replies]
            else:
                doc["answer"] = record.answer
            docs.append(doc)
        data_file = out / f"minimind_{task}.jsonl"
        data_file.write_text(
            "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), "utf-8"
        )
        if task == "dpo":
            body = [
                "output_type: multiple_choice",
                "doc_to_choice: choices",
                "doc_to_target: 0",
                'target_delimiter: ""',
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
            ]
        else:
            body = [
                "output_type: generate_until",
                "doc_to_target: answer",
                "generation_kwargs:",
                "  until:",
                f"    - {json.dumps(END)}",
                "  do_sample: false",
                "  temperature: 0.0",
                f"  max_gen_toks: {max_new_tokens}",
                "process_results: !function minimind_scoring.process_results",
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
            ]
        (out / f"minimind_{task}.yaml").write_text(_yaml(task, data_file, body), "utf-8")
        names.append(f"minimind_{task}")
    return names
