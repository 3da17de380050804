"""The small invented world behind the demo corpus: entities, facts, phrasings, arithmetic.

Owns: the bilingual vocabulary (12 people, 6 pets, 6 towns and their attribute values), the
seeded assignment of facts (`build_world`), the sentence and question templates, and the split
of small-number arithmetic into training and held-out operand pairs (`ArithSplit`).
Does not own: writing files or choosing the mix of records (demo.py).

Why it looks like this: a 2M-parameter model stores a fact only after hundreds of exposures
spread over many optimizer steps (bench/RESULTS.md, "The demo recipe"). So the world is
small (24 entities, 96 facts, each in English and Chinese), and every fact is stated in several
phrasings that between them contain every relation word a question may use ("occupation",
"home town", "prefers", ...). Generalisation is measured on two held-out axes:
- facts are asked in eval with `EVAL_QUESTIONS`, templates that share no phrasing with
  `TRAIN_QUESTIONS` or with any training text;
- arithmetic in eval uses operand pairs that no training text contains, in either order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

LANGS = ("en", "zh")


class Word(NamedTuple):
    """A name or value in both languages."""

    en: str
    zh: str

    def of(self, lang: str) -> str:
        """
        >>> Word("cat", "猫").of("zh")
        '猫'
        """
        return self.en if lang == "en" else self.zh


# (English, Chinese, is female). Names are transliterated so both languages share the entity.
PEOPLE = (
    ("Mira", "米拉", True), ("Tomas", "托马斯", False), ("Lena", "莉娜", True),
    ("Otto", "奥托", False), ("Nina", "妮娜", True), ("Felix", "费利克斯", False),
    ("Rosa", "罗莎", True), ("Ivan", "伊万", False), ("Clara", "克拉拉", True),
    ("Hugo", "雨果", False), ("Ada", "艾达", True), ("Leo", "里奥", False),
)  # fmt: skip
# People who are NOT in the world: DPO teaches the model to say it does not know them. Their
# names are two syllables from these (English, Chinese) pairs, none of which any name of the
# world uses, so "a name I was never told about" is something the model can learn in general
# from the dpo.jsonl strangers, and be tested on the HELD_OUT_STRANGERS that no file but the
# evals names.
_SYLLABLES = (
    ("Ba", "巴"), ("Do", "多"), ("Ki", "基"), ("Lu", "卢"), ("Ne", "内"), ("Po", "波"),
    ("Sa", "萨"), ("Te", "特"), ("Vo", "沃"), ("Zu", "祖"), ("Ge", "格"), ("Fa", "法"),
    ("Ho", "霍"), ("Ju", "朱"), ("Wi", "维"), ("Ye", "叶"),
)  # fmt: skip
HELD_OUT_STRANGERS = 16


def strangers() -> tuple[Word, ...]:
    """Every stranger name, in a fixed shuffled order; the last HELD_OUT_STRANGERS are only in
    the held-out evals.

    >>> names = strangers()
    >>> len(names), names[0] != names[1], all(len(n.zh) == 2 for n in names)
    (238, True, True)
    """
    # No stranger may contain, or be contained in, a word of the world ("Doge" holds "dog").
    world = [w.lower() for p in PEOPLE for w in p[:2]] + [
        x.lower() for group in (TOWNS, PETS, JOBS, SPECIES, FOODS, COLOURS, PRODUCTS)
        for word in group for x in word
    ]  # fmt: skip
    pairs = [(a, b) for a in _SYLLABLES for b in _SYLLABLES if a != b]
    names = [Word(a[0] + b[0].lower(), a[1] + b[1]) for a, b in pairs]
    names = [
        n for n in names if not any(x.lower() in w or w in x.lower() for x in n for w in world)
    ]
    random.Random("minimind-demo-strangers").shuffle(names)
    return tuple(names)


TOWNS = (
    Word("Pinevale", "松谷镇"), Word("Stonebridge", "石桥镇"), Word("Riverbend", "河湾镇"),
    Word("Maplefield", "枫田镇"), Word("Cloudhill", "云山镇"), Word("Sandport", "沙港镇"),
)  # fmt: skip
PETS = (
    Word("Pip", "皮普"), Word("Biscuit", "饼干"), Word("Shadow", "影子"), Word("Coco", "可可"),
    Word("Pepper", "胡椒"), Word("Mochi", "麻薯"),
)  # fmt: skip
# Jobs and species all start with a consonant, so English templates can say "a {v}".
JOBS = (
    Word("baker", "面包师"), Word("teacher", "老师"), Word("fisher", "渔夫"),
    Word("doctor", "医生"), Word("farmer", "农民"), Word("painter", "画家"),
    Word("carpenter", "木匠"), Word("librarian", "图书管理员"), Word("potter", "陶艺师"),
    Word("gardener", "园丁"), Word("tailor", "裁缝"), Word("beekeeper", "养蜂人"),
)  # fmt: skip
SPECIES = (
    Word("cat", "猫"), Word("dog", "狗"), Word("rabbit", "兔子"), Word("parrot", "鹦鹉"),
    Word("goat", "山羊"), Word("turtle", "乌龟"), Word("duck", "鸭子"), Word("hamster", "仓鼠"),
)  # fmt: skip
FOODS = (
    Word("apples", "苹果"), Word("noodles", "面条"), Word("dumplings", "饺子"),
    Word("fish soup", "鱼汤"), Word("rice cakes", "年糕"), Word("honey bread", "蜂蜜面包"),
    Word("mushroom stew", "蘑菇炖菜"), Word("plum jam", "李子酱"), Word("corn pancakes", "玉米饼"),
    Word("pumpkin pie", "南瓜派"),
)  # fmt: skip
COLOURS = (
    Word("red", "红色"), Word("blue", "蓝色"), Word("green", "绿色"), Word("yellow", "黄色"),
    Word("purple", "紫色"), Word("white", "白色"), Word("orange", "橙色"), Word("grey", "灰色"),
)  # fmt: skip
PRODUCTS = (
    Word("apples", "苹果"), Word("tea", "茶叶"), Word("pottery", "陶器"), Word("salted fish", "咸鱼"),
    Word("silk", "丝绸"), Word("cheese", "奶酪"), Word("honey", "蜂蜜"), Word("sea salt", "海盐"),
)  # fmt: skip


STRANGERS = strangers()


@dataclass(frozen=True)
class Person:
    name: Word
    female: bool
    age: int
    town: Word
    job: Word
    food: Word
    colour: Word
    friend: Word


@dataclass(frozen=True)
class Pet:
    name: Word
    species: Word
    colour: Word
    owner: Word


@dataclass(frozen=True)
class Town:
    name: Word
    product: Word


class Fact(NamedTuple):
    """`subject`'s `attribute` is `value`; the gold answer to a question is `value.of(lang)`."""

    subject: Word
    attribute: str
    value: Word


@dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    pets: tuple[Pet, ...]
    towns: tuple[Town, ...]

    @property
    def facts(self) -> list[Fact]:
        out = []
        for p in self.people:
            age = Word(str(p.age), str(p.age))
            for attr, value in (("job", p.job), ("age", age), ("town", p.town)):
                out.append(Fact(p.name, attr, value))
            for attr, value in (("food", p.food), ("colour", p.colour), ("friend", p.friend)):
                out.append(Fact(p.name, attr, value))
        for pet in self.pets:
            out.append(Fact(pet.name, "species", pet.species))
            out.append(Fact(pet.name, "owner", pet.owner))
            out.append(Fact(pet.name, "pet_colour", pet.colour))
        out.extend(Fact(t.name, "product", t.product) for t in self.towns)
        return out

    def person(self, name: Word) -> Person:
        return next(p for p in self.people if p.name == name)

    def town(self, name: Word) -> Town:
        return next(t for t in self.towns if t.name == name)

    def pet_of(self, owner: Word) -> Pet | None:
        return next((pet for pet in self.pets if pet.owner == owner), None)


def build_world(seed: int = 0) -> World:
    """Assign attributes to the fixed cast, reproducibly for a given seed.

    Friendship is symmetric (people are paired), each town has two residents, every job is
    held by one person, and half the people own one pet each.

    >>> w = build_world(0)
    >>> len(w.people), len(w.pets), len(w.towns), len(w.facts)
    (12, 6, 6, 96)
    >>> all(w.person(w.person(p.friend).friend) == p for p in w.people)
    True
    """
    rng = random.Random(f"minimind-demo-world:{seed}")
    names = [Word(en, zh) for en, zh, _ in PEOPLE]
    products = list(PRODUCTS)
    rng.shuffle(products)
    towns = tuple(Town(t, p) for t, p in zip(TOWNS, products))
    homes = [TOWNS[i % len(TOWNS)] for i in range(len(names))]
    jobs = [JOBS[i % len(JOBS)] for i in range(len(names))]
    rng.shuffle(homes)
    rng.shuffle(jobs)
    order = list(range(len(names)))
    rng.shuffle(order)
    friend = {}
    for a, b in zip(order[::2], order[1::2]):
        friend[a], friend[b] = b, a
    people = tuple(
        Person(
            name=names[i],
            female=PEOPLE[i][2],
            age=rng.randint(18, 70),
            town=homes[i],
            job=jobs[i],
            food=rng.choice(FOODS),
            colour=rng.choice(COLOURS),
            friend=names[friend[i]],
        )
        for i in range(len(names))
    )
    owners = rng.sample(range(len(names)), len(PETS))
    pets = tuple(
        Pet(name, rng.choice(SPECIES), rng.choice(COLOURS), names[owner])
        for name, owner in zip(PETS, owners)
    )
    return World(people, pets, towns)


# Templates take {s} (the subject) and {v} (the value). STATEMENTS feed pretraining and the
# answers of every chat file; TRAIN_QUESTIONS ask in sft, dpo, rlaif and lora; EVAL_QUESTIONS
# are used only by eval_facts.jsonl and must share no phrasing with anything in training.
STATEMENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "job": {
        "en": ("{s} is a {v}.", "{s} works as a {v}.", "By trade, {s} is a {v}.",
               "{s}'s occupation is {v}.", "{s} earns a living as a {v}."),
        "zh": ("{s}是一名{v}。", "{s}的工作是{v}。", "{s}以当{v}为生。", "{s}的职业是{v}。",
               "{s}从事{v}这一行。"),
    },
    "age": {
        "en": ("{s} is {v} years old.", "{s} is {v} this year.", "The age of {s} is {v}."),
        "zh": ("{s}今年{v}岁。", "{s}已经{v}岁了。", "{s}的年龄是{v}岁。"),
    },
    "town": {
        "en": ("{s} lives in {v}.", "{s}'s home is in {v}.", "{s} comes from {v}.",
               "{s}'s home town is {v}."),
        "zh": ("{s}住在{v}。", "{s}的家在{v}。", "{s}来自{v}。", "{s}的家乡是{v}。"),
    },
    "food": {
        "en": ("{s}'s favourite food is {v}.", "{s} loves {v} more than any other food.",
               "The dish {s} enjoys eating most is {v}."),
        "zh": ("{s}最喜欢的食物是{v}。", "{s}最爱吃{v}。", "{s}最爱的菜是{v}。"),
    },
    "colour": {
        "en": ("{s}'s favourite colour is {v}.", "Of all colours, {s} likes {v} best.",
               "The colour {s} prefers is {v}."),
        "zh": ("{s}最喜欢的颜色是{v}。", "在所有颜色里，{s}最喜欢{v}。", "{s}偏爱{v}。"),
    },
    "friend": {
        "en": ("{s}'s best friend is {v}.", "{s} and {v} are best friends.",
               "{s} calls {v} a best friend."),
        "zh": ("{s}最好的朋友是{v}。", "{s}和{v}是最好的朋友。", "{s}的挚友是{v}。"),
    },
    "species": {
        "en": ("{s} is a {v}.", "{s} is a pet {v}.", "By species, {s} is a {v}."),
        "zh": ("{s}是一只{v}。", "{s}是一只宠物{v}。", "{s}这种动物是{v}。"),
    },
    "owner": {
        "en": ("{s} belongs to {v}.", "{v} is the owner of {s}.", "{s} is the pet of {v}."),
        "zh": ("{s}的主人是{v}。", "{v}养了{s}。", "{s}是{v}的宠物。"),
    },
    "pet_colour": {
        "en": ("{s} is {v}.", "The colour of {s} is {v}.", "{s} has {v} fur."),
        "zh": ("{s}是{v}的。", "{s}的颜色是{v}。", "{s}身上是{v}的。"),
    },
    "product": {
        "en": ("{s} is famous for its {v}.", "People go to {s} to buy {v}.",
               "{s} is known for its {v}."),
        "zh": ("{s}以{v}闻名。", "人们去{s}买{v}。", "{s}的特产是{v}。"),
    },
}  # fmt: skip
# Several phrasings per question, so SFT teaches "the relation word decides the answer", not
# one template; the eval phrasings below use relation words that only the statements contain.
TRAIN_QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "job": {
        "en": ("What is {s}'s job?", "What does {s} do for a living?", "What is {s}'s trade?",
               "What work does {s} do?"),
        "zh": ("{s}的工作是什么？", "{s}是做什么工作的？", "{s}靠什么为生？", "{s}做哪一行？"),
    },
    "age": {
        "en": ("How old is {s}?", "What age is {s}?", "How many years old is {s}?"),
        "zh": ("{s}多大了？", "{s}今年几岁？", "{s}今年多少岁？"),
    },
    "town": {
        "en": ("Where does {s} live?", "Which town is {s} from?", "Where is the home of {s}?"),
        "zh": ("{s}住在哪里？", "{s}来自哪个镇？", "{s}的家在哪里？"),
    },
    "food": {
        "en": ("What is {s}'s favourite food?", "What food does {s} love most?",
               "What does {s} like to eat best?"),
        "zh": ("{s}最喜欢的食物是什么？", "{s}最爱吃什么？", "{s}最喜欢吃什么？"),
    },
    "colour": {
        "en": ("What is {s}'s favourite colour?", "Which colour does {s} like best?",
               "What colour does {s} love most?"),
        "zh": ("{s}最喜欢的颜色是什么？", "{s}最喜欢什么颜色？", "{s}最爱什么颜色？"),
    },
    "friend": {
        "en": ("Who is {s}'s best friend?", "Who is the best friend of {s}?",
               "Who is {s} best friends with?"),
        "zh": ("{s}最好的朋友是谁？", "谁是{s}最好的朋友？", "{s}和谁是最好的朋友？"),
    },
    "species": {
        "en": ("What kind of animal is {s}?", "What animal is {s}?", "What sort of pet is {s}?"),
        "zh": ("{s}是什么动物？", "{s}是哪种动物？", "{s}是一只什么宠物？"),
    },
    "owner": {
        "en": ("Who owns {s}?", "Who is the owner of {s}?", "Which person owns {s}?"),
        "zh": ("{s}的主人是谁？", "谁养了{s}？", "{s}是谁养的？"),
    },
    "pet_colour": {
        "en": ("What colour is {s}?", "What is the colour of {s}?"),
        "zh": ("{s}是什么颜色的？", "{s}的颜色是什么？"),
    },
    "product": {
        "en": ("What is {s} famous for?", "What do people buy in {s}?"),
        "zh": ("{s}以什么闻名？", "人们去{s}买什么？"),
    },
}  # fmt: skip
EVAL_QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "job": {"en": ("Could you tell me {s}'s occupation?",), "zh": ("{s}从事什么职业？",)},
    "age": {"en": ("Tell me the age of {s}.",), "zh": ("{s}的年龄是多少？",)},
    "town": {"en": ("In which town is {s}'s home?",), "zh": ("{s}的家乡是哪个镇？",)},
    "food": {"en": ("Which dish does {s} enjoy eating most?",), "zh": ("{s}最爱的菜是哪一道？",)},
    "colour": {"en": ("Name the colour that {s} prefers.",), "zh": ("{s}偏爱哪种颜色？",)},
    "friend": {"en": ("Who does {s} call a best friend?",), "zh": ("{s}的挚友叫什么名字？",)},
    "species": {"en": ("To which species does {s} belong?",), "zh": ("{s}属于哪一种动物？",)},
    "owner": {"en": ("Whose pet is {s}?",), "zh": ("{s}是谁的宠物？",)},
    "pet_colour": {"en": ("Describe the colour of {s}.",), "zh": ("{s}身上是什么颜色？",)},
    "product": {"en": ("Which goods is {s} known for?",), "zh": ("{s}的特产是什么？",)},
}


def render(template: str, fact: Fact, lang: str) -> str:
    """
    >>> render("{s} is a {v}.", Fact(Word("Pip", "皮普"), "species", Word("cat", "猫")), "en")
    'Pip is a cat.'
    """
    return template.format(s=fact.subject.of(lang), v=fact.value.of(lang))


# ---------------------------------------------------------------- arithmetic

# op -> (Chinese, English word). The Chinese forms are what the held-out test searches for.
OPS = {"+": ("加", "plus"), "-": ("减", "minus"), "×": ("乘以", "times")}
_MAX_OPERAND = {"+": 20, "-": 20, "×": 10}


def apply(a: int, op: str, b: int) -> int:
    """
    >>> apply(7, "×", 6), apply(7, "-", 6)
    (42, 1)
    """
    return a + b if op == "+" else a - b if op == "-" else a * b


def equation(a: int, op: str, b: int, lang: str, *, words: bool = False) -> str:
    """An equation without final punctuation.

    >>> equation(3, "+", 4, "en"), equation(3, "+", 4, "en", words=True), equation(3, "+", 4, "zh")
    ('3 + 4 = 7', '3 plus 4 equals 7', '3加4等于7')
    """
    c = apply(a, op, b)
    if lang == "zh":
        return f"{a}{OPS[op][0]}{b}等于{c}"
    return f"{a} {OPS[op][1]} {b} equals {c}" if words else f"{a} {op} {b} = {c}"


def worked(a: int, op: str, b: int, lang: str) -> str | None:
    """The column method for a + b and a - b (operands under 100), or None for ×.

    Every step is a one-digit fact or 10 - d, which ArithSplit never holds out, so the method
    reaches any pair, held out or not: the skill RL can amplify (demo.py). The operands are
    restated as the question wrote them: a copy of a token sequence, which a 2M model gets
    right far more often than a restatement padded to two digits, with which it copied the
    wrong operand (bench/RESULTS.md, "The stages after SFT", section 6). The answer is composed
    from the tens result and the ones digit rather than restated as `a op b = c`, which a small
    model answers from its memorised table instead of from the columns.

    >>> worked(17, "+", 4, "en")
    'Columns 17 + 4: ones 7 + 4 = 11, carry 1, tens 1 + 0 + 1 = 2, answer 21.'
    >>> worked(13, "-", 5, "en")
    'Columns 13 - 5: ones 3 < 5, 10 - 5 = 5, 5 + 3 = 8, borrow 1, tens 1 - 0 - 1 = 0, answer 8.'
    >>> worked(17, "-", 4, "zh")
    '列竖式17减4：个位7减4等于3，借0，十位1减0减0等于1，答案13。'
    """
    if op == "×":
        return None
    w = _COLUMN_WORDS[lang]
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    sign = w["plus"] if op == "+" else w["minus"]
    if op == "+":
        carry = (a0 + b0) // 10
        ones = [f"{a0}{sign}{b0}{w['eq']}{a0 + b0}"]
        move, tens = (
            w["carry"] + str(carry),
            f"{a1}{sign}{b1}{sign}{carry}{w['eq']}{a1 + b1 + carry}",
        )
    else:
        borrow = int(a0 < b0)
        x = 10 - b0
        ones = (
            [
                f"{a0}{w['less']}{b0}",
                f"10{sign}{b0}{w['eq']}{x}",
                f"{x}{w['plus']}{a0}{w['eq']}{x + a0}",
            ]
            if borrow
            else [f"{a0}{sign}{b0}{w['eq']}{a0 - b0}"]
        )
        move = w["borrow"] + str(borrow)
        tens = f"{a1}{sign}{b1}{sign}{borrow}{w['eq']}{a1 - b1 - borrow}"
    steps = [
        w["ones"] + ones[0],
        *ones[1:],
        move,
        w["tens"] + tens,
        w["answer"] + str(apply(a, op, b)),
    ]
    return f"{w['head']}{a}{sign}{b}{w['colon']}" + w["sep"].join(steps) + w["end"]


# the words of `worked`, per language
_COLUMN_WORDS = {
    "en": {"head": "Columns ", "colon": ": ", "ones": "ones ", "tens": "tens ", "carry": "carry ",
           "borrow": "borrow ", "answer": "answer ", "sep": ", ", "end": ".", "plus": " + ",
           "minus": " - ", "eq": " = ", "less": " < "},
    "zh": {"head": "列竖式", "colon": "：", "ones": "个位", "tens": "十位", "carry": "进",
           "borrow": "借", "answer": "答案", "sep": "，", "end": "。", "plus": "加", "minus": "减",
           "eq": "等于", "less": "小于"},
}  # fmt: skip


def _canonical(op: str, a: int, b: int) -> tuple[int, int]:
    # + and × are commutative: holding out (3, 5) must hold out "5 + 3" too.
    return (min(a, b), max(a, b)) if op != "-" else (a, b)


def _is_step(op: str, a: int, b: int) -> bool:
    # a canonical pair that the column method uses as a step (always trained)
    return (op == "+" and max(a, b) < 10) or (op == "-" and a <= 10)


class ArithSplit:
    """Small-number arithmetic split by operand pair into three sets: training (pretraining and
    SFT text), RL (only the prompts of the rlaif file: problems the SFT model has never seen
    solved, so RL has something to learn) and held out (only the eval file).

    Domains: a + b and a - b (b <= a) with operands 0..20, a × b with operands 0..10.
    Pairs outside a domain (larger numbers) are never held out, nor are the steps of the column
    method (`worked`): sums of two one-digit numbers and differences a - b with a <= 10, so
    held-out and RL sums have an operand of 10 or more and differences a first operand of 11+.

    >>> split = ArithSplit(seed=0)
    >>> a, b = split.held_out["+"][0]
    >>> split.allowed("+", a, b), split.allowed("+", b, a), split.allowed("+", 25, 3)
    (False, False, True)
    >>> c, d = split.rl["+"][0]
    >>> split.allowed("+", c, d), split.is_rl("+", d, c)
    (False, True)
    """

    def __init__(
        self, seed: int = 0, held_out_fraction: float = 0.1, rl_fraction: float = 0.1
    ) -> None:
        rng = random.Random(f"minimind-demo-arith:{seed}")
        self.train: dict[str, list[tuple[int, int]]] = {}
        self.held_out: dict[str, list[tuple[int, int]]] = {}
        self.rl: dict[str, list[tuple[int, int]]] = {}
        self.steps: dict[str, list[tuple[int, int]]] = {}
        for op, top in _MAX_OPERAND.items():
            pairs = [_canonical(op, a, b) for a in range(top + 1) for b in range(top + 1)]
            pairs = sorted(set(p for p in pairs if op != "-" or p[1] <= p[0]))
            steps = [p for p in pairs if _is_step(op, *p)]
            pairs = [p for p in pairs if not _is_step(op, *p)]
            rng.shuffle(pairs)
            k = round((len(pairs) + len(steps)) * held_out_fraction)
            r = k + round((len(pairs) + len(steps)) * rl_fraction)
            self.held_out[op], self.rl[op] = sorted(pairs[:k]), sorted(pairs[k:r])
            self.train[op] = sorted(pairs[r:] + steps)
            self.steps[op] = steps
        self._held = {(op, p) for op, pairs in self.held_out.items() for p in pairs}
        self._rl = {(op, p) for op, pairs in self.rl.items() for p in pairs}

    def allowed(self, op: str, a: int, b: int) -> bool:
        """Whether training text (pretraining, SFT) may contain `a op b`."""
        key = (op, _canonical(op, a, b))
        return key not in self._held and key not in self._rl

    def is_rl(self, op: str, a: int, b: int) -> bool:
        """Whether `a op b` is one of the RL pairs."""
        return (op, _canonical(op, a, b)) in self._rl

    def sample_rl(self, rng: random.Random, op: str) -> tuple[int, int]:
        """An RL pair, in a random order for commutative operations."""
        return _either_order(rng, op, rng.choice(self.rl[op]))

    def sample_step(self, rng: random.Random, op: str) -> tuple[int, int]:
        """A step of the column method (a one-digit sum or a difference from at most 10), in a
        random order for sums; for ×, which has no steps, any training pair."""
        return _either_order(rng, op, rng.choice(self.steps[op] or self.train[op]))

    def sample(self, rng: random.Random, op: str) -> tuple[int, int]:
        """A training pair, in a random order for commutative operations."""
        return _either_order(rng, op, rng.choice(self.train[op]))


def _either_order(rng: random.Random, op: str, pair: tuple[int, int]) -> tuple[int, int]:
    a, b = pair
    return (b, a) if op != "-" and rng.random() < 0.5 else (a, b)
