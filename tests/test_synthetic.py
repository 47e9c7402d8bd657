"""The embedded default task: determinism, parseable answers, disjoint splits, steps per system (one
family: System 1 one or two steps, System 2 three or more), a working tokenizer, a pretraining run
that learns, and resumable asset building."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from lorapar.data import load_examples
from lorapar.pretrain import SCALES, PretrainArgs, build_default_assets, pretrain, token_stream
from lorapar.synthetic import (
    MAX_COUNT,
    ORDINALS,
    SyntheticArgs,
    apply_step,
    count_steps,
    make_corpus,
    make_splits,
    single_steps,
    train_tokenizer,
    write_task,
)
from lorapar.tokenizer import Tokenizer

SMALL = SyntheticArgs(n_train=200, n_test=40, n_stories=200, n_table_docs=50)


def test_generator_is_deterministic_given_a_seed():
    assert make_splits(SMALL) == make_splits(SMALL)
    assert make_splits(SMALL) != make_splits(dataclasses.replace(SMALL, seed=1))
    train, test = make_splits(SMALL)
    questions = {r["question"] for r in train + test}
    assert make_corpus(SMALL, questions) == make_corpus(SMALL, questions)


def test_splits_are_disjoint_balanced_and_every_answer_parses(tmp_path):
    paths = write_task(str(tmp_path), SMALL)
    train, test = load_examples(paths["train"], "gsm8k"), load_examples(paths["test"], "gsm8k")
    assert (len(train), len(test)) == (200, 40)
    assert not {e.question for e in train} & {e.question for e in test}
    assert len({e.question for e in train}) == len(train)
    for examples in (train, test):
        assert sum(e.system == 1 for e in examples) == len(examples) // 2
        for e in examples:
            assert e.final is not None and e.final.isdigit(), e.answer
            assert e.answer.endswith(f"#### {e.final}")


def test_system1_takes_one_or_two_steps_system2_three_or_more_and_every_step_is_right():
    train, test = make_splits(SMALL)
    for row in train + test:
        steps = count_steps(row["answer"])
        assert steps == row["steps"] and row["kind"] == f"{steps}-step"
        assert (steps in (1, 2)) if row["system"] == 1 else (steps in (3, 4)), row
        chain = _equations(row["answer"])
        assert len(chain) == steps, row
        start = int(row["question"].split(" has ", 1)[1].split(" ", 1)[0])
        for a, op, b, c in chain:  # each line continues from the previous line's result
            assert a == start and {"+": a + b, "-": a - b, "*": a * b}[op] == c and 1 <= c <= MAX_COUNT, row
            start = c
        lines = row["answer"].split("\n")[:-1]
        for k, line in enumerate(lines):  # the k-th line restates the question's k-th event, by its ordinal
            event = line.split(": ", 1)[0] + "."
            assert line.startswith(ORDINALS[k] + ", ") and f" {event} " in row["question"] + " ", row
        assert f"{ORDINALS[steps]}," not in row["question"]
        assert row["answer"].endswith(f"#### {start}")
    for system, lengths in ((1, {1, 2}), (2, {3, 4})):  # both lengths of each system are drawn
        assert {r["steps"] for r in train if r["system"] == system} == lengths


def test_steps_per_system_are_configurable_and_must_not_overlap():
    longer = dataclasses.replace(SMALL, s2_steps=(5,))
    assert {r["steps"] for r in make_splits(longer)[0] if r["system"] == 2} == {5}
    with pytest.raises(ValueError, match="fewer than"):
        SyntheticArgs(s1_steps=(1, 3), s2_steps=(3, 4))


def _equations(text):
    import re

    return [(int(a), op, int(b), int(c)) for a, op, b, c in re.findall(r"(\d+)([-+*])(\d+)=(\d+)", text)]


def test_corpus_teaches_the_steps_but_never_the_task_format():
    train, test = make_splits(SMALL)
    tables = dataclasses.replace(SMALL, n_table_docs=len(single_steps()) // 8 + 1)  # one round of every step
    corpus = make_corpus(tables, {r["question"] for r in train + test})
    text = "\n".join(corpus)
    assert "?" not in text and "Question" not in text and "Answer" not in text
    marked = [doc for doc in corpus if "####" in doc]
    assert marked and all(doc.count("####") == 1 and doc.split("\n")[-1].startswith("#### ") for doc in marked)
    for x, op, n in single_steps():  # every step a task item can take is in the corpus's tables
        assert f"{x}{op}{n}={apply_step(x, op, n)}" in text
    premises = {r["question"].rsplit(". ", 1)[0] + "." for r in train + test}
    assert not any(doc.split("\n")[0] in premises for doc in corpus)
    lengths = {len(doc.split("\n")) - ("####" in doc) - 1 for doc in corpus if " has " in doc.split("\n")[0]}
    assert lengths == {1, 2, 3, 4, 5}  # stories up to one step longer than the longest System-2 item


def test_tokenizer_training_is_deterministic_and_round_trips(tmp_path):
    docs = make_corpus(SMALL, set())
    first, second = tmp_path / "a.model", tmp_path / "b.model"
    train_tokenizer(docs, str(first), vocab_size=384)
    train_tokenizer(docs, str(second), vocab_size=384)
    tok, again = Tokenizer(first), Tokenizer(second)  # the files differ only in the temporary paths they record
    pieces = lambda t: [(t.sp.id_to_piece(i), t.sp.get_score(i)) for i in range(t.vocab_size)]  # noqa: E731
    assert pieces(tok) == pieces(again)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.sp.unk_id()) == (384, 1, 2, 0)
    text = "Ana has 12 shells.\nTogether they have 7+12=19 shells.\n#### 19 \u00e9"  # é: never seen, byte fallback
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.sp.unk_id() not in ids
    assert [tok.sp.id_to_piece(i) for i in tok.encode("1234")] == ["1", "2", "3", "4"]  # split digits
    assert [len(tok.encode(m)) for m in ("####", "<reasoning>", "</answer>")] == [1, 1, 1]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # its work directory is gone


def small_pretraining(tmp_path, **overrides) -> tuple[torch.Tensor, PretrainArgs]:
    """A token stream of the small corpus and a one-layer model's pretraining settings."""
    docs = make_corpus(SMALL, set())
    train_tokenizer(docs, str(tmp_path / "t.model"), vocab_size=384)
    stream = token_stream(docs, Tokenizer(tmp_path / "t.model"))
    shape = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=384, seq_len=32)
    return stream, PretrainArgs(**shape, batch_size=8, lr=1e-2, **overrides)


def test_a_short_pretraining_run_lowers_the_loss(tmp_path):
    stream, args = small_pretraining(tmp_path, steps=30, warmup_steps=5)
    model, losses = pretrain(stream, args, progress=False)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # from ln(384) = 5.95 to about 3.2
    short = dataclasses.replace(args, steps=3)
    first, _ = pretrain(stream, short, progress=False)
    again, _ = pretrain(stream, short, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_data_parallel_pretraining_takes_the_one_process_steps(tmp_path):
    stream, args = small_pretraining(tmp_path, steps=6, warmup_steps=2, ranks=1)
    one, one_losses = pretrain(stream, args, progress=False)
    two, two_losses = pretrain(stream, dataclasses.replace(args, ranks=2), progress=False)
    # each rank takes half of the same windows and the gradients are averaged: the same steps up to rounding
    assert one_losses == pytest.approx(two_losses, rel=1e-5)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        pretrain(stream, dataclasses.replace(args, ranks=3), progress=False)


def test_build_default_assets_is_resumable(tmp_path, monkeypatch):
    task, train = SCALES["smoke"]
    tiny = PretrainArgs(
        dim=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        hidden_dim=64,
        vocab_size=train.vocab_size,
        seq_len=32,
        batch_size=4,
        steps=3,
        warmup_steps=1,
    )
    monkeypatch.setitem(SCALES, "smoke", (task, tiny))
    out = tmp_path / "assets"
    first = build_default_assets(str(out), "smoke", progress=False)
    from lorapar.checkpoint import load_model

    model = load_model(first["base"])
    assert model.args.vocab_size == Tokenizer(first["tokenizer"]).vocab_size
    assert len(load_examples(first["test"], "gsm8k")) == task.n_test
    stamp = os.path.getmtime(first["tokenizer"])
    os.remove(first["test"])  # an interrupted build: only the missing part is redone
    second = build_default_assets(str(out), "smoke", progress=False)
    assert second["seconds"]["pretrain"] == 0 and second["seconds"]["tokenizer"] == 0
    assert os.path.getmtime(first["tokenizer"]) == stamp and os.path.exists(first["test"])
    with pytest.raises(ValueError, match="assets.json"):
        build_default_assets(str(out), "smoke", seed=1, progress=False)
