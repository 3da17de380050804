"""The demo corpus (minimind.data.demo, .demo_world): valid, deterministic, held-out honestly."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minimind.data.demo import FILE_NAMES, WORKED_SHARE, write_demo_corpus
from minimind.data.demo_world import (
    EVAL_QUESTIONS,
    LANGS,
    STATEMENTS,
    TRAIN_QUESTIONS,
    ArithSplit,
    apply,
    build_world,
    render,
    worked,
)
from minimind.data.formats import RecordReader, detect_kind, split_reasoning
from minimind.train.rewards import last_number

SIZE_MB = 0.3
EXPECTED_KIND = {
    "pretrain": "pretrain",
    "sft": "sft",
    "lora": "sft",
    "dpo": "dpo",
    "rlaif": "rlaif",
    "reasoning": "reasoning",
    "eval_facts": "rlaif",
    "eval_arith": "rlaif",
    "eval_facts_trained": "rlaif",
    "eval_arith_trained": "rlaif",
    "eval_arith_rl": "rlaif",
    "eval_dpo": "dpo",
    "eval_strangers": "rlaif",
    "eval_identity": "rlaif",
}
TRAINING = ("pretrain", "sft", "lora", "dpo", "rlaif", "reasoning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), seed=0, size_mb=SIZE_MB)


def strings(value) -> list[str]:
    """Every string inside a decoded JSON value (keys excluded)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    return []


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def training_text(corpus) -> str:
    return "\n".join(s for key in TRAINING for row in rows(corpus[key]) for s in strings(row))


def digests(paths: dict[str, Path]) -> dict[str, str]:
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in paths.items()}


def test_files_are_named_like_minimind(corpus):
    assert {k: p.name for k, p in corpus.items()} == FILE_NAMES
    assert all(p.stat().st_size > 0 for p in corpus.values())


@pytest.mark.parametrize("key", list(FILE_NAMES))
def test_every_record_passes_the_validators(corpus, key):
    assert detect_kind(corpus[key]) == EXPECTED_KIND[key]
    reader = RecordReader(corpus[key], EXPECTED_KIND[key])
    records = list(reader)
    assert len(records) == reader.summary.lines > 0
    assert reader.summary.bad_lines == reader.summary.blank_lines == 0


def test_same_seed_same_bytes_even_with_another_hash_seed(corpus, tmp_path):
    # A subprocess with a different PYTHONHASHSEED catches any dependence on set/dict order.
    code = (
        "import sys; from minimind.data.demo import write_demo_corpus; "
        f"write_demo_corpus(sys.argv[1], seed=0, size_mb={SIZE_MB})"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, env=env)
    again = {k: tmp_path / "again" / name for k, name in FILE_NAMES.items()}
    assert digests(again) == digests(corpus)
    other = write_demo_corpus(tmp_path / "other", seed=1, size_mb=0.05)
    assert digests(other)["eval_facts"] != digests(corpus)["eval_facts"]


def test_sizes(corpus):
    pretrain = corpus["pretrain"].stat().st_size
    assert SIZE_MB * 1e6 <= pretrain < SIZE_MB * 1e6 + 2000
    assert 0.3 * pretrain < corpus["sft"].stat().st_size < 0.5 * pretrain


def test_pretrain_texts_are_short_and_bilingual(corpus):
    texts = [r["text"] for r in rows(corpus["pretrain"])]
    assert max(len(t) for t in texts) < 512
    chinese = sum(bool(re.search(r"[\u4e00-\u9fff]", t)) for t in texts)
    assert 0.3 < chinese / len(texts) < 0.7


def test_reasoning_layout(corpus):
    for row in rows(corpus["reasoning"]):
        think, answer = split_reasoning(row["conversations"][-1]["content"])
        assert think and answer


def test_dpo_chosen_is_not_rejected(corpus):
    for row in rows(corpus["dpo"]):
        assert row["chosen"][-1]["content"] != row["rejected"][-1]["content"]


def test_train_and_eval_question_templates_are_disjoint():
    for attribute, by_lang in EVAL_QUESTIONS.items():
        for lang in LANGS:
            assert not set(by_lang[lang]) & set(TRAIN_QUESTIONS[attribute][lang])
            assert not set(by_lang[lang]) & set(STATEMENTS[attribute][lang])


def test_eval_phrasings_never_occur_in_training(corpus, training_text):
    # Every literal piece of an eval template (around the subject) is absent from all training
    # text, so the eval measures generalisation to a new phrasing, not recall of one.
    for by_lang in EVAL_QUESTIONS.values():
        for templates in by_lang.values():
            for template in templates:
                for piece in template.split("{s}"):
                    if len(piece.strip()) >= 3:
                        assert piece not in training_text, (template, piece)
    for row in rows(corpus["eval_facts"]):
        assert row["conversations"][0]["content"] not in training_text


def test_eval_facts_are_known_facts_with_gold_answers(corpus, training_text):
    world = build_world(0)
    eval_rows = rows(corpus["eval_facts"])
    assert len(eval_rows) == len(world.facts) * len(LANGS)
    for fact, (en, zh) in zip(world.facts, zip(eval_rows[::2], eval_rows[1::2])):
        for lang, row in (("en", en), ("zh", zh)):
            assert row["answer"] == fact.value.of(lang) and row["lang"] == lang
            # Known: some training statement of this fact appears in the training text.
            said = [render(t, fact, lang) for t in STATEMENTS[fact.attribute][lang]]
            assert any(s in training_text for s in said), fact


EQUATIONS = re.compile(r"(?<!\d)(?=(\d+) ?(\+|-|×|plus|minus|times|加|减|乘以) ?(\d+)(?!\d))")
WORDS = {"plus": "+", "minus": "-", "times": "×", "加": "+", "减": "-", "乘以": "×"}


def test_held_out_and_rl_arithmetic_never_occurs_in_pretraining_or_sft(corpus):
    split = ArithSplit(0)
    seen = 0
    text = "\n".join(
        s for key in TRAINING if key != "rlaif" for row in rows(corpus[key]) for s in strings(row)
    )
    for a, op, b in EQUATIONS.findall(text):
        seen += 1
        assert split.allowed(WORDS.get(op, op), int(a), int(b)), f"{a} {op} {b}"
    assert seen > 1000


def test_rlaif_arithmetic_uses_only_rl_pairs_and_eval_arith_rl_lists_them(corpus):
    split = ArithSplit(0)
    for key in ("rlaif", "eval_arith_rl"):
        found = 0
        for row in rows(corpus[key]):
            for a, op, b in EQUATIONS.findall(row["conversations"][0]["content"]):
                found += 1
                assert split.is_rl(WORDS.get(op, op), int(a), int(b)), f"{a} {op} {b}"
        assert found > 50, key
    pairs = sum(len(v) for v in split.rl.values())
    assert len(rows(corpus["eval_arith_rl"])) >= 2 * pairs  # both orders, both languages


def test_strangers_split_between_dpo_and_the_held_out_evals(corpus):
    from minimind.data.demo_world import HELD_OUT_STRANGERS, STRANGERS

    held = STRANGERS[-HELD_OUT_STRANGERS:]
    dpo = "\n".join(s for row in rows(corpus["dpo"]) for s in strings(row))
    named = [n for n in STRANGERS[:-HELD_OUT_STRANGERS] if n.en in dpo or n.zh in dpo]
    assert len(named) > 20  # many different names: abstaining must generalise, not memorise
    others = "\n".join(
        s for key in TRAINING if key != "dpo" for row in rows(corpus[key]) for s in strings(row)
    )
    for name in STRANGERS:  # only dpo.jsonl names any stranger
        assert name.en not in others and name.zh not in others, name
    for name in held:
        assert name.en not in dpo and name.zh not in dpo, name
    pairs = rows(corpus["eval_dpo"])
    assert {p["kind"] for p in pairs} == {"stranger", "fact"}
    asked = rows(corpus["eval_strangers"])
    assert all(
        any(n.of(r["lang"]) in r["conversations"][0]["content"] for n in held) for r in asked
    )
    assert {r["answer"] for r in asked} == {"don't know", "不认识"}


def test_eval_arith_uses_held_out_pairs_with_correct_answers(corpus):
    split = ArithSplit(0)
    eval_rows = rows(corpus["eval_arith"])
    assert len(eval_rows) >= 100
    for row in eval_rows:
        (a, op, b), *_ = EQUATIONS.findall(row["conversations"][0]["content"])
        op = WORDS.get(op, op)
        assert not split.allowed(op, int(a), int(b))
        assert row["answer"] == str(apply(int(a), op, int(b)))


def test_trained_evals_ask_in_training_phrasings_and_pairs(corpus, training_text):
    # The memorisation side of the report: the same facts and operations, asked as training
    # asks them, so a held-out miss says "did not generalise" rather than "did not learn".
    world, split = build_world(0), ArithSplit(0)
    facts = rows(corpus["eval_facts_trained"])
    assert len(facts) == len(world.facts) * len(LANGS)
    for fact, (en, zh) in zip(world.facts, zip(facts[::2], facts[1::2])):
        for lang, row in (("en", en), ("zh", zh)):
            asked = {render(t, fact, lang) for t in TRAIN_QUESTIONS[fact.attribute][lang]}
            assert row["conversations"][0]["content"] in asked
            assert row["answer"] == fact.value.of(lang) and row["kind"] == fact.attribute
    arith = rows(corpus["eval_arith_trained"])
    assert len(arith) >= 100
    for row in arith:
        (a, op, b), *_ = EQUATIONS.findall(row["conversations"][0]["content"])
        assert split.allowed(WORDS.get(op, op), int(a), int(b))
        assert row["answer"] == str(apply(int(a), WORDS.get(op, op), int(b)))


def test_rlaif_answers_are_correct(corpus):
    world = build_world(0)
    values = {v for f in world.facts for v in f.value}
    for row in rows(corpus["rlaif"]):
        question = row["conversations"][0]["content"]
        found = EQUATIONS.findall(question)
        if found:
            (a, op, b), *_ = found
            assert row["answer"] == str(apply(int(a), WORDS.get(op, op), int(b)))
        else:
            assert row["answer"] in values


def test_identity_and_lora_identity(corpus):
    sft = "\n".join(s for row in rows(corpus["sft"]) for s in strings(row))
    assert "I am MiniMind" in sft and "我是MiniMind" in sft
    lora = "\n".join(s for row in rows(corpus["lora"]) for s in strings(row))
    assert "I am Lumen" in lora and "我是路明" in lora


def test_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="size_mb"):
        write_demo_corpus(tmp_path, size_mb=0)


def test_eval_identity_asks_in_phrasings_no_training_file_uses(corpus):
    # The LoRA stage's measure: the SFT model answers "MiniMind", the identity adapter "Lumen",
    # and neither has seen these questions.
    asked = rows(corpus["eval_identity"])
    assert len(asked) == 8 and {r["answer"] for r in asked} == {"Lumen", "路明"}
    questions = {r["conversations"][0]["content"] for r in asked}
    trained = {s for key in TRAINING for row in rows(corpus[key]) for s in strings(row)}
    assert not questions & trained
    lora = "\n".join(s for row in rows(corpus["lora"]) for s in strings(row))
    assert "Lumen" in lora and "路明" in lora


@pytest.mark.parametrize("lang", LANGS)
def test_the_column_method_is_right_and_its_steps_are_never_held_out(lang):
    # Every sum and difference of the domains, worked by columns, ends in the right answer,
    # and every step it writes is a pair training may contain: the method reaches held-out
    # and RL pairs from trained facts alone, which is what lets RL's gains carry over.
    split = ArithSplit(0)
    for op in ("+", "-"):
        for a in range(21):
            for b in range(21 if op == "+" else a + 1):
                text = worked(a, op, b, lang)
                assert last_number(text) == apply(a, op, b), text
                head, *steps = EQUATIONS.findall(text)
                assert (int(head[0]), WORDS.get(head[1], head[1]), int(head[2])) == (a, op, b)
                for x, step_op, y in steps:
                    assert split.allowed(WORDS.get(step_op, step_op), int(x), int(y)), text
    assert worked(3, "×", 4, lang) is None


def test_sft_answers_sums_and_differences_by_columns_at_the_set_share(corpus):
    direct = re.compile(r"^\d+ ?(\+|-|加|减) ?\d+ ?(=|等于) ?\d+[.。]$")
    method = plain = 0
    for row in rows(corpus["sft"]):
        for m in row["conversations"]:
            if m["role"] == "assistant" and m.get("content"):
                method += m["content"].startswith(("Columns ", "列竖式"))
                plain += bool(direct.match(m["content"]))
    assert method + plain > 100
    assert abs(method / (method + plain) - WORKED_SHARE) < 0.1, (method, plain)


def test_pretraining_drills_favour_the_steps_of_the_column_method(corpus):
    # The method is only as good as its one-digit facts: drills draw demo.STEP_SHARE_PRETRAIN of
    # their equations from its steps (one-digit sums, differences from at most 10), so bare
    # sums and differences outside the worked traces are mostly steps (0.59 at 0.3 MB; a
    # uniform draw over the training pairs gives 0.35).
    traces = re.compile(r"Columns [^.]*\.|列竖式[^。]*。")
    bare = re.compile(r"(?<!\d)(\d+) ?(\+|-|加|减) ?(\d+) ?(?:=|等于) ?\d+")
    steps = total = 0
    for row in rows(corpus["pretrain"]):
        for a, op, b in bare.findall(traces.sub("", row["text"])):
            a, op, b = int(a), WORDS.get(op, op), int(b)
            steps += max(a, b) < 10 if op == "+" else a <= 10
            total += 1
    assert total > 500
    assert steps / total > 0.5, (steps, total)
