"""The embedded default task: one family of word problems, System 1 short and System 2 long.

Every item is a little story about one person's count of things, changed by a chain of events, each event one
arithmetic step and introduced by its ordinal ("Ana has 7 shells. First, Ana buys 5 more. Second, Ana gives 3
to Ben. How many shells does Ana have now?"). The reference answer works one line per event, restating it
(`First, Ana buys 5 more: 7+5=12.`), and ends in `#### N`, GSM8K's final line, so both the `####` extraction
after SFT and the `<answer>` extraction after RL (reasoning template) grade it. System 1 needs one or two
steps, System 2 three or more (`SyntheticArgs.s1_steps` / `s2_steps`): the way LoRA-PAR splits GSM8K, from one
family, so SFT on System 1 transfers in part to System 2 (same events, same step lines, only longer chains)
and GRPO on System 2 finds a correct completion among its samples often enough to learn from.
Rows are GSM8K jsonl (`question`, `answer`) plus `system` (the ground truth, 1 or 2), `steps` and
`kind`.

The pretraining corpus holds the arithmetic of every step (tables of `a+b=c` facts over the task's
range) and stories of the same family told as narratives followed by their step lines, some ending in
`#### N`, but never in the question/answer form. A model pretrained on it can compute a step and
knows the answer marker but has never answered a question, so fine-tuning (SFT, GRPO) has to teach
it that. (A marker never seen in pretraining stays improbable after LoRA SFT, which cannot move the
output layer.) Test questions are held out of the training split, and no corpus story tells the
premises of a train or test item.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

from lorapar.config import field
from lorapar.io import atomic_write_text

PEOPLE = (
    "Ana",
    "Ben",
    "Cleo",
    "Dev",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivo",
    "Jun",
    "Kai",
    "Lia",
    "Max",
    "Nia",
    "Omar",
    "Pia",
    "Rui",
    "Sam",
    "Tess",
    "Uma",
    "Vik",
    "Wen",
    "Yan",
    "Zed",
)
ITEMS = ("apples", "shells", "marbles", "stamps", "pencils", "cards", "beads", "books", "eggs", "kites")

# Markers that end or frame an answer (GSM8K's final line, LoRA-PAR's GRPO format): one piece each.
ANSWER_MARKERS = ["####", "<reasoning>", "</reasoning>", "<answer>", "</answer>"]

# Event phrasings, {a} the person, {b} another, {n} the operand, {item} the things. Each is one step.
EVENTS = {
    "+": ("{a} buys {n} more.", "{b} gives {a} {n} more.", "{a} finds {n} more."),
    "-": ("{a} gives {n} to {b}.", "{a} loses {n}.", "{a} sells {n}."),
    "*": ("{a} doubles them.", "{a} triples them."),  # n is 2 or 3, in the word
}
ORDINALS = ("First", "Second", "Third", "Fourth", "Fifth", "Sixth")  # one per event, in order
MAX_COUNT = 40  # every count of every story stays in 1..MAX_COUNT: a step table small enough to memorise


@dataclass
class SyntheticArgs:
    seed: int = field(default=0, metadata={"help": "seed of the splits and the corpus"})
    n_train: int = field(default=2000, metadata={"help": "training items (half System 1, half System 2)"})
    n_test: int = field(default=1000, metadata={"help": "test items (half System 1, half System 2)"})
    s1_steps: tuple[int, ...] = field(default=(1, 2), metadata={"help": "steps of a System-1 item"})
    s2_steps: tuple[int, ...] = field(default=(3, 4), metadata={"help": "steps of a System-2 item"})
    n_stories: int = field(default=12000, metadata={"help": "corpus stories that compute step by step"})
    n_table_docs: int = field(default=3000, metadata={"help": "corpus paragraphs of single-step facts"})
    marker_fraction: float = field(default=0.3, metadata={"help": "corpus stories that end with '#### N'"})

    def __post_init__(self) -> None:
        self.s1_steps, self.s2_steps = tuple(self.s1_steps), tuple(self.s2_steps)
        if not self.s1_steps or not self.s2_steps or max(self.s1_steps) >= min(self.s2_steps) or min(self.s1_steps) < 1:
            raise ValueError(
                f"SyntheticArgs: System-1 steps {self.s1_steps} must be >= 1 and all fewer than "
                f"System-2 steps {self.s2_steps}"
            )
        if max(self.s2_steps) + 1 > len(ORDINALS):  # the corpus tells stories one step longer
            raise ValueError(f"SyntheticArgs: System-2 steps {self.s2_steps} exceed {len(ORDINALS) - 1}")


# ----------------------------------------------------------------------------- one problem

Story = tuple[str, str, list[str], int]  # (premises, question, step lines, final count)


def apply_step(x: int, op: str, n: int) -> int:
    return x + n if op == "+" else x - n if op == "-" else x * n


def draw_story(rng: random.Random, n_steps: int) -> Story:
    """A start count and n_steps events, each leaving the count in 1..MAX_COUNT."""
    if not 1 <= n_steps <= len(ORDINALS):
        raise ValueError(f"a story takes 1 to {len(ORDINALS)} steps, not {n_steps}")
    a, b = rng.sample(PEOPLE, 2)
    item, x = rng.choice(ITEMS), rng.randint(2, 15)
    sentences, steps = [f"{a} has {x} {item}."], []
    for k in range(n_steps):
        choices = [op for op in "+-*" if _operands(op, x)]
        op = rng.choice(choices)
        n = rng.choice(_operands(op, x))
        phrasing = EVENTS[op][n - 2] if op == "*" else rng.choice(EVENTS[op])
        y = apply_step(x, op, n)
        event = f"{ORDINALS[k]}, {phrasing.format(a=a, b=b, n=n, item=item)}"
        sentences.append(event)
        # The k-th line restates the k-th event, then computes it. The ordinal makes each event findable
        # by one unique word (every event also starts with the person's name, which a tiny model cannot
        # tell apart: without ordinals the SFT'd model wrote one line for most multi-step items).
        steps.append(f"{event[:-1]}: {x}{op}{n}={y}.")
        x = y
    return " ".join(sentences), f"How many {item} does {a} have now?", steps, x


def _operands(op: str, x: int) -> list[int]:
    """The operands an event may use at count x (the result stays in 1..MAX_COUNT)."""
    if op == "+":
        return [n for n in range(1, 10) if x + n <= MAX_COUNT]
    if op == "-":
        return [n for n in range(1, 10) if x - n >= 1]
    return [n for n in (2, 3) if x * n <= MAX_COUNT]


def story_item(story: Story, system: int) -> dict:
    premises, question, steps, final = story
    return dict(
        question=f"{premises} {question}",
        answer="\n".join(steps) + f"\n#### {final}",
        system=system,
        steps=len(steps),
        kind=f"{len(steps)}-step",
    )


def single_steps() -> list[tuple[int, str, int]]:
    """Every step a story can take: (x, op, n) with x and the result in 1..MAX_COUNT."""
    return [(x, op, n) for x in range(1, MAX_COUNT + 1) for op in "+-*" for n in _operands(op, x)]


# ----------------------------------------------------------------------------- splits and corpus


def make_splits(args: SyntheticArgs) -> tuple[list[dict], list[dict]]:
    """(train, test) rows; each half System 1, half System 2, step counts spread evenly over each
    system's range; no question appears twice, in either split."""
    rng = random.Random(f"splits-{args.seed}")
    seen: set[str] = set()

    def draw(n: int, steps: tuple[int, ...], system: int) -> list[dict]:
        rows: list[dict] = []
        for attempt in range(100 * n + 100):
            if len(rows) == n:
                return rows
            row = story_item(draw_story(rng, steps[len(rows) % len(steps)]), system)
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
        raise ValueError(f"SyntheticArgs: could not draw {n} distinct {steps}-step items")

    test = draw(args.n_test // 2, args.s1_steps, 1) + draw(args.n_test - args.n_test // 2, args.s2_steps, 2)
    train = draw(args.n_train // 2, args.s1_steps, 1) + draw(args.n_train - args.n_train // 2, args.s2_steps, 2)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def make_corpus(args: SyntheticArgs, exclude_questions: set[str]) -> list[str]:
    """Pretraining documents: step tables and stories with their step lines, never as Q/A.

    Stories run from one step to one more than the longest System-2 item, so pretraining has seen
    long chains; the task's question/answer form is what fine-tuning adds. Stories whose premises
    are those of a task question (in `exclude_questions`) are redrawn, so the corpus never tells
    the solution of a train or test item.
    """
    rng = random.Random(f"corpus-{args.seed}")
    # Step tables: every step in turn, in a fresh order each round, so each appears about equally often.
    table: list[tuple[int, str, int]] = []
    while len(table) < 8 * args.n_table_docs:
        round_ = single_steps()
        rng.shuffle(round_)
        table += round_
    docs = [
        " ".join(f"{x}{op}{n}={apply_step(x, op, n)}" for x, op, n in table[8 * k : 8 * k + 8])
        for k in range(args.n_table_docs)
    ]
    prefixes = {q.rsplit(". ", 1)[0] + "." for q in exclude_questions}  # the premises of task items
    lengths = range(1, max(args.s2_steps) + 2)
    stories = 0
    while stories < args.n_stories:
        premises, _, steps, final = draw_story(rng, rng.choice(lengths))
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
            input=lines,
            model_prefix=os.path.join(work, "sp"),
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            add_dummy_prefix=False,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            user_defined_symbols=ANSWER_MARKERS,
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
