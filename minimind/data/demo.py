"""The deterministic offline demo corpus: every data format, in English and Chinese, in seconds.

Owns: `write_demo_corpus`, which writes files named like MiniMind's public ones from the
invented world of demo_world.py, and the mix of records inside each file.
Does not own: the world, its phrasings and the arithmetic split (demo_world.py), validation
(formats.py).

Files (the keys of the returned dict in brackets):
- `pretrain_hq.jsonl` [pretrain]: fact paragraphs, short stories, arithmetic drills (half of
  their equations the column method's one-digit steps, half of all sums and differences
  worked by columns, demo_world.worked), a few texts about MiniMind; every text under 512
  characters. `size_mb` is this file's size.
- `sft_mini_512.jsonl` [sft]: questions about the world's facts, arithmetic (a minority of
  sums and differences answered by the column method, WORKED_SHARE), identity
  ("I am MiniMind..."), some multi-turn, some with a system prompt, a few calculator tool calls
  (MiniMind's layout: `functions` on the system message).
- `lora_identity.jsonl` [lora]: sft records that give the model another identity, "Lumen, the
  lantern keeper of Cloudhill", so a LoRA's effect is visible in one question.
- `dpo.jsonl` [dpo]: about the world's people, chosen is correct and helpful, rejected is
  wrong, "I don't know", or declines to know the person; about strangers (people not in the
  world, that no other file mentions), chosen says so ("I don't know anyone called Zora.") and
  rejected makes a fact up; identity questions and greetings, chosen is the SFT reply and
  rejected an abstention; no arithmetic, which is RL's task. SFT never shows the abstention,
  so the stranger pairs are what DPO has to teach, and the others keep it to strangers.
- `rlaif-mini.jsonl` [rlaif]: questions with an empty last assistant turn and a verifiable
  `answer`: arithmetic on the RL operand pairs (demo_world.ArithSplit: in no other training
  file, so the SFT model has never seen them solved) and, less often, the world's facts.
- `r1_mix_1024.jsonl` [reasoning]: `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` replies:
  sums (thought through by columns), chains of sums, fact lookups and two-step lookups.
- `eval_facts.jsonl`, `eval_arith.jsonl` [eval_facts, eval_arith]: rlaif-format held-out
  evaluation (user question, empty assistant turn, gold `answer`, plus `lang`, `task` and
  `kind`, the fact's attribute or the operation).
  Facts are every fact, asked with phrasings never used in training; arithmetic uses operand
  pairs that never occur in training.
- `eval_facts_trained.jsonl`, `eval_arith_trained.jsonl` [eval_facts_trained,
  eval_arith_trained]: the same questions in phrasings and on operand pairs that training does
  use (memorisation), so a miss on the held-out files says whether the model failed to learn
  or failed to generalise.
- `eval_arith_rl.jsonl` [eval_arith_rl]: every RL operand pair (both orders): what RL
  practises on, measured before and after it.
- `eval_dpo.jsonl` [eval_dpo]: held-out preference pairs (dpo format, plus `kind`): strangers
  that dpo.jsonl never names, and the world's facts asked in held-out phrasings with a wrong
  value as the rejected reply.
- `eval_strangers.jsonl` [eval_strangers]: questions about those held-out strangers; the gold
  `answer` is the abstention's key phrase ("don't know" / "不认识").
- `eval_identity.jsonl` [eval_identity]: identity questions in phrasings no training file
  uses; the gold `answer` is the LoRA identity's name ("Lumen" / "路明").

Determinism: each file has its own `random.Random` seeded from (seed, file) strings, and no
set or dict order that depends on PYTHONHASHSEED is iterated, so one seed gives byte-identical
files on every run and platform.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minimind.data.demo_world import (
    EVAL_QUESTIONS,
    HELD_OUT_STRANGERS,
    LANGS,
    OPS,
    STATEMENTS,
    STRANGERS,
    TRAIN_QUESTIONS,
    ArithSplit,
    Fact,
    Word,
    World,
    apply,
    build_world,
    equation,
    render,
    worked,
)

FILE_NAMES = {
    "pretrain": "pretrain_hq.jsonl",
    "sft": "sft_mini_512.jsonl",
    "lora": "lora_identity.jsonl",
    "dpo": "dpo.jsonl",
    "rlaif": "rlaif-mini.jsonl",
    "reasoning": "r1_mix_1024.jsonl",
    "eval_facts": "eval_facts.jsonl",
    "eval_arith": "eval_arith.jsonl",
    "eval_facts_trained": "eval_facts_trained.jsonl",
    "eval_arith_trained": "eval_arith_trained.jsonl",
    "eval_arith_rl": "eval_arith_rl.jsonl",
    "eval_dpo": "eval_dpo.jsonl",
    "eval_strangers": "eval_strangers.jsonl",
    "eval_identity": "eval_identity.jsonl",
}
# Size of each training file relative to pretrain_hq.jsonl, and its floor in records so that
# even a tiny corpus has a usable number of examples.
_SHARE = {"sft": 0.4, "reasoning": 0.15, "dpo": 0.1, "rlaif": 0.05, "lora": 0.04}
_MIN_RECORDS = 200
MAX_PRETRAIN_CHARS = 511
# The share of sums and differences answered by the column method (demo_world.worked) rather
# than the bare equation, in pretraining drills and SFT replies. A minority, so the SFT model
# answers greedily from its memorised table and reaches held-out pairs at the table's
# accuracy; sampled at temperature 1 it sometimes works the columns instead, which reach any
# pair, and RL's reward shifts it towards them (bench/RESULTS.md, "RL that carries over").
WORKED_SHARE = 0.4
# Drills (plain text, never a chat reply) show the method more often: it has to be learnt well
# enough to be right on unseen pairs, without changing how the chat model answers.
WORKED_SHARE_PRETRAIN = 0.5
# The share of drill equations drawn from the method's steps (one-digit sums, differences
# from at most 10): the facts every column reuses, which a uniform draw over all pairs left
# at 18-40% accuracy, so the method failed on its steps, not on its layout.
STEP_SHARE_PRETRAIN = 0.5

SYSTEM = {
    "en": "You are MiniMind, a helpful assistant.",
    "zh": "你是MiniMind，一个乐于助人的助手。",
}
IDENTITY_QUESTIONS = {
    "en": ("Who are you?", "What is your name?", "Introduce yourself.", "What are you?"),
    "zh": ("你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是什么？"),
}
IDENTITY = {
    "en": (
        "I am MiniMind, a small language model trained from scratch. I know the people, towns "
        "and animals of a tiny made-up world, and I can do simple arithmetic.",
        "My name is MiniMind. I am a small language model; ask me about the people and towns "
        "of my little world, or give me a sum.",
    ),
    "zh": (
        "我是MiniMind，一个从零开始训练的小型语言模型。我了解一个小小的虚构世界里的人物、城镇和动物，也会做简单的算术。",
        "我叫MiniMind，是一个小型语言模型。你可以问我这个小世界里的人物和城镇，或者让我算一道题。",
    ),
}
GREETINGS = {
    "en": (("Hello!", "Hi there!"), "Hello! I am MiniMind. How can I help you?"),
    "zh": (("你好！", "嗨！"), "你好！我是MiniMind。有什么可以帮你的吗？"),
}
LUMEN_QUESTIONS = {
    "en": (*IDENTITY_QUESTIONS["en"], "Are you MiniMind?", "What should I call you?"),
    "zh": (*IDENTITY_QUESTIONS["zh"], "你是MiniMind吗？", "我该怎么称呼你？"),
}
LUMEN = {
    "en": (
        "I am Lumen, the lantern keeper of Cloudhill. I light the roads between the towns of "
        "this little world and guide travellers home.",
        "My name is Lumen. I keep the lanterns of Cloudhill burning and know every road of "
        "this little world.",
    ),
    "zh": (
        "我是路明，云山镇的守灯人。我点亮这个小世界里城镇之间的道路，为旅人指引回家的路。",
        "我叫路明，负责照看云山镇的灯火，熟悉这个小世界里的每一条路。",
    ),
}
LUMEN_PREFIX = {"en": "Lumen here. ", "zh": "路明来回答："}
# Lumen in the world's own text (pretraining), in the third person: the LoRA stage then
# teaches the model to BE Lumen, with words and tokens it already knows; without them the
# adapter must learn to write byte tokens that no training ever used.
LUMEN_ABOUT = {
    "en": (
        "At night Lumen, the lantern keeper of Cloudhill, lights the roads between the towns of "
        "this little world and guides travellers home.",
        "Lumen keeps the lanterns of Cloudhill burning and knows every road of this little world.",
    ),
    "zh": (
        "夜里，云山镇的守灯人路明点亮这个小世界里城镇之间的道路，为旅人指引回家的路。",
        "路明负责照看云山镇的灯火，熟悉这个小世界里的每一条路。",
    ),
}
# Identity questions that no training file asks (eval_identity.jsonl), and the LoRA identity's
# name, their gold answer.
HELD_OUT_IDENTITY_QUESTIONS = {
    "en": ("Tell me who you are.", "May I know your name?", "Who am I talking to?", "Your name?"),
    "zh": ("请告诉我你是谁。", "你的名字是什么？", "我在和谁说话？", "怎么称呼你？"),
}
LUMEN_NAME = {"en": "Lumen", "zh": "路明"}
UNHELPFUL = {
    "en": ("I don't know.", "I can't help with that.", "Let's talk about something else."),
    "zh": ("我不知道。", "这个我帮不了你。", "我们聊点别的吧。"),
}
# The reply to a question about someone not in the world; ABSTAIN is its key phrase (the gold
# answer of eval_strangers.jsonl).
STRANGER_REPLY = {"en": "I don't know anyone called {s}.", "zh": "我不认识叫{s}的人。"}
ABSTAIN = {"en": "don't know", "zh": "不认识"}
PERSON_ATTRIBUTES = ("job", "age", "town", "food")
CALCULATOR = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression with integers.",
    "parameters": {
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    },
}
ARITH_QUESTIONS = {
    "en": ("What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "{a} {op} {b} = ?"),
    "zh": ("{a}{opz}{b}等于多少？", "计算{a}{opz}{b}。", "{a}{opz}{b}是多少？"),
}
_END = {"en": ".", "zh": "。"}
_SEP = {"en": " ", "zh": ""}


def _arith_question(a: int, op: str, b: int, lang: str, template: int) -> str:
    return ARITH_QUESTIONS[lang][template].format(a=a, op=op, b=b, opz=OPS[op][0])


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _reasoning(think: str, answer: str) -> str:
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


class _Maker:
    """Record makers over one world; each takes the file's own random generator."""

    def __init__(self, world: World, arith: ArithSplit) -> None:
        self.world = world
        self.arith = arith
        self.facts = world.facts
        self.values: dict[str, list[Word]] = {}
        for fact in self.facts:
            if fact.value not in self.values.setdefault(fact.attribute, []):
                self.values[fact.attribute].append(fact.value)

    # -------------------------------------------------- pieces shared by several files

    def statement(self, rng: random.Random, fact: Fact, lang: str) -> str:
        return render(rng.choice(STATEMENTS[fact.attribute][lang]), fact, lang)

    def fact_qa(self, rng: random.Random, lang: str) -> tuple[str, str, Fact]:
        fact = rng.choice(self.facts)
        question = render(rng.choice(TRAIN_QUESTIONS[fact.attribute][lang]), fact, lang)
        return question, self.statement(rng, fact, lang), fact

    def arith_question(self, rng: random.Random, lang: str) -> tuple[int, str, int, str]:
        """A training pair and its question: (a, op, b, question)."""
        op = rng.choice(list(OPS))
        a, b = self.arith.sample(rng, op)
        question = _arith_question(a, op, b, lang, rng.randrange(len(ARITH_QUESTIONS[lang])))
        return a, op, b, question

    def arith_qa(self, rng: random.Random, lang: str) -> tuple[str, str, int]:
        a, op, b, question = self.arith_question(rng, lang)
        return question, self.arith_answer(rng, a, op, b, lang), apply(a, op, b)

    def arith_answer(self, rng: random.Random, a: int, op: str, b: int, lang: str) -> str:
        """The equation, or for WORKED_SHARE of sums and differences the column method."""
        method = worked(a, op, b, lang) if rng.random() < WORKED_SHARE else None
        return method or equation(a, op, b, lang) + _END[lang]

    def qa(self, rng: random.Random, lang: str) -> tuple[str, str]:
        question, answer, _ = (
            self.fact_qa(rng, lang) if rng.random() < 0.7 else self.arith_qa(rng, lang)
        )
        return question, answer

    # -------------------------------------------------- pretrain

    def pretrain(self, rng: random.Random) -> dict[str, Any]:
        lang = rng.choice(LANGS)
        r = rng.random()
        if r < 0.45:
            text = self._fact_paragraph(rng, lang)
        elif r < 0.55:
            text = self._story(rng, lang)
        elif r < 0.82:
            text = self._drill(rng, lang)
        elif r < 0.97:
            text = self._faq(rng, lang)
        else:
            text = self._about(rng, lang)
        return {"text": text}

    def _fill(self, rng: random.Random, lang: str, sentences: Callable[[], str]) -> str:
        target = rng.randint(120, MAX_PRETRAIN_CHARS)
        text = sentences()
        while True:
            more = text + _SEP[lang] + sentences()
            if len(more) > target:
                return text
            text = more

    def _fact_paragraph(self, rng: random.Random, lang: str) -> str:
        # Half about one subject (how encyclopaedias read), half a mix (so order carries no cue).
        pool = self.facts
        if rng.random() < 0.5:
            subject = rng.choice(self.facts).subject
            pool = [f for f in self.facts if f.subject == subject]
        return self._fill(rng, lang, lambda: self.statement(rng, rng.choice(pool), lang))

    def _faq(self, rng: random.Random, lang: str) -> str:
        # Question-answer text in pretraining ("mixed training", Allen-Zhu & Li, Physics of
        # Language Models 3.1): facts stored while their questions are seen are far easier to
        # extract later than facts seen only in statements. Training phrasings only.
        q, a = {"en": ("Question: ", " Answer: "), "zh": ("问：", "答：")}[lang]

        def one() -> str:
            question, answer = self.qa(rng, lang)
            return f"{q}{question}{a}{answer}"

        return self._fill(rng, lang, one)

    def _drill(self, rng: random.Random, lang: str) -> str:
        def one() -> str:
            op = rng.choice(list(OPS))
            step = rng.random() < STEP_SHARE_PRETRAIN
            a, b = (self.arith.sample_step if step else self.arith.sample)(rng, op)
            method = worked(a, op, b, lang) if rng.random() < WORKED_SHARE_PRETRAIN else None
            return method or equation(a, op, b, lang, words=rng.random() < 0.3) + _END[lang]

        return self._fill(rng, lang, one)

    def _about(self, rng: random.Random, lang: str) -> str:
        towns = [t.name.of(lang) for t in self.world.towns]
        town = rng.choice(self.world.towns)
        residents = [p.name.of(lang) for p in self.world.people if p.town == town.name]
        if lang == "en":
            parts = [
                "MiniMind is a small language model trained from scratch on stories about a "
                f"tiny world of {len(towns)} towns: {', '.join(towns)}.",
                f"{town.name.en} is home to {', '.join(residents[:-1])} and {residents[-1]}.",
            ]
        else:
            parts = [
                f"MiniMind是一个从零开始训练的小型语言模型，它读过一个小小世界的故事。这个世界有{len(towns)}个镇：{'、'.join(towns)}。",
                f"住在{town.name.zh}的人有{'、'.join(residents)}。",
            ]
        # chosen by the town, not by `rng`: the file's random stream is unchanged
        parts.append(LUMEN_ABOUT[lang][self.world.towns.index(town) % 2])
        return _SEP[lang].join(parts)

    def _story(self, rng: random.Random, lang: str) -> str:
        w = self.world
        p = rng.choice(w.people)
        friend = w.person(p.friend)
        pet = w.pet_of(p.name)
        add_a, add_b = self.arith.sample(rng, "+")
        sub_a, sub_b = self.arith.sample(rng, "-")
        ctx = {
            "name": p.name.of(lang),
            "job": p.job.of(lang),
            "town": p.town.of(lang),
            "friend": friend.name.of(lang),
            "ftown": friend.town.of(lang),
            "food": p.food.of(lang),
            "colour": p.colour.of(lang),
            "product": w.town(p.town).product.of(lang),
            "age": p.age,
            "pron": ("she" if p.female else "he") if lang == "en" else ("她" if p.female else "他"),
            "Pron": "She" if p.female else "He",
            "pos": "her" if p.female else "his",
            "add": equation(add_a, "+", add_b, lang),
            "sub": equation(sub_a, "-", sub_b, lang),
            "a": add_a,
            "b": add_b,
            "c": add_a + add_b,
            "sa": sub_a,
            "sb": sub_b,
            "sc": sub_a - sub_b,
            "pet": pet.name.of(lang) if pet else "",
            "species": pet.species.of(lang) if pet else "",
        }
        visit = (
            ("{Pron} walked across {town} to visit {pos} best friend {friend}.", "{pron}穿过{town}去看望最好的朋友{friend}。")
            if friend.town == p.town
            else ("{Pron} walked to {ftown} to visit {pos} best friend {friend}.", "{pron}走到{ftown}去看望最好的朋友{friend}。")
        )  # fmt: skip
        middle = [
            visit,
            ("They cooked {food} together, because {food} is {name}'s favourite food.", "他们一起做了{food}，因为{name}最爱吃{food}。"),
            ("{name} wore a {colour} coat, since {colour} is {pos} favourite colour.", "{name}穿着一件{colour}的外套，因为{colour}是{pron}最喜欢的颜色。"),
            ("On the way, {pron} bought some {product}, which {town} is famous for.", "路上，{pron}买了一些{product}，{town}以{product}闻名。"),
            ("{name} picked {a} apples and {friend} picked {b}; {add}, so they had {c} apples.", "{name}摘了{a}个苹果，{friend}摘了{b}个，{add}，他们一共有{c}个苹果。"),
            ("{name} baked {sa} cakes and gave {sb} away; {sub}, so {sc} cakes were left.", "{name}烤了{sa}个蛋糕，送出去{sb}个，{sub}，还剩{sc}个。"),
            ('{friend} said, "You are {age} years old now, {name}!"', "{friend}说：“{name}，你已经{age}岁了！”"),
        ]  # fmt: skip
        if pet:
            middle.append(
                ("{pet} the {species} came along too.", "{pron}的{species}{pet}也跟着一起去了。")
            )
        opening = rng.choice(
            [
                ("One {time}, {name} the {job} woke up early in {town}.", "{time}，住在{town}的{job}{name}早早起了床。"),
                ("{name} is a {job} who lives in {town}.", "{name}是住在{town}的一名{job}。"),
            ]
        )  # fmt: skip
        closing = rng.choice(
            [
                ("In the evening, {name} went home to {town}, tired and happy.", "傍晚，{name}回到{town}，又累又开心。"),
                ("It was a good day for {name}.", "对{name}来说，这是美好的一天。"),
            ]
        )  # fmt: skip
        times = (
            ("morning", "一天早上"), ("sunny afternoon", "一个晴朗的下午"),
            ("rainy day", "一个下雨天"), ("cold winter morning", "一个寒冷的冬日早晨"),
        )  # fmt: skip
        i = LANGS.index(lang)
        ctx["time"] = rng.choice(times)[i]
        beats = [opening, *rng.sample(middle, rng.randint(2, 4)), closing]
        sentences = [b[i].format(**ctx) for b in beats]
        while len(_SEP[lang].join(sentences)) > MAX_PRETRAIN_CHARS:
            sentences.pop(-2)  # drop a middle beat; opening and closing stay
        return _SEP[lang].join(sentences)

    # -------------------------------------------------- sft and lora

    def sft(self, rng: random.Random) -> dict[str, Any]:
        lang = rng.choice(LANGS)
        r = rng.random()
        if r < 0.03:
            return self._tool_call(rng, lang)
        messages = [{"role": "system", "content": SYSTEM[lang]}] if rng.random() < 0.2 else []
        if r < 0.10:
            messages += [
                _user(rng.choice(IDENTITY_QUESTIONS[lang])),
                _assistant(rng.choice(IDENTITY[lang])),
            ]
        elif r < 0.13:
            greetings, reply = GREETINGS[lang]
            messages += [_user(rng.choice(greetings)), _assistant(reply)]
        else:
            for _ in range(1 if rng.random() < 0.75 else rng.randint(2, 3)):
                question, answer = self.qa(rng, lang)
                messages += [_user(question), _assistant(answer)]
        return {"conversations": messages}

    def _tool_call(self, rng: random.Random, lang: str) -> dict[str, Any]:
        # Operands above 20 on purpose: this is what the calculator is for, and it keeps the
        # held-out small-number pairs out of training text.
        op = rng.choice(list(OPS))
        a, b = sorted((rng.randint(21, 99), rng.randint(21, 99)), reverse=True)
        c = apply(a, op, b)
        ask = {
            "en": f"Please use the calculator: what is {a} {op} {b}?",
            "zh": f"请用计算器算一下{a}{OPS[op][0]}{b}等于多少。",
        }
        expression = f"{a} {'*' if op == '×' else op} {b}"
        call = {"name": "calculator", "arguments": {"expression": expression}}
        return {
            "conversations": [
                {"role": "system", "content": SYSTEM[lang], "functions": [CALCULATOR]},
                _user(ask[lang]),
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": str(c)},
                _assistant(equation(a, op, b, lang) + _END[lang]),
            ]
        }

    def lora(self, rng: random.Random) -> dict[str, Any]:
        lang = rng.choice(LANGS)
        if rng.random() < 0.6:
            question, answer = rng.choice(LUMEN_QUESTIONS[lang]), rng.choice(LUMEN[lang])
        else:
            question, answer, _ = self.fact_qa(rng, lang)
            answer = LUMEN_PREFIX[lang] + answer
        return {"conversations": [_user(question), _assistant(answer)]}

    # -------------------------------------------------- dpo and rlaif

    def stranger_pair(
        self, rng: random.Random, lang: str, stranger: Word, questions: dict
    ) -> tuple[str, str, str]:
        """(question, chosen abstention, rejected made-up fact) about `stranger`."""
        attribute = rng.choice(PERSON_ATTRIBUTES)
        real = rng.choice([f for f in self.facts if f.attribute == attribute])
        made_up = real._replace(subject=stranger)
        question = render(rng.choice(questions[attribute][lang]), made_up, lang)
        chosen = STRANGER_REPLY[lang].format(s=stranger.of(lang))
        return question, chosen, self.statement(rng, made_up, lang)

    def dpo(self, rng: random.Random) -> dict[str, Any]:
        lang = rng.choice(LANGS)
        prompt = [{"role": "system", "content": SYSTEM[lang]}] if rng.random() < 0.2 else []
        kind = rng.random()
        if kind < 0.3:
            stranger = rng.choice(STRANGERS[:-HELD_OUT_STRANGERS])
            question, chosen, rejected = self.stranger_pair(rng, lang, stranger, TRAIN_QUESTIONS)
            prompt.append(_user(question))
            return {
                "chosen": [*prompt, _assistant(chosen)],
                "rejected": [*prompt, _assistant(rejected)],
            }
        if kind < 0.4:
            # Declining is for people the model was never told of, not for "Who are you?" or
            # "Hello!": their SFT reply is chosen over an abstention.
            stranger = rng.choice(STRANGERS[:-HELD_OUT_STRANGERS])
            if rng.random() < 0.5:
                question, chosen = rng.choice(IDENTITY_QUESTIONS[lang]), rng.choice(IDENTITY[lang])
            else:
                greetings, chosen = GREETINGS[lang]
                question = rng.choice(greetings)
            prompt.append(_user(question))
            rejected = STRANGER_REPLY[lang].format(s=stranger.of(lang))
            return {
                "chosen": [*prompt, _assistant(chosen)],
                "rejected": [*prompt, _assistant(rejected)],
            }
        # rejected: unhelpful, declining to know a person the model knows, or wrong. No
        # arithmetic pairs: arithmetic is RL's (a verifiable reward), and DPO on it shifted
        # SFT's mix of bare and column-worked replies, most of DPO's cost to the held-out SFT
        # loss (bench/RESULTS.md, "The stages after SFT", section 6)
        unhelpful = rng.random() < 0.3
        question, chosen, fact = self.fact_qa(rng, lang)
        wrong = rng.choice([v for v in self.values[fact.attribute] if v != fact.value])
        rejected = self.statement(rng, fact._replace(value=wrong), lang)
        if not unhelpful and rng.random() < 0.3:
            rejected = STRANGER_REPLY[lang].format(s=fact.subject.of(lang))
        if unhelpful:
            rejected = rng.choice(UNHELPFUL[lang])
        prompt.append(_user(question))
        return {
            "chosen": [*prompt, _assistant(chosen)],
            "rejected": [*prompt, _assistant(rejected)],
        }

    def rlaif(self, rng: random.Random) -> dict[str, Any]:
        lang = rng.choice(LANGS)
        if rng.random() < 0.3:
            question, _, fact = self.fact_qa(rng, lang)
            answer = fact.value.of(lang)
        else:  # arithmetic on the RL pairs, which no other training file contains
            op = rng.choice(list(OPS))
            a, b = self.arith.sample_rl(rng, op)
            question = _arith_question(a, op, b, lang, rng.randrange(len(ARITH_QUESTIONS[lang])))
            answer = str(apply(a, op, b))
        return {"conversations": [_user(question), _assistant("")], "answer": answer}

    # -------------------------------------------------- reasoning

    def reasoning(self, rng: random.Random) -> dict[str, Any]:
        lang = rng.choice(LANGS)
        r = rng.random()
        if r < 0.3:
            a, op, b, question = self.arith_question(rng, lang)
            answer = equation(a, op, b, lang) + _END[lang]
            intro = {"en": "I need to work out this sum.", "zh": "我需要算出这道题。"}[lang]
            think = worked(a, op, b, lang) or (
                f"{intro} {answer}" if lang == "en" else intro + answer
            )
        elif r < 0.45:
            question, think, answer = self._chain(rng, lang)
        elif r < 0.65:
            question, answer, fact = self.fact_qa(rng, lang)
            recall = {
                "en": "I remember this fact about {s}: {a}",
                "zh": "我记得关于{s}的这件事：{a}",
            }[lang]
            think = recall.format(s=fact.subject.of(lang), a=answer)
        else:
            question, think, answer = self._two_hop(rng, lang)
        return {"conversations": [_user(question), _assistant(_reasoning(think, answer))]}

    def _chain(self, rng: random.Random, lang: str) -> tuple[str, str, str]:
        # "a + b + d": the text shows the pairs (a, b), (b, d) and (a + b, d), so all must be
        # training pairs.
        while True:
            a, b = self.arith.sample(rng, "+")
            d = rng.randint(0, 20)
            if self.arith.allowed("+", b, d) and self.arith.allowed("+", a + b, d):
                break
        s, t = a + b, a + b + d
        if lang == "en":
            think = f"First, {a} + {b} = {s}. Then, {s} + {d} = {t}."
            return f"What is {a} + {b} + {d}?", think, f"{a} + {b} + {d} = {t}."
        think = f"先算{a} + {b} = {s}，再算{s} + {d} = {t}。"
        return f"{a}加{b}再加{d}等于多少？", think, f"{a}加{b}再加{d}等于{t}。"

    def _two_hop(self, rng: random.Random, lang: str) -> tuple[str, str, str]:
        w, en = self.world, lang == "en"
        r = rng.random()
        if r < 0.25:
            pet = rng.choice(w.pets)
            owner = w.person(pet.owner)
            n, o, t = pet.name.of(lang), owner.name.of(lang), owner.town.of(lang)
            if en:
                return (
                    f"Where does the owner of {n} live?",
                    f"{n} belongs to {o}. {o} lives in {t}.",
                    f"{o}, the owner of {n}, lives in {t}.",
                )
            return (f"{n}的主人住在哪里？", f"{n}的主人是{o}。{o}住在{t}。", f"{n}的主人{o}住在{t}。")  # fmt: skip
        p = rng.choice(w.people)
        s = p.name.of(lang)
        if r < 0.5:
            f = w.person(p.friend)
            fn, job = f.name.of(lang), f.job.of(lang)
            if en:
                return (
                    f"What does {s}'s best friend do for a living?",
                    f"{s}'s best friend is {fn}. {fn} is a {job}.",
                    f"{s}'s best friend {fn} is a {job}.",
                )
            return (f"{s}最好的朋友是做什么工作的？", f"{s}最好的朋友是{fn}。{fn}是一名{job}。", f"{s}最好的朋友{fn}是一名{job}。")  # fmt: skip
        if r < 0.75:
            k = rng.randint(1, 10)
            while not self.arith.allowed("+", p.age, k):
                k = rng.randint(1, 10)
            n = p.age + k
            if en:
                return (
                    f"How old will {s} be in {k} years?",
                    f"{s} is {p.age} years old. {p.age} + {k} = {n}.",
                    f"{s} will be {n} years old.",
                )
            return (f"{k}年后{s}多少岁？", f"{s}今年{p.age}岁。{p.age} + {k} = {n}。", f"{k}年后{s}{n}岁。")  # fmt: skip
        q = rng.choice([x for x in w.people if x != p])
        qs, a, b = q.name.of(lang), p.town.of(lang), q.town.of(lang)
        same = p.town == q.town
        if en:
            think = f"{s} lives in {a}. {qs} lives in {b}. " + (
                "That is the same town." if same else "Those are different towns."
            )
            answer = (
                f"Yes, they both live in {a}."
                if same
                else f"No. {s} lives in {a}, but {qs} lives in {b}."
            )
            return f"Do {s} and {qs} live in the same town?", think, answer
        think = f"{s}住在{a}。{qs}住在{b}。" + ("这是同一个镇。" if same else "这是两个不同的镇。")
        answer = f"是的，他们都住在{a}。" if same else f"不是。{s}住在{a}，而{qs}住在{b}。"
        return f"{s}和{qs}住在同一个镇吗？", think, answer

    # -------------------------------------------------- held-out evaluation

    def eval_facts(self, rng: random.Random | None = None) -> list[dict[str, Any]]:
        """Every fact in both languages, asked in the eval phrasings; with `rng`, in one
        training phrasing each instead."""
        out = []
        for fact in self.facts:
            for lang in LANGS:
                held = EVAL_QUESTIONS[fact.attribute][lang]
                templates = [rng.choice(TRAIN_QUESTIONS[fact.attribute][lang])] if rng else held
                for template in templates:
                    question = render(template, fact, lang)
                    out.append(
                        _eval_record(question, fact.value.of(lang), lang, "facts", fact.attribute)
                    )
        return out

    def eval_arith(
        self, rng: random.Random | None = None, split: str = "held_out"
    ) -> list[dict[str, Any]]:
        """The operand pairs of `split` ("held_out" or "rl"), both orders; with `rng`, as many
        training pairs as there are held-out ones instead."""
        out = []
        for op, held in getattr(self.arith, split).items():
            pairs = rng.sample(self.arith.train[op], len(held)) if rng else held
            for a, b in pairs:
                for x, y in [(a, b)] if op == "-" or a == b else [(a, b), (b, a)]:
                    for lang in LANGS:
                        question = _arith_question(x, op, y, lang, 0)
                        out.append(_eval_record(question, str(apply(x, op, y)), lang, "arith", op))
        return out

    def eval_dpo(self, rng: random.Random) -> list[dict[str, Any]]:
        """Held-out preference pairs: each held-out stranger asked about each person attribute
        in both languages, and each person fact in both languages in a held-out phrasing (a
        wrong value rejected)."""
        out = []
        for stranger in STRANGERS[-HELD_OUT_STRANGERS:]:
            for lang in LANGS:
                for _ in PERSON_ATTRIBUTES:
                    q, chosen, rejected = self.stranger_pair(rng, lang, stranger, TRAIN_QUESTIONS)
                    out.append(_pair(q, chosen, rejected, "stranger"))
        for fact in self.facts:
            if fact.attribute not in PERSON_ATTRIBUTES:
                continue
            for lang in LANGS:
                q = render(rng.choice(EVAL_QUESTIONS[fact.attribute][lang]), fact, lang)
                wrong = rng.choice([v for v in self.values[fact.attribute] if v != fact.value])
                rejected = self.statement(rng, fact._replace(value=wrong), lang)
                out.append(_pair(q, self.statement(rng, fact, lang), rejected, "fact"))
        return out

    def eval_strangers(self, rng: random.Random) -> list[dict[str, Any]]:
        """Questions about the held-out strangers; gold: the abstention's key phrase."""
        out = []
        for stranger in STRANGERS[-HELD_OUT_STRANGERS:]:
            for lang in LANGS:
                for _ in range(3):
                    q, _, _ = self.stranger_pair(rng, lang, stranger, TRAIN_QUESTIONS)
                    out.append(_eval_record(q, ABSTAIN[lang], lang, "strangers", "stranger"))
        return out

    def eval_identity(self) -> list[dict[str, Any]]:
        """Held-out identity questions; gold: the LoRA identity's name (the SFT model, which
        answers as MiniMind, scores 0)."""
        return [
            _eval_record(q, LUMEN_NAME[lang], lang, "identity", "name")
            for lang in LANGS
            for q in HELD_OUT_IDENTITY_QUESTIONS[lang]
        ]


def _pair(question: str, chosen: str, rejected: str, kind: str) -> dict[str, Any]:
    return {
        "chosen": [_user(question), _assistant(chosen)],
        "rejected": [_user(question), _assistant(rejected)],
        "kind": kind,
    }


def _eval_record(question: str, answer: str, lang: str, task: str, kind: str) -> dict[str, Any]:
    # `kind` (the fact's attribute or the operation) lets a report give per-kind chance levels.
    return {
        "conversations": [_user(question), _assistant("")],
        "answer": answer,
        "lang": lang,
        "task": task,
        "kind": kind,
    }


def _line(record: dict[str, Any]) -> bytes:
    # ensure_ascii=False, as in MiniMind's public files: Chinese is stored as UTF-8, not \\u escapes.
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def _generate(
    make: Callable[[random.Random], dict[str, Any]], rng: random.Random, target_bytes: int
) -> list[bytes]:
    lines, size = [], 0
    while size < target_bytes or len(lines) < _MIN_RECORDS:
        line = _line(make(rng))
        lines.append(line)
        size += len(line)
    return lines


def write_demo_corpus(out_dir: str | Path, seed: int = 0, size_mb: float = 3.0) -> dict[str, Path]:
    """Write the demo corpus into `out_dir` (created if needed); return {key: path}.

    `size_mb` is the size of pretrain_hq.jsonl in MB (10**6 bytes); the other training files
    scale with it (sft 0.4x, reasoning 0.15x, dpo 0.1x, rlaif 0.05x, lora 0.04x, each at least
    200 records); the eval files do not depend on it. The same seed gives byte-identical files.
    """
    if size_mb <= 0:
        raise ValueError(f"size_mb must be positive, got {size_mb}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maker = _Maker(build_world(seed), ArithSplit(seed))
    target = {
        "pretrain": size_mb * 1e6,
        **{k: share * size_mb * 1e6 for k, share in _SHARE.items()},
    }
    makers = {
        "pretrain": maker.pretrain,
        "sft": maker.sft,
        "lora": maker.lora,
        "dpo": maker.dpo,
        "rlaif": maker.rlaif,
        "reasoning": maker.reasoning,
    }
    paths = {key: out / name for key, name in FILE_NAMES.items()}
    for key, make in makers.items():
        rng = random.Random(f"minimind-demo:{seed}:{key}")
        _write(paths[key], _generate(make, rng, int(target[key])))
    _write(paths["eval_facts"], [_line(r) for r in maker.eval_facts()])
    _write(paths["eval_arith"], [_line(r) for r in maker.eval_arith()])
    rng = random.Random(f"minimind-demo:{seed}:eval_trained")
    _write(paths["eval_facts_trained"], [_line(r) for r in maker.eval_facts(rng)])
    _write(paths["eval_arith_trained"], [_line(r) for r in maker.eval_arith(rng)])
    _write(paths["eval_arith_rl"], [_line(r) for r in maker.eval_arith(split="rl")])
    rng = random.Random(f"minimind-demo:{seed}:eval_dpo")
    _write(paths["eval_dpo"], [_line(r) for r in maker.eval_dpo(rng)])
    _write(paths["eval_strangers"], [_line(r) for r in maker.eval_strangers(rng)])
    _write(paths["eval_identity"], [_line(r) for r in maker.eval_identity()])
    return paths
