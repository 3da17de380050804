"""minimind.train.rewards: each reward on hand-written English and Chinese replies, the spec
parser, the weighted sum, errors that name the reward and the sample, and RewardModel on a tiny
random transformers model written to tmp_path (batched scores equal one-at-a-time scores)."""

import math
import pickle
import shutil

import pytest
import torch

from minimind.train.rewards import (
    REWARDS,
    VERIFIABLE,
    RewardError,
    RewardFunction,
    RewardModel,
    RewardSpec,
    Sample,
    answer_match,
    check_samples_have_answers,
    exact_match,
    extract_answer,
    format_reward,
    length_penalty,
    numeric_match,
    repetition_penalty,
)

THINK = "<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


def s(completion, answer=None, prompt=None):
    return Sample(prompt or [{"role": "user", "content": "q"}], completion, answer)


def scores(fn, pairs, **kwargs):
    return fn([s(c, a) for c, a in pairs], **kwargs)


# ---------------------------------------------------------------- extract_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        (THINK.format(think="7 + 5 = 12", answer="12"), "12"),
        ("<answer>first</answer> then <answer> second </answer>", "second"),
        ("<think>\nmaybe 11\n</think>\n12", "12"),
        ("<think>\nunfinished thought 11", "<think>\nunfinished thought 11"),
        ("  Mira is a teacher.\n", "Mira is a teacher."),
        ("", ""),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------- numeric


def test_numeric_match_en_zh_and_formats():
    got = scores(
        numeric_match,
        [
            ("7 + 5 = 12.", "12"),
            ("7加5等于12。", "12"),
            ("妮娜的年龄是22岁。", "22"),
            ("19 - 4 = 15.", "15"),
            ("19-4=15", "15"),
            ("The answer is 12.0", "12"),
            ("It is 1,234 in total.", "1234"),
            ("答案是１２", "12"),  # full-width digits
            ("it drops to -3", "-3"),
            ("It is 0.5", "0.50"),
            (THINK.format(think="7 + 5 = 12", answer="12"), "12"),
        ],
    )
    assert got == [1.0] * 11


def test_numeric_match_misses():
    got = scores(
        numeric_match,
        [
            ("7 + 5 = 13.", "12"),
            ("12 is wrong, it is 13", "12"),  # the last number counts
            ("It is 120.", "12"),
            ("I do not know.", "12"),
            ("", "12"),
            ("19-4", "-4"),  # a hyphen after a word is not a sign
            # the right number while thinking, the wrong one as the answer
            (THINK.format(think="7 + 5 = 12", answer="13"), "12"),
        ],
    )
    assert got == [0.0] * 7


def test_numeric_match_needs_a_numeric_answer():
    with pytest.raises(RewardError, match=r"'numeric' failed on sample 1 .*no ground-truth answer"):
        scores(numeric_match, [("12", "12"), ("12", None)])
    with pytest.raises(RewardError, match=r"sample 0 .*'teacher' is not a number"):
        scores(numeric_match, [("Mira is a teacher.", "teacher")])


# ---------------------------------------------------------------- exact


def test_exact_match_demo_examples():
    got = scores(
        exact_match,
        [
            ("Mira is a teacher.", "teacher"),
            ("Mira is a teachers", "teacher"),
            ("米拉的工作是老师。", "老师"),
            ("米拉的工作是医生。", "老师"),
        ],
    )
    assert got == [1.0, 0.0, 1.0, 0.0]


def test_exact_match_normalisation_and_words():
    got = scores(
        exact_match,
        [
            ("MIRA IS A  TEACHER!", "Teacher"),  # case, whitespace
            ("Mira is a teacher", "teacher."),  # the answer's punctuation
            ("People go to Maplefield to buy apples.", "Maplefield"),
            ("Maplefield's apples", "maplefield"),
            ("He lives in 枫田镇。", "枫田镇"),
            ("他住在枫田镇", "枫田镇。"),
            ("Mira and Leo are best\nfriends.", "best friends"),
            ("米拉是Mira老师", "Mira"),  # a Latin word next to Han characters
            ("<think>\nteacher?\n</think>\n<answer>\nMira is a teacher.\n</answer>", "teacher"),
        ],
    )
    assert got == [1.0] * 9
    misses = scores(
        exact_match,
        [
            ("Mira is a preacher.", "teacher"),
            ("teacher1", "teacher"),
            ("the teacher_x", "teacher"),
            ("Mira is a nurse.", "teacher"),
            # seen only while thinking
            ("<think>\nteacher?\n</think>\n<answer>\nMira is a nurse.\n</answer>", "teacher"),
            ("米拉的工作是老", "老师"),
            ("", "teacher"),
        ],
    )
    assert misses == [0.0] * 7


def test_exact_match_rejects_missing_or_empty_answers():
    with pytest.raises(RewardError, match=r"'exact' failed on sample 0 .*no ground-truth"):
        scores(exact_match, [("Mira is a teacher.", None)])
    with pytest.raises(RewardError, match=r"'exact' failed on sample 1 .*empty after normal"):
        scores(exact_match, [("a", "a"), ("b", " 。 ")])


def test_answer_match_routes_by_answer_type():
    got = scores(
        answer_match,
        [
            ("7 + 5 = 12.", "12"),
            ("It is 120.", "12"),  # numeric: no substring credit for 120
            ("Mira is a teacher.", "teacher"),
            ("米拉的工作是老师。", "老师"),
            ("Mira is a nurse.", "teacher"),
            ("3加4等于7。", "7"),
        ],
    )
    assert got == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(RewardError, match="'answer' failed on sample 0"):
        scores(answer_match, [("12", None)])


# ---------------------------------------------------------------- format, length, repetition


def test_format_reward():
    got = scores(
        format_reward,
        [
            (THINK.format(think="7 + 5 = 12", answer="12"), None),
            (THINK.format(think="我需要算出这道题。", answer="7加5等于12。"), None),
            ("<think>\n\n</think>\n\n<answer>\nHi\n</answer>", None),  # empty think is fine
            (THINK.format(think="x", answer=""), None),  # empty answer is not
            (THINK.format(think="x", answer="12") + " trailing", None),
            ("<answer>\n12\n</answer>", None),
            ("<think>\nonly thinking\n</think>", None),
            ("7 + 5 = 12.", None),
            ("", None),
        ],
    )
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_length_penalty():
    got = scores(length_penalty, [("", None), ("x" * 100, None), ("x" * 150, None)], target=100)
    assert got == [0.0, 0.0, -0.5]
    assert scores(length_penalty, [("x" * 10_000, None)], target=100) == [-1.0]
    assert scores(length_penalty, [("老" * 600, None)]) == [pytest.approx(-88 / 512)]
    with pytest.raises(RewardError, match="target must be positive"):
        length_penalty([s("x")], target=0)


def test_repetition_penalty():
    got = scores(
        repetition_penalty,
        [
            ("Mira is a teacher.", None),
            ("米拉的工作是老师。", None),
            ("a b c a b c a b c", None),  # 7 trigrams, 3 distinct
            ("好好好好好", None),  # 3 trigrams, 1 distinct
            ("12 12", None),  # too short for a trigram
            ("", None),
        ],
    )
    assert got == pytest.approx([0.0, 0.0, 3 / 7 - 1, 1 / 3 - 1, 0.0, 0.0])
    assert scores(repetition_penalty, [("the the the cat", None)], n=1) == [pytest.approx(-0.5)]
    long = scores(repetition_penalty, [("ha " * 1000, None)])[0]
    assert -1.0 <= long < -0.99
    with pytest.raises(RewardError, match="n must be at least 1"):
        repetition_penalty([s("x")], n=0)


def test_registry():
    assert set(REWARDS) == {"numeric", "exact", "answer", "format", "length", "repetition"}
    assert {"numeric", "exact", "answer"} == VERIFIABLE
    batch = [s("7 + 5 = 12.", "12"), s("7加5等于12。", "12")]
    for name, fn in REWARDS.items():
        out = fn(batch)
        assert len(out) == 2 and all(isinstance(x, float) for x in out), name
        assert fn([]) == [], name


# ---------------------------------------------------------------- RewardSpec


def test_spec_parse():
    spec = RewardSpec.parse(" answer:1, format:0.5 ,repetition,length:-0.1 ,")
    assert spec.weights == {"answer": 1.0, "format": 0.5, "repetition": 1.0, "length": -0.1}
    assert spec.model_path is None
    assert RewardSpec.parse(str(spec)) == spec
    spec = RewardSpec.parse("model:0.5,format", model_path="/rm")
    assert spec.weights == {"model": 0.5, "format": 1.0} and spec.model_path == "/rm"
    assert RewardSpec.parse("answer:0,format").active() == {"format": 1.0}
    assert RewardSpec.parse("model:0,format").active() == {"format": 1.0}  # off: no path needed


@pytest.mark.parametrize(
    "text, model_path, message",
    [
        ("answer,blah:2", None, r"unknown reward 'blah'.*known: answer, exact, format, length, "),
        ("answer:1,answer:2", None, "given twice"),
        ("answer:lots", None, "weight 'lots' is not a number"),
        ("answer:nan", None, "must be finite"),
        ("", None, "no rewards"),
        (" , ", None, "no rewards"),
        ("model:1", None, "needs a reward model folder"),
        ("answer", "/rm", "no 'model' term"),
    ],
)
def test_spec_parse_errors(text, model_path, message):
    with pytest.raises(RewardError, match=message):
        RewardSpec.parse(text, model_path=model_path)


def test_check_samples_have_answers():
    answers = ["12", "teacher", None, ""]
    check_samples_have_answers(RewardSpec.parse("format,repetition"), answers, "r.jsonl")
    check_samples_have_answers(RewardSpec.parse("answer:0,format"), answers, "r.jsonl")
    check_samples_have_answers(RewardSpec.parse("answer"), answers[:2], "r.jsonl")
    with pytest.raises(RewardError, match=r"^r\.jsonl: record 2 has no 'answer' \(2 of 4") as e:
        check_samples_have_answers(RewardSpec.parse("answer,format"), answers, "r.jsonl")
    assert "'answer'" in str(e.value)
    with pytest.raises(RewardError, match="record 1 has the answer 'teacher', which is not a"):
        check_samples_have_answers(RewardSpec.parse("numeric"), answers[:2], "r.jsonl")


# ---------------------------------------------------------------- RewardFunction


def test_weighted_sum_and_parts():
    fn = RewardFunction(RewardSpec.parse("answer:1,format:0.5,length:2"))
    batch = [
        s("7 + 5 = 12.", "12"),
        s(THINK.format(think="7 + 5 = 12", answer="12"), "12"),
        s("Mira is a nurse." + "x" * 1000, "teacher"),
    ]
    total = fn(batch)
    assert total.dtype == torch.float32 and total.shape == (3,) and total.device.type == "cpu"
    assert fn.last_parts == {
        "answer": [1.0, 1.0, 0.0],
        "format": [0.0, 1.0, 0.0],
        "length": [0.0, 0.0, length_penalty(batch[2:])[0]],
    }
    expected = [1 * a + 0.5 * f + 2 * n for a, f, n in zip(*fn.last_parts.values())]
    assert total.tolist() == pytest.approx(expected)
    assert fn([]).shape == (0,)


def test_zero_weight_terms_are_not_computed():
    fn = RewardFunction(RewardSpec.parse("answer:0,format"))
    fn([s("12", None)])  # 'answer' would raise on a missing answer
    assert list(fn.last_parts) == ["format"]


def test_custom_registry_and_unknown_names():
    registry = {"shout": lambda batch: [float(x.completion.isupper()) for x in batch]}
    fn = RewardFunction(RewardSpec({"shout": 2.0}), registry=registry)
    assert fn([s("HI"), s("hi")]).tolist() == [2.0, 0.0]
    with pytest.raises(RewardError, match="unknown reward 'format'; known: shout, model"):
        RewardFunction(RewardSpec({"format": 1.0}), registry=registry)


def _boom(batch):
    out = []
    for x in batch:
        if "boom" in x.completion:
            raise KeyError("no such key")
        out.append(1.0)
    return out


def test_a_raising_reward_names_function_and_sample():
    fn = RewardFunction(
        RewardSpec({"format": 1.0, "custom": 1.0}), registry={**REWARDS, "custom": _boom}
    )
    batch = [s("fine"), s("fine too"), s("this goes boom " + "x" * 100), s("boom again")]
    with pytest.raises(RewardError) as e:
        fn(batch)
    err = e.value
    assert (err.function, err.index) == ("custom", 2)
    text = str(err)
    assert text.startswith("reward 'custom' failed on sample 2 (completion 'this goes boom x")
    assert "…'" in text and "KeyError" in text and "no such key" in text
    assert isinstance(err.__cause__, KeyError)


def test_builtin_errors_keep_the_registry_name():
    fn = RewardFunction(RewardSpec({"numeric": 1.0}))
    with pytest.raises(
        RewardError, match=r"^reward 'numeric' failed on sample 1 \(completion '12'\)"
    ):
        fn([s("12", "12"), s("12", None)])


@pytest.mark.parametrize(
    "returns, message",
    [
        (lambda batch: [1.0] * (len(batch) - 1), r"'bad' failed: returned 2 scores for 3 samples"),
        (lambda batch: None, r"'bad' failed: returned NoneType"),
        (lambda batch: [0.0, math.nan, 0.0], r"'bad' failed on sample 1 .*returned nan"),
        (lambda batch: [0.0, 0.0, math.inf], r"on sample 2 .*returned inf"),
        (lambda batch: [0.0, "high", 0.0], r"on sample 1 .*returned 'high', not a finite number"),
        (lambda batch: torch.tensor([0.0, 1.0, 2.0]), None),  # tensors are fine
    ],
)
def test_bad_return_values(returns, message):
    fn = RewardFunction(RewardSpec({"bad": 1.0}), registry={"bad": returns})
    batch = [s("a"), s("b"), s("c")]
    if message is None:
        assert fn(batch).tolist() == [0.0, 1.0, 2.0]
        return
    with pytest.raises(RewardError, match=message):
        fn(batch)


def test_a_batch_only_failure_is_reported_for_the_batch():
    def needs_one(batch):
        if len(batch) > 1:
            raise RuntimeError("out of memory")
        return [0.0]

    fn = RewardFunction(RewardSpec({"big": 1.0}), registry={"big": needs_one})
    with pytest.raises(
        RewardError, match=r"'big' failed: RuntimeError: out of memory \(on a batch of 2"
    ):
        fn([s("a"), s("b")])


def test_reward_error_pickles():
    err = RewardError("detail", function="exact", index=3, completion="x")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and (back.function, back.index) == ("exact", 3)


# ---------------------------------------------------------------- RewardModel

TEXTS = [
    "user: What is 7 + 5 ?",
    "assistant: 7 + 5 = 12 .",
    "user: What is Mira's job ?",
    "assistant: Mira is a teacher . Mira is a nurse .",
    "system: You are MiniMind , a helpful assistant .",
]


def _write_reward_model(folder, num_labels=1, seed=0):
    """A 1-layer Llama sequence classifier (hidden 16) and a WordLevel tokenizer, saved."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=fast.pad_token_id,
        initializer_range=0.5,  # scores far enough apart that a mix-up would show
    )
    torch.manual_seed(seed)
    transformers.LlamaForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return _write_reward_model(tmp_path_factory.mktemp("rm") / "rm")


def _batch():
    prompts = [
        [{"role": "user", "content": "What is 7 + 5 ?"}],
        [
            {"role": "system", "content": "You are MiniMind ."},
            {"role": "user", "content": "What is Mira's job ?"},
        ],
    ]
    replies = [
        "7 + 5 = 12 .",
        "Mira is a teacher .",
        "Mira is a nurse . Mira is a nurse .",
        "12",
        "",
    ]
    return [Sample(p, r, None) for p in prompts for r in replies]


def test_reward_model_batched_equals_one_by_one(rm_dir, one_thread):
    batch = _batch()
    rm = RewardModel(rm_dir, batch_size=4)  # 10 samples: batches of 4, 4 and 2
    batched = rm(batch)
    alone = [rm([x])[0] for x in batch]
    assert len(batched) == len(batch) and all(isinstance(x, float) for x in batched)
    assert batched == pytest.approx(alone, abs=1e-5)
    assert max(batched) - min(batched) > 1e-3  # the samples do get different scores
    assert rm([]) == []
    # As a term of a spec, on the same weights.
    fn = RewardFunction(RewardSpec.parse("model:2,format:1", model_path=str(rm_dir)))
    total = fn(batch)
    assert total.shape == (len(batch),) and total.dtype == torch.float32
    assert total.tolist() == pytest.approx([2 * x for x in alone], abs=1e-5)
    assert fn.last_parts["model"] == pytest.approx(alone, abs=1e-5)


def test_reward_model_rendering(rm_dir, one_thread):
    rm = RewardModel(rm_dir)
    sample = _batch()[6]
    assert rm.render(sample) == (
        "system: You are MiniMind .\nuser: What is Mira's job ?\nassistant: Mira is a teacher ."
    )
    rm.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    )
    assert rm.render(sample).startswith("system : You are MiniMind . . user :")
    batch = _batch()
    assert rm(batch) == pytest.approx([rm([x])[0] for x in batch], abs=1e-5)


def test_reward_model_truncates_from_the_left(rm_dir, one_thread):
    rm = RewardModel(rm_dir, max_length=8)
    long = Sample([{"role": "user", "content": "What is 7 + 5 ? " * 50}], "12", None)
    short = Sample([{"role": "user", "content": "7 + 5 ?"}], "12", None)
    got = rm([long, short])
    assert all(math.isfinite(x) for x in got)
    # The kept 8 tokens end with the reply, so the long prompt's head was what was cut.
    ids = rm.tokenizer(rm.render(long), truncation=True, max_length=8)["input_ids"]
    assert rm.tokenizer.convert_ids_to_tokens(ids)[-1] == "12"


def test_reward_model_errors(rm_dir, tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(RewardError, match=r"reward model folder '.*nowhere' does not exist"):
        RewardModel(tmp_path / "nowhere")
    with pytest.raises(RewardError, match="does not exist"):
        RewardFunction(RewardSpec.parse("model", model_path=str(tmp_path / "nowhere")))

    broken = tmp_path / "broken_tokenizer"
    shutil.copytree(rm_dir, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(
        RewardError,
        match=r"cannot load the reward model's tokenizer from .*broken_tokenizer.*: JSONDecodeError",
    ):
        RewardModel(broken)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(rm_dir, no_weights)
    (no_weights / "config.json").unlink()
    with pytest.raises(
        RewardError, match="cannot load a sequence-classification reward model from"
    ):
        RewardModel(no_weights)

    two = _write_reward_model(tmp_path / "two_labels", num_labels=2)
    with pytest.raises(RewardError, match="num_labels=2; a reward model must output one score"):
        RewardModel(two)
