"""Reward functions for the RL stages (GRPO, PPO, SPO): text in, one float per completion out.

Owns: the `Sample` a reward scores; the verifiable rewards (`numeric_match`, `exact_match`,
`answer_match`), the shape rewards (`format_reward`, `length_penalty`, `repetition_penalty`),
all pure and batched; `RewardModel`, a transformers sequence-classification model read from a
local folder; `RewardSpec`, the weighted sum given on the command line ("answer:1,format:0.5"),
and `RewardFunction`, which evaluates it and names the function and the sample when one fails;
`check_samples_have_answers`, the check an RL stage runs on its data before training starts.
Does not own: sampling completions (rollout.py), advantages and losses (the stages), reading
rlaif files (minimind.data.formats), the command-line flags themselves (the stage declares them).

Decisions:
- Every reward has the signature `fn(samples: list[Sample]) -> list[float]`, so a model-based
  reward batches its forward pass and a pure one is a loop; `RewardFunction` treats them alike.
- Completions are the decoded assistant reply, end token already stripped. The answer part of a
  reply (`extract_answer`) is its last `<answer>...</answer>` block; failing that, the text after
  the last `</think>`; failing that, the whole reply. A reward for the answer must not be earned
  by a number or word that only appears while thinking; `format_reward` pays for the layout.
- Verifiable rewards are 1.0 or 0.0. Penalties are in [-1, 0] and are 0 for a good reply, so
  adding one never pays a model for mere length or for stopping early.
- Numbers: ASCII or full-width digits, an optional sign, optional decimals, optional 1,234
  grouping; no exponents, fractions or number words ("twelve", "十二"). A minus sign counts
  only when it does not follow a word, so "19-4" reads as 19 and 4, not 19 and -4. Two numbers
  are equal when `math.isclose` (relative 1e-9) says so: "12", "12.0" and "12.00" are one answer.
- Exact match is a whole-word match, not string equality: demo replies are sentences ("Mira is a
  teacher.") and the rlaif answer is the key word ("teacher"). Both sides are NFKC-normalised,
  case-folded and whitespace-collapsed, and the answer loses leading and trailing punctuation
  (ASCII and Chinese 。！？，、；：). An answer containing a Chinese or Japanese character matches
  as a substring (these scripts do not separate words); any other answer must not touch a
  letter or digit of a space-separated script on either side, so "teacher" is not found in
  "teachers". Known blind spot: a negation ("not a teacher", "不是老师") still matches.
- An answer that is missing, or empty after normalisation, is an error, never a silent 0: a
  reward that is 0 for every sample trains nothing and looks like a model that learned nothing.
  `check_samples_have_answers` catches this before the first step.
- Zero-weight terms are not computed: `"answer:0"` switches a reward off, and does not require
  answers.
- A failing reward surfaces as `RewardError` naming the reward, the sample's index in the batch
  and the start of its completion. When a batched function raises, it is rerun one sample at a
  time to find the sample; this costs nothing on the normal path.
- `RewardModel` refuses a head with `num_labels != 1`: which logit means "better" is a property
  of how the model was trained, and guessing it silently would train towards the wrong end.
  It pads on the right (a causal model's last real token then sees no padding, so a batched score
  equals the score alone) and truncates on the left (the reply being judged is at the end).
  It is the one place in train/ that imports transformers, lazily, so nothing else needs it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minimind.data.formats import split_reasoning

RewardFn = Callable[[list["Sample"]], Sequence[float]]


class RewardError(ValueError):
    """A reward that cannot be computed, a bad reward spec, or data a reward cannot use.

    When raised for one sample it records `function`, `index` (in the batch) and `completion`,
    and its text names all three.

    >>> str(RewardError("no ground-truth answer", function="numeric", index=3, completion="12"))
    "reward 'numeric' failed on sample 3 (completion '12'): no ground-truth answer"
    >>> str(RewardError("unknown reward 'foo'"))
    "unknown reward 'foo'"
    """

    def __init__(
        self,
        detail: str,
        *,
        function: str | None = None,
        index: int | None = None,
        completion: str | None = None,
    ) -> None:
        self.detail = detail
        self.function = function
        self.index = index
        self.completion = completion
        if function is None:
            message = detail
        elif index is None:
            message = f"reward {function!r} failed: {detail}"
        else:
            message = (
                f"reward {function!r} failed on sample {index} "
                f"(completion {_short(completion or '')!r}): {detail}"
            )
        super().__init__(message)

    def __reduce__(self):
        # DataLoader workers and multiprocessing pickle exceptions; the default would call
        # __init__(message) and lose the fields.
        kwargs = {"function": self.function, "index": self.index, "completion": self.completion}
        return (_rebuild_error, (self.detail, kwargs))


def _rebuild_error(detail: str, kwargs: dict[str, Any]) -> RewardError:
    return RewardError(detail, **kwargs)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Sample:
    """One completion to score: the prompt's chat messages, the decoded reply, the rlaif
    record's ground-truth `answer` (None when the record has none)."""

    prompt: list[dict]
    completion: str
    answer: str | None = None


# ---------------------------------------------------------------- text helpers

# Han (incl. extensions and compatibility ideographs), hiragana and katakana: scripts written
# without spaces between words.
_CJK_RANGES = (
    (0x3040, 0x30FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0x20000, 0x3FFFF),
)
_PUNCT = ".,!?;:'\"。！？，、；：…‘’“”「」『』（）()"
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S)
# Optional sign (a minus only where it does not follow a word or a closing bracket), then
# 1,234,567-style groups or plain digits, then optional decimals. ASCII digits only: text is
# NFKC-normalised first, which turns full-width digits into ASCII ones.
_NUMBER = re.compile(r"(?:(?<![\w)\]])[-+])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", re.A)


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def _is_word_char(ch: str) -> bool:
    """A letter or digit of a script that separates words with spaces."""
    return (ch.isalnum() or ch == "_") and not _is_cjk(ch)


def _normalise(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed, U+2212 minus as '-'.

    >>> _normalise("  Mira  IS\\na ＴＥＡＣＨＥＲ −１２ ")
    'mira is a teacher -12'
    """
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-").casefold()
    return " ".join(text.split())


def extract_answer(text: str) -> str:
    """The answer part of a reply, stripped: the last `<answer>...</answer>` block, else the
    text after the last `</think>`, else the whole text.

    >>> extract_answer("<think>\\n7 + 5 = 12\\n</think>\\n<answer>\\n12\\n</answer>")
    '12'
    >>> extract_answer("<think>\\nmaybe 11\\n</think>\\nIt is 12.")
    'It is 12.'
    >>> extract_answer("  Mira is a teacher. ")
    'Mira is a teacher.'
    """
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    _, sep, after = text.rpartition("</think>")
    return (after if sep else text).strip()


def parse_number(text: str) -> float | None:
    """`text` as a number if it is exactly one (after normalisation and outer punctuation),
    else None.

    >>> parse_number("12"), parse_number(" -3.5 "), parse_number("1,234"), parse_number("１２。")
    (12.0, -3.5, 1234.0, 12.0)
    >>> parse_number("teacher") is None, parse_number("12 apples") is None, parse_number("nan")
    (True, True, None)
    """
    # Not a leading "." (".5"): the number pattern needs a digit first, and stripping the dot
    # would read 5.
    norm = _normalise(text).rstrip(_PUNCT + " ").lstrip(_PUNCT.replace(".", "") + " ")
    if not _NUMBER.fullmatch(norm):
        return None
    return float(norm.replace(",", ""))


def last_number(text: str) -> float | None:
    """The last number written in `text`, or None.

    >>> last_number("7 + 5 = 12."), last_number("7加5等于12。"), last_number("19-4=15")
    (12.0, 12.0, 15.0)
    >>> last_number("it is -3"), last_number("19-4"), last_number("no digits") is None
    (-3.0, 4.0, True)
    """
    matches = _NUMBER.findall(_normalise(text))
    return float(matches[-1].replace(",", "")) if matches else None


def contains_answer(text: str, answer: str) -> bool:
    """Whether the normalised `answer` occurs in the normalised `text` as a whole word (any
    answer with a Chinese/Japanese character: as a substring). See the module docstring.

    >>> contains_answer("Mira is a teacher.", "teacher"), contains_answer("Mira is a teachers", "teacher")
    (True, False)
    >>> contains_answer("米拉的工作是老师。", "老师。"), contains_answer("Tomas and Leo", "leo")
    (True, True)
    >>> contains_answer("He lives in Maplefield's east", "Maplefield"), contains_answer("米拉是Mira", "mira")
    (True, True)
    """
    needle = _normalise(answer).strip(_PUNCT + " ")
    if not needle:
        raise ValueError(f"the ground-truth answer {answer!r} is empty after normalisation")
    hay = _normalise(text)
    if any(_is_cjk(ch) for ch in needle):
        return needle in hay
    start = hay.find(needle)
    while start >= 0:
        end = start + len(needle)
        before_ok = start == 0 or not _is_word_char(hay[start - 1])
        after_ok = end == len(hay) or not _is_word_char(hay[end])
        # The needle's own edges may be punctuation ("u.s."); only a word character running
        # straight into a word character joins two words.
        if (before_ok or not _is_word_char(needle[0])) and (
            after_ok or not _is_word_char(needle[-1])
        ):
            return True
        start = hay.find(needle, start + 1)
    return False


def _tokens(text: str) -> list[str]:
    """Whitespace-separated pieces, with every Chinese/Japanese character a piece of its own.

    >>> _tokens("7 + 5 = 12. 米拉是老师。")
    ['7', '+', '5', '=', '12.', '米', '拉', '是', '老', '师', '。']
    """
    out: list[str] = []
    for word in text.split():
        piece = ""
        for ch in word:
            if _is_cjk(ch):
                if piece:
                    out.append(piece)
                    piece = ""
                out.append(ch)
            else:
                piece += ch
        if piece:
            out.append(piece)
    return out


# ---------------------------------------------------------------- the reward functions


def _each(name: str, score: Callable[[Sample], float], samples: list[Sample]) -> list[float]:
    """Score samples one at a time, naming the failing one."""
    out = []
    for i, sample in enumerate(samples):
        try:
            out.append(float(score(sample)))
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(str(e), function=name, index=i, completion=sample.completion) from e
    return out


def _require_answer(sample: Sample) -> str:
    if sample.answer is None or not sample.answer.strip():
        raise ValueError("no ground-truth answer (the rlaif record has no 'answer')")
    return sample.answer


def _numeric_one(sample: Sample) -> float:
    answer = _require_answer(sample)
    target = parse_number(answer)
    if target is None:
        raise ValueError(f"the answer {answer!r} is not a number; use the 'answer' reward")
    got = last_number(extract_answer(sample.completion))
    return float(got is not None and math.isclose(got, target, rel_tol=1e-9, abs_tol=1e-12))


def _exact_one(sample: Sample) -> float:
    return float(contains_answer(extract_answer(sample.completion), _require_answer(sample)))


def numeric_match(samples: list[Sample]) -> list[float]:
    """1.0 when the last number in the reply's answer part equals the numeric `answer`, else 0.0.

    >>> numeric_match([Sample([], "7 + 5 = 12.", "12"), Sample([], "7加5等于13。", "12"),
    ...                Sample([], "<think>\\n12\\n</think>\\n<answer>\\n12.0\\n</answer>", "12"),
    ...                Sample([], "I don't know", "12")])
    [1.0, 0.0, 1.0, 0.0]
    """
    return _each("numeric", _numeric_one, samples)


def exact_match(samples: list[Sample]) -> list[float]:
    """1.0 when the `answer` occurs as a whole word in the reply's answer part, else 0.0
    (normalisation and the rule for Chinese: see the module docstring).

    >>> exact_match([Sample([], "Mira is a teacher.", "teacher"),
    ...              Sample([], "Mira is a teachers", "teacher"),
    ...              Sample([], "米拉的工作是老师。", "老师"), Sample([], "米拉的工作是医生。", "老师")])
    [1.0, 0.0, 1.0, 0.0]
    """
    return _each("exact", _exact_one, samples)


def answer_match(samples: list[Sample]) -> list[float]:
    """`numeric_match` for a sample whose answer is a number, else `exact_match`: the reward for
    mixed data such as the demo's rlaif file.

    >>> answer_match([Sample([], "7 + 5 = 12.", "12"), Sample([], "Mira is a teacher.", "teacher"),
    ...               Sample([], "It is 120.", "12"), Sample([], "Mira is a nurse.", "teacher")])
    [1.0, 1.0, 0.0, 0.0]
    """

    def one(sample: Sample) -> float:
        numeric = parse_number(_require_answer(sample)) is not None
        return _numeric_one(sample) if numeric else _exact_one(sample)

    return _each("answer", one, samples)


def format_reward(samples: list[Sample]) -> list[float]:
    """1.0 when the reply is exactly `<think>...</think><answer>...</answer>` (as
    `split_reasoning` reads it) with a non-empty answer, else 0.0.

    >>> format_reward([Sample([], "<think>\\n7 + 5 = 12\\n</think>\\n<answer>\\n12\\n</answer>"),
    ...                Sample([], "<think>\\n\\n</think>\\n<answer>\\n\\n</answer>"),
    ...                Sample([], "<think>\\nhm\\n</think>\\n<answer>\\n12\\n</answer> ok"),
    ...                Sample([], "12")])
    [1.0, 0.0, 0.0, 0.0]
    """

    return _each("format", lambda s: float(reasoning_layout(s.completion)[0]), samples)


def reasoning_layout(reply: str, reference: str | None = None) -> tuple[bool, bool]:
    """(is `reply` in the think/answer layout with a non-empty answer, as `format_reward` pays
    for; is its answer block the `reference` reply's, whitespace collapsed). The reasoning
    stage's held-out measure and `minimind eval`'s reasoning task both read replies with it.

    >>> ref = "<think>\\n7 + 5\\n</think>\\n<answer>\\n12 apples\\n</answer>"
    >>> reasoning_layout("<think>\\nadd\\n</think>\\n<answer>\\n12  apples\\n</answer>", ref)
    (True, True)
    >>> reasoning_layout("<think>\\n\\n</think>\\n<answer>\\n11\\n</answer>", ref)
    (True, False)
    >>> reasoning_layout("12 apples", ref)
    (False, False)
    """
    got = split_reasoning(reply)
    if got is None or not got[1].strip():
        return False, False
    gold = None if reference is None else split_reasoning(reference)
    return True, gold is not None and " ".join(got[1].split()) == " ".join(gold[1].split())


def length_penalty(samples: list[Sample], target: int = 512) -> list[float]:
    """0 up to `target` characters of reply, then falling linearly to -1 at twice `target`:
    `clip((target - chars) / target, -1, 0)`. Characters, not tokens: a reward sees text only.
    A good reply needs no more than `target` characters (the demo's longest reasoning replies are
    about 200); a model that rambles to max_new_tokens is pushed back.

    >>> length_penalty([Sample([], "a" * 10), Sample([], "a" * 15), Sample([], "a" * 40)], target=10)
    [0.0, -0.5, -1.0]
    """
    if target <= 0:
        raise RewardError(f"length_penalty: target must be positive, got {target}")
    return _each(
        "length",
        lambda s: max(-1.0, min(0.0, (target - len(s.completion)) / target)),
        samples,
    )


def repetition_penalty(samples: list[Sample], n: int = 3) -> list[float]:
    """Minus the fraction of the reply's n-grams that repeat an earlier one, in [-1, 0]: tokens
    are whitespace-separated words, and single characters in Chinese/Japanese text. A reply of
    fewer than `n` tokens has nothing to repeat and scores 0.

    >>> scores = repetition_penalty([Sample([], "Mira is a teacher."), Sample([], "a b c a b c a b c"),
    ...                              Sample([], "好好好好好"), Sample([], "hi")])
    >>> [round(x, 3) for x in scores]  # 3 of 7 trigrams distinct; 1 of 3
    [0.0, -0.571, -0.667, 0.0]
    """
    if n < 1:
        raise RewardError(f"repetition_penalty: n must be at least 1, got {n}")

    def one(sample: Sample) -> float:
        toks = _tokens(sample.completion)
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        return len(set(grams)) / len(grams) - 1.0 if grams else 0.0

    return _each("repetition", one, samples)


REWARDS: dict[str, RewardFn] = {
    "numeric": numeric_match,
    "exact": exact_match,
    "answer": answer_match,
    "format": format_reward,
    "length": length_penalty,
    "repetition": repetition_penalty,
}
VERIFIABLE = {"numeric", "exact", "answer"}
MODEL = "model"  # the spec's name for the RewardModel term


# ---------------------------------------------------------------- the model-based reward


class RewardModel:
    """A transformers sequence-classification reward model from a local folder.

    Scores `prompt + [assistant: completion]`, rendered with the reward tokenizer's chat template
    if it has one (the template then owns the special tokens), else as `role: content` lines
    (tokenised with the tokenizer's own special tokens). Returns `logits[:, 0]`. Batched with
    right padding, under `torch.inference_mode`, in the dtype the folder's config asks for.
    """

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        max_length: int = 1024,
    ) -> None:
        self.path = Path(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        if batch_size < 1 or max_length < 1:
            raise RewardError(
                f"reward model: batch_size and max_length must be positive, "
                f"got {batch_size} and {max_length}"
            )
        if not self.path.is_dir():
            raise RewardError(f"reward model folder {str(self.path)!r} does not exist")
        try:
            import transformers
        except ImportError as e:
            raise RewardError(
                "a reward model needs transformers: pip install 'minimind[hf]'"
            ) from e

        # The tokenizer first: it is cheap, and a broken one should not cost a model load.
        try:
            tok = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as e:
            raise RewardError(
                f"cannot load the reward model's tokenizer from {str(self.path)!r}: "
                f"{type(e).__name__}: {_short(str(e), 300)}"
            ) from e
        try:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                self.path, local_files_only=True
            )
        except Exception as e:
            raise RewardError(
                f"cannot load a sequence-classification reward model from {str(self.path)!r}: "
                f"{type(e).__name__}: {_short(str(e), 300)}"
            ) from e
        if model.config.num_labels != 1:
            raise RewardError(
                f"reward model {str(self.path)!r} has num_labels={model.config.num_labels}; "
                "a reward model must output one score (num_labels=1)"
            )
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise RewardError(
                    f"the reward model's tokenizer in {str(self.path)!r} has neither a pad nor "
                    "an eos token to pad batches with"
                )
            tok.pad_token = tok.eos_token
        # The classification head reads the last token that is not padding; it finds it through
        # the config's pad id, which must therefore be the tokenizer's.
        model.config.pad_token_id = tok.pad_token_id
        tok.padding_side = "right"
        tok.truncation_side = "left"
        self.tokenizer = tok
        self.model = model.to(self.device).eval()

    def render(self, sample: Sample) -> str:
        """The text the reward model reads for one sample."""
        messages = [*sample.prompt, {"role": "assistant", "content": sample.completion}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    def __call__(self, samples: list[Sample]) -> list[float]:
        templated = bool(self.tokenizer.chat_template)
        out: list[float] = []
        for start in range(0, len(samples), self.batch_size):
            texts = [self.render(s) for s in samples[start : start + self.batch_size]]
            batch = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=not templated,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits  # (B, 1)
            out.extend(logits[:, 0].float().cpu().tolist())
        return out


# ---------------------------------------------------------------- the weighted sum


def _known(registry: Mapping[str, RewardFn]) -> str:
    return ", ".join([*sorted(registry), MODEL])


@dataclass
class RewardSpec:
    """A weighted sum of rewards: name -> weight, and the reward model's folder if `model` is one.

    >>> RewardSpec.parse("answer:1, format:0.5,repetition")
    RewardSpec(weights={'answer': 1.0, 'format': 0.5, 'repetition': 1.0}, model_path=None)
    >>> str(RewardSpec.parse("model:0.5,format:-0.25", model_path="rm"))
    'model:0.5,format:-0.25'
    """

    weights: dict[str, float]
    model_path: str | None = None

    @classmethod
    def parse(cls, text: str, model_path: str | None = None) -> RewardSpec:
        """Read `name[:weight],...` (a bare name weighs 1). Names: REWARDS' keys and `model`,
        which needs `model_path` (MiniMind's `--reward_model_path`). Weights may be negative or
        0 (off). A `model_path` with no `model` term is an error, not silently unused.
        """
        weights: dict[str, float] = {}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, value = (p.strip() for p in item.partition(":"))
            if name not in REWARDS and name != MODEL:
                raise RewardError(f"unknown reward {name!r} in {text!r}; known: {_known(REWARDS)}")
            if name in weights:
                raise RewardError(f"reward {name!r} is given twice in {text!r}")
            try:
                weight = float(value) if sep else 1.0
            except ValueError:
                raise RewardError(
                    f"reward {name!r}: weight {value!r} is not a number (in {text!r})"
                ) from None
            if not math.isfinite(weight):
                raise RewardError(f"reward {name!r}: weight must be finite, got {value!r}")
            weights[name] = weight
        if not weights:
            raise RewardError(
                f"no rewards in {text!r}; expected e.g. 'answer:1,format:0.5' "
                f"(known: {_known(REWARDS)})"
            )
        if weights.get(MODEL, 0.0) != 0.0 and not model_path:
            raise RewardError(
                "the 'model' reward needs a reward model folder (--reward_model_path)"
            )
        if model_path and MODEL not in weights:
            raise RewardError(
                f"a reward model folder was given ({model_path!r}) but the rewards {text!r} "
                "have no 'model' term; add e.g. 'model:1'"
            )
        return cls(weights, model_path)

    def active(self) -> dict[str, float]:
        """The terms with a nonzero weight: the ones computed."""
        return {name: w for name, w in self.weights.items() if w != 0.0}

    def __str__(self) -> str:
        return ",".join(f"{name}:{w:g}" for name, w in self.weights.items())


def check_samples_have_answers(
    spec: RewardSpec, answers: Sequence[str | None], source: str
) -> None:
    """Raise `RewardError` naming `source` and the first record (0-based index) that a
    verifiable reward of `spec` cannot score: no answer at all, or, for `numeric`, an answer
    that is not a number. Run it on the rlaif file before training starts.

    >>> check_samples_have_answers(RewardSpec({"answer": 1.0}), ["12", "teacher"], "rlaif.jsonl")
    >>> check_samples_have_answers(RewardSpec({"format": 1.0}), [None], "rlaif.jsonl")
    >>> check_samples_have_answers(RewardSpec({"answer": 1.0}), ["12", None, ""], "rlaif.jsonl")
    Traceback (most recent call last):
    ...
    minimind.train.rewards.RewardError: rlaif.jsonl: record 1 has no 'answer' (2 of 3 records have none), but the reward 'answer' needs one; give every record an answer or drop that reward
    """
    needed = sorted(VERIFIABLE & spec.active().keys())
    if not needed:
        return
    missing = [i for i, a in enumerate(answers) if a is None or not str(a).strip()]
    if missing:
        raise RewardError(
            f"{source}: record {missing[0]} has no 'answer' ({len(missing)} of {len(answers)} "
            f"records have none), but the reward{'s' if len(needed) > 1 else ''} "
            f"{', '.join(repr(n) for n in needed)} need{'' if len(needed) > 1 else 's'} one; "
            "give every record an answer or drop that reward"
        )
    if "numeric" in needed:
        for i, a in enumerate(answers):
            if parse_number(str(a)) is None:
                raise RewardError(
                    f"{source}: record {i} has the answer {a!r}, which is not a number, but "
                    "the reward 'numeric' needs one; use 'answer' for mixed data"
                )


class RewardFunction:
    """`spec` evaluated: `__call__(samples)` gives the weighted total as a float32 tensor (N,)
    on `device` (where the reward model runs too); `last_parts` keeps each term's unweighted
    scores from the last call, for logging. `registry` replaces REWARDS (tests, custom rewards).

    >>> fn = RewardFunction(RewardSpec({"answer": 1.0, "format": 0.5}))
    >>> fn([Sample([], "7 + 5 = 12.", "12"), Sample([], "<think>\\n\\n</think>\\n<answer>\\n12\\n</answer>", "12")])
    tensor([1.0000, 1.5000])
    >>> fn.last_parts
    {'answer': [1.0, 1.0], 'format': [0.0, 1.0]}
    """

    def __init__(
        self,
        spec: RewardSpec,
        device: str | torch.device = "cpu",
        registry: Mapping[str, RewardFn] | None = None,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        registry = REWARDS if registry is None else registry
        self.terms: dict[str, tuple[float, RewardFn]] = {}
        self.last_parts: dict[str, list[float]] = {}
        for name, weight in spec.active().items():
            if name == MODEL:
                if not spec.model_path:
                    raise RewardError(
                        "the 'model' reward needs a reward model folder (--reward_model_path)"
                    )
                fn: RewardFn = RewardModel(spec.model_path, device=self.device)
            elif name in registry:
                fn = registry[name]
            else:
                raise RewardError(f"unknown reward {name!r}; known: {_known(registry)}")
            self.terms[name] = (weight, fn)

    def __call__(self, samples: list[Sample]) -> torch.Tensor:
        # Summed in float64 on the CPU: the scores are Python floats already, and the order of
        # terms should not change the total in the last bit.
        total = torch.zeros(len(samples), dtype=torch.float64)
        parts: dict[str, list[float]] = {}
        for name, (weight, fn) in self.terms.items():
            scores = _run(name, fn, samples)
            parts[name] = scores
            total += weight * torch.tensor(scores, dtype=torch.float64)
        self.last_parts = parts
        return total.to(device=self.device, dtype=torch.float32)


def _run(name: str, fn: RewardFn, samples: list[Sample]) -> list[float]:
    """fn(samples) as a checked list of finite floats, or a RewardError naming `name`."""
    try:
        raw = fn(samples)
    except Exception as e:
        raise _locate(name, fn, samples, e) from e
    try:
        raw = list(raw)
    except TypeError:
        raise RewardError(
            f"returned {type(raw).__name__}, expected a list of {len(samples)} floats",
            function=name,
        ) from None
    if len(raw) != len(samples):
        raise RewardError(f"returned {len(raw)} scores for {len(samples)} samples", function=name)
    scores = []
    for i, value in enumerate(raw):
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = None
        if score is None or not math.isfinite(score):
            raise RewardError(
                f"returned {value!r}, not a finite number",
                function=name,
                index=i,
                completion=samples[i].completion,
            )
        scores.append(score)
    return scores


def _locate(name: str, fn: RewardFn, samples: list[Sample], error: Exception) -> RewardError:
    """The error `fn` raised on the batch, tied to the first sample that fails alone."""
    if isinstance(error, RewardError) and error.index is not None:
        index = error.index
    else:
        index = None
        if len(samples) > 1:
            for i, sample in enumerate(samples):
                try:
                    fn([sample])
                except Exception:
                    index = i
                    break
        elif samples:
            index = 0
    detail = error.detail if isinstance(error, RewardError) else f"{type(error).__name__}: {error}"
    if index is None:
        return RewardError(
            f"{detail} (on a batch of {len(samples)}; no sample fails alone)", function=name
        )
    return RewardError(detail, function=name, index=index, completion=samples[index].completion)
