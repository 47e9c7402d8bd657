"""The embedded default task: a seeded made-up world with System-1 and System-2 questions about it.

System 1 needs one step: recall one fact of the world ("How many moons does Zorvia have?") or do one
operation ("What is 7 plus 5?"). System 2 needs several: word problems whose reference answers show
each step, GSM8K style. Every answer of either system ends in `#### N` with N a non-negative integer
(facts are counts, never names), so the GSM8K scorer (`data.extract_gsm8k_number`) grades both.
Rows are GSM8K jsonl (`question`, `answer`) plus `system` (the ground truth, 1 or 2) and `kind`
(which generator made the item).

The pretraining corpus states every fact (in several phrasings), the tables of single operations and
short stories that compute step by step, some of them closing with GSM8K's `#### N` line, but never in
the task's question/answer form. A model pretrained on it knows the world, the arithmetic and the
answer marker but not how to answer a question, so it is weak on both systems and fine-tuning (SFT,
GRPO) can teach it. (A marker never seen in pretraining stays improbable after LoRA SFT, which cannot
move the output layer: measured, P(####) was 0.016 without marked stories and 0.999 with them, and
95% of temperature-1 samples were malformed, against 1%.) Test questions are held out of the training
split, and no corpus story repeats the premises of a task item.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

from lorapar.config import field
from lorapar.io import atomic_write_text

PEOPLE = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lia",
          "Max", "Nia", "Omar", "Pia", "Rui", "Sam", "Tess", "Uma", "Vik", "Wen", "Yan", "Zed")
ITEMS = ("apples", "shells", "marbles", "stamps", "pencils", "cards", "beads", "books", "eggs", "kites")
SYLLABLES = ("zor", "vi", "kel", "mar", "tu", "lo", "bren", "qua", "dis", "fen", "ra", "mo", "shi", "pex",
             "ul", "dar", "nim", "o", "gal", "tes")


@dataclass(frozen=True)
class Attribute:
    """A countable property of a planet: how to ask for it, how to state it, and what each unit holds."""

    name: str  # plural noun, e.g. "moons"
    unit: str  # singular, e.g. "moon"
    question: str  # System-1 question, {e} = planet
    statements: tuple[str, ...]  # phrasings of the fact, {e} planet, {n} count; the first one answers
    part: str  # what each unit holds, for System-2 questions ("craters" on each moon)
    low: int
    high: int


ATTRIBUTES = (
    Attribute("moons", "moon", "How many moons does {e} have?",
              ("{e} has {n} moons.", "The planet {e} has {n} moons.", "{n} moons circle {e}."), "craters", 1, 9),
    Attribute("cities", "city", "How many cities are on {e}?",
              ("There are {n} cities on {e}.", "{e} has {n} cities.", "On {e} you can find {n} cities."),
              "markets", 2, 19),
    Attribute("seas", "sea", "How many seas does {e} have?",
              ("{e} has {n} seas.", "There are {n} seas on {e}.", "The seas of {e} number {n}."), "islands", 1, 9),
    Attribute("mountains", "mountain", "How many mountains are on {e}?",
              ("There are {n} mountains on {e}.", "{e} has {n} mountains.", "{e} is home to {n} mountains."),
              "caves", 2, 19),
)

# Markers that end or frame an answer (GSM8K's final line, LoRA-PAR's GRPO format): one piece each.
ANSWER_MARKERS = ["####", "<reasoning>", "</reasoning>", "<answer>", "</answer>"]

OPERATIONS = {  # word -> (symbol, function); single operations of System 1 and the corpus tables
    "plus": ("+", lambda a, b: a + b),
    "minus": ("-", lambda a, b: a - b),
    "times": ("*", lambda a, b: a * b),
}


@dataclass
class SyntheticArgs:
    seed: int = field(default=0, metadata={"help": "seed of the world, the splits and the corpus"})
    n_planets: int = field(default=40, metadata={"help": "made-up planets; 4 counted facts each"})
    n_train: int = field(default=1000, metadata={"help": "training items (half System 1, half System 2)"})
    n_test: int = field(default=200, metadata={"help": "test items (half System 1, half System 2)"})
    fact_repeats: int = field(default=12, metadata={"help": "corpus paragraphs per planet (fresh phrasings)"})
    n_stories: int = field(default=6000, metadata={"help": "corpus stories that compute step by step"})
    n_table_docs: int = field(default=1500, metadata={"help": "corpus paragraphs of single-operation facts"})
    marker_fraction: float = field(default=0.3, metadata={"help": "corpus stories that end with '#### N'"})


# ----------------------------------------------------------------------------- the world


def make_world(seed: int, n_planets: int) -> dict[str, dict[str, int]]:
    """{planet: {attribute: count}} with distinct made-up two- or three-syllable names."""
    rng = random.Random(f"world-{seed}")
    names: list[str] = []
    while len(names) < n_planets:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in names and len(name) >= 4:
            names.append(name)
    return {name: {a.name: rng.randint(a.low, a.high) for a in ATTRIBUTES} for name in names}


def _attr(name: str) -> Attribute:
    return next(a for a in ATTRIBUTES if a.name == name)


# ----------------------------------------------------------------------------- System 1


def single_operations() -> list[tuple[int, str, int]]:
    """Every single operation System 1 asks about: sums and differences to 20, products to 9 x 9."""
    ops = [(a, "plus", b) for a in range(1, 21) for b in range(1, 21)]
    ops += [(a, "minus", b) for a in range(2, 21) for b in range(1, a)]
    ops += [(a, "times", b) for a in range(2, 10) for b in range(2, 10)]
    return ops


def operation_item(a: int, op: str, b: int) -> dict:
    symbol, fn = OPERATIONS[op]
    c = fn(a, b)
    return dict(question=f"What is {a} {op} {b}?", answer=f"{a}{symbol}{b}={c}\n#### {c}", system=1, kind="operation")


def fact_item(world: dict, planet: str, attribute: str) -> dict:
    attr, n = _attr(attribute), world[planet][attribute]
    answer = attr.statements[0].format(e=planet, n=n)
    return dict(question=attr.question.format(e=planet), answer=f"{answer}\n#### {n}", system=1, kind="fact")


# ----------------------------------------------------------------------------- System 2
# Each generator returns (premises, question, steps, final): premises are declarative sentences (the
# corpus tells them as a story followed by the steps), the question asks for `final`.

Story = tuple[str, str, list[str], int]


def _more_than(rng: random.Random, world: dict) -> Story:
    a, b = rng.sample(PEOPLE, 2)
    item, x, y = rng.choice(ITEMS), rng.randint(2, 30), rng.randint(2, 20)
    premises = f"{a} has {x} {item}. {b} has {y} more {item} than {a}."
    steps = [f"{b} has {x}+{y}={x + y} {item}.", f"Together they have {x}+{x + y}={2 * x + y} {item}."]
    return premises, f"How many {item} do {a} and {b} have together?", steps, 2 * x + y


def _packs(rng: random.Random, world: dict) -> Story:
    a, b = rng.sample(PEOPLE, 2)
    item, x, n, m = rng.choice(ITEMS), rng.randint(1, 20), rng.randint(2, 6), rng.randint(2, 9)
    g = rng.randint(1, x + n * m - 1)
    premises = f"{a} has {x} {item}. {a} buys {n} packs of {m} {item} and gives {g} {item} to {b}."
    steps = [f"The packs hold {n}*{m}={n * m} {item}.", f"{a} then has {x}+{n * m}={x + n * m} {item}.",
             f"After giving {g} away, {a} has {x + n * m}-{g}={x + n * m - g} {item}."]
    return premises, f"How many {item} does {a} have now?", steps, x + n * m - g


def _wages(rng: random.Random, world: dict) -> Story:
    a = rng.choice(PEOPLE)
    p, d = rng.randint(2, 9), rng.randint(2, 9)
    s = rng.randint(1, p * d - 1)
    premises = f"{a} earns {p} coins a day for {d} days and then spends {s} coins."
    steps = [f"{a} earns {p}*{d}={p * d} coins.", f"After spending, {a} has {p * d}-{s}={p * d - s} coins."]
    return premises, f"How many coins does {a} have left?", steps, p * d - s


def _parts(rng: random.Random, world: dict) -> Story:
    """Recall a fact, then compute with it: a one-step recall inside a two-step problem."""
    planet, attr, c = rng.choice(sorted(world)), rng.choice(ATTRIBUTES), rng.randint(2, 9)
    n = world[planet][attr.name]
    premises = f"Each {attr.unit} of {planet} has {c} {attr.part}."
    steps = [attr.statements[0].format(e=planet, n=n), f"So there are {n}*{c}={n * c} {attr.part}."]
    return premises, f"How many {attr.part} are there on the {attr.name} of {planet} in all?", steps, n * c


def _two_planets(rng: random.Random, world: dict) -> Story:
    """Recall two facts, then add them."""
    (p, q), attr = rng.sample(sorted(world), 2), rng.choice(ATTRIBUTES)
    x, y = world[p][attr.name], world[q][attr.name]
    f = attr.statements[0]
    premises = f"{p} and {q} are planets."
    steps = [f.format(e=p, n=x), f.format(e=q, n=y), f"Together they have {x}+{y}={x + y} {attr.name}."]
    return premises, f"How many {attr.name} do {p} and {q} have together?", steps, x + y


STORIES: tuple[Callable[[random.Random, dict], Story], ...] = (_more_than, _packs, _wages, _parts, _two_planets)


def story_item(story: Story) -> dict:
    premises, question, steps, final = story
    return dict(question=f"{premises} {question}", answer="\n".join(steps) + f"\n#### {final}", system=2, kind="steps")


# ----------------------------------------------------------------------------- splits and corpus


def make_splits(args: SyntheticArgs) -> tuple[list[dict], list[dict]]:
    """(train, test) rows; each half System 1, half System 2; no question appears in both."""
    rng = random.Random(f"splits-{args.seed}")
    world = make_world(args.seed, args.n_planets)
    facts = [fact_item(world, p, a.name) for p in world for a in ATTRIBUTES]
    operations = [operation_item(*op) for op in single_operations()]
    rng.shuffle(facts)
    rng.shuffle(operations)
    # System 1: test takes facts and operations in equal numbers; train gets what remains.
    s1_test_n, s1_train_n = args.n_test // 2, args.n_train // 2
    if len(facts) < s1_test_n // 2:
        raise ValueError(f"SyntheticArgs: n_test={args.n_test} needs {s1_test_n // 2} fact questions, the world "
                         f"has {len(facts)} (raise n_planets)")
    s1_test = facts[: s1_test_n // 2] + operations[: s1_test_n - s1_test_n // 2]
    rest = facts[s1_test_n // 2 :] + operations[s1_test_n - s1_test_n // 2 :]
    rng.shuffle(rest)
    if len(rest) < s1_train_n:
        raise ValueError(f"SyntheticArgs: n_train={args.n_train} needs {s1_train_n} System-1 items, "
                         f"only {len(rest)} remain after the test split (raise n_planets)")
    s1_train = rest[:s1_train_n]
    s2_test, s2_train = _unique_stories(rng, world, [args.n_test - s1_test_n, args.n_train - s1_train_n])
    train, test = s1_train + s2_train, s1_test + s2_test
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _unique_stories(rng: random.Random, world: dict, sizes: list[int]) -> list[list[dict]]:
    seen: set[str] = set()
    groups = []
    for size in sizes:
        group: list[dict] = []
        for _ in range(100 * size + 100):
            if len(group) == size:
                break
            row = story_item(rng.choice(STORIES)(rng, world))
            if row["question"] not in seen:
                seen.add(row["question"])
                group.append(row)
        if len(group) < size:
            raise ValueError(f"could not draw {size} distinct System-2 items")
        groups.append(group)
    return groups


def make_corpus(args: SyntheticArgs, exclude_questions: set[str]) -> list[str]:
    """Pretraining documents: facts, operation tables and step-by-step stories, never as Q/A.

    Stories whose premises begin a task question (in `exclude_questions`) are redrawn, so the corpus
    never tells the solution of a train or test item.
    """
    rng = random.Random(f"corpus-{args.seed}")
    world = make_world(args.seed, args.n_planets)
    docs: list[str] = []
    for repeat in range(args.fact_repeats):  # cycling the phrasings: the answers' one comes first
        for planet in world:
            facts = [a.statements[repeat % len(a.statements)].format(e=planet, n=world[planet][a.name])
                     for a in ATTRIBUTES]
            rng.shuffle(facts)
            docs.append(f"{planet} is a planet." + "".join(rng.choice((" ", "\n")) + f for f in facts))
    operations = single_operations()
    for _ in range(args.n_table_docs):
        lines = []
        for a, op, b in rng.sample(operations, 6):
            symbol, fn = OPERATIONS[op]
            lines.append(f"{a} {op} {b} is {fn(a, b)}." if rng.random() < 0.5 else f"{a}{symbol}{b}={fn(a, b)}")
        docs.append(" ".join(lines))
    prefixes = {q.rsplit(". ", 1)[0] + "." for q in exclude_questions}  # the premises of System-2 items
    stories = 0
    while stories < args.n_stories:
        premises, _, steps, final = rng.choice(STORIES)(rng, world)
        if premises not in prefixes:
            marker = [f"#### {final}"] if rng.random() < args.marker_fraction else []
            docs.append("\n".join([premises, *steps, *marker]))
            stories += 1
    rng.shuffle(docs)
    return docs


def count_steps(answer: str) -> int:
    """Reasoning lines of a reference answer: every line before `#### N`."""
    return len(answer.split("####")[0].strip().splitlines())


# ----------------------------------------------------------------------------- files


def write_jsonl(path: str, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def write_task(out_dir: str, args: SyntheticArgs) -> dict[str, str]:
    """Write train.jsonl, test.jsonl and corpus.txt (documents separated by a blank line) into out_dir."""
    train, test = make_splits(args)
    corpus = make_corpus(args, {r["question"] for r in train + test})
    paths = {name: os.path.join(out_dir, name) for name in ("train.jsonl", "test.jsonl", "corpus.txt")}
    write_jsonl(paths["train.jsonl"], train)
    write_jsonl(paths["test.jsonl"], test)
    atomic_write_text(paths["corpus.txt"], "".join(d + "\n\n" for d in corpus))
    return {"train": paths["train.jsonl"], "test": paths["test.jsonl"], "corpus": paths["corpus.txt"]}


def train_tokenizer(texts: list[str], model_path: str, vocab_size: int = 1024) -> str:
    """Train a LLaMA-style SentencePiece BPE model on the lines of `texts` into model_path.

    LLaMA's special ids (unk 0, bos 1, eos 2, no pad), byte fallback so that no text is ever <unk>
    (a newline is the byte piece <0x0A>), and digits split one per piece so numbers share the
    arithmetic of their digits. No dummy prefix: a word after a newline, as in a multi-line answer,
    gets the same pieces as a word at the start of a training line. One thread makes the result
    identical from run to run; the model is written to a temporary directory first and moved into
    place, so an interrupted run leaves no half-written tokenizer.
    """
    import sentencepiece as spm

    work = tempfile.mkdtemp(prefix=".tokenizer.", dir=os.path.dirname(os.path.abspath(model_path)))
    try:
        lines = os.path.join(work, "lines.txt")
        with open(lines, "w", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for text in texts for line in text.splitlines() if line.strip())
        spm.SentencePieceTrainer.train(
            input=lines, model_prefix=os.path.join(work, "sp"), model_type="bpe", vocab_size=vocab_size,
            character_coverage=1.0, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, add_dummy_prefix=False,
            normalization_rule_name="identity", remove_extra_whitespaces=False, user_defined_symbols=ANSWER_MARKERS,
            minloglevel=2,
        )
        os.replace(os.path.join(work, "sp.model"), model_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return model_path


def read_corpus(path: str) -> list[str]:
    """The documents of a corpus.txt (separated by blank lines)."""
    with open(path, encoding="utf-8") as handle:
        return [doc.strip("\n") for doc in handle.read().split("\n\n") if doc.strip()]
