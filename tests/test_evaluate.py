"""Scoring on fixed outputs, MMLU on a planted answer, the HumanEval sandbox and pass@k."""

from __future__ import annotations

import gzip
import json
import math
import os
import time
import uuid

import pytest
import torch

from lorapar.answers import final_answer
from lorapar.data import Example
from lorapar.eval_tasks import decode_continuation, evaluate_gsm8k, evaluate_mmlu, score_gsm8k
from lorapar.evaluate import EvalArgs, run
from lorapar.humaneval_exec import pass_at_k, program_text, run_many, run_program, truncate_completion
from lorapar.tokenizer import Tokenizer


def gsm8k(final: str, system=None) -> Example:
    return Example("q", f"steps\n#### {final}", final, system, {}, "gsm8k")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5+7=12\n#### 12", "12"),
        ("#### 1,234", "1234"),
        ("so $1,234.00 in all\n#### $1,234.00", "1234"),
        ("#### 12.0\n\nQuestion: ... #### 99", "12"),  # the first answer counts, not what the model rambles on to
        ("#### -3.50", "-3.5"),
        ("<reasoning>\n4*3=12\n</reasoning>\n<answer>\n12\n</answer>\n", "12"),
        ("<reasoning>\n</reasoning>\n<answer>\n$7", "7"),  # cut off before the closing tag
        ("the answer is 12", None),  # malformed: no fallback to the last number
        ("####\nand 12 later", None),
        ("", None),
    ],
)
def test_final_answer(text, expected):
    assert final_answer(text) == expected


def test_score_gsm8k_right_wrong_malformed_and_by_system():
    examples = [gsm8k("12", 1), gsm8k("1234", 1), gsm8k("7", 2), gsm8k("5", 2)]
    outputs = ["#### 12", "It is\n#### 1,234.0", "#### 8", "I think 5"]
    result = score_gsm8k(examples, outputs)
    metrics = result["metrics"]
    assert (metrics["accuracy"], metrics["correct"], metrics["n"], metrics["malformed"]) == (0.5, 2, 4, 1)
    assert metrics["by_system"] == {
        "1": {"accuracy": 1.0, "correct": 2, "n": 2},
        "2": {"accuracy": 0.0, "correct": 0, "n": 2},
    }
    assert [r["correct"] for r in result["records"]] == [True, True, False, False]
    assert [r["prediction"] for r in result["records"]] == ["12", "1234", "8", None]


def test_score_gsm8k_under_the_authors_rules():
    """After SFT: the last "#### N" integer against the reference's; after RL: int() of the last answer
    tag against the reference's text after "####"; anything either rule cannot read is wrong."""
    examples = [gsm8k("12"), gsm8k("1234"), gsm8k("7"), gsm8k("5")]
    examples[1].answer = "steps\n#### 1,234"  # example.py reads the integer before the comma: 1
    sft = ["#### 11\nthen #### 12", "#### 1", "#### 7.5", "I think 5"]
    metrics = score_gsm8k(examples, sft, "last_hash")["metrics"]
    assert (metrics["correct"], metrics["malformed"], metrics["extraction"]) == (3, 1, "last_hash")
    rl = [
        "<answer>\n11\n</answer><answer>\n12\n</answer>",
        "<answer>\n1234\n</answer>",
        "<answer>\n7.0\n</answer>",
        "#### 5",
    ]
    result = score_gsm8k(examples, rl, "last_answer")
    assert [r["correct"] for r in result["records"]] == [True, True, False, False]
    assert [r["prediction"] for r in result["records"]] == ["12", "1234", None, None]
    with pytest.raises(ValueError, match="unknown extraction"):
        score_gsm8k(examples, rl, "first")


def test_evaluation_reads_the_template_and_stage_from_the_adapter_run_config(tmp_path):
    from lorapar.evaluate import resolve_text_format

    def resolved(config, **flags):
        adapter = tmp_path / f"a{len(list(tmp_path.iterdir()))}"
        adapter.mkdir()
        if config is not None:
            (adapter / "config.json").write_text(json.dumps(config))
        args = resolve_text_format(EvalArgs(adapter=str(adapter), **flags))
        return args.template, args.phase, args.extraction

    assert resolved({"SFTArgs": {"template": "lorapar"}}) == ("lorapar", "sft", "last_hash")
    assert resolved({"RLArgs": {"template": "lorapar"}}) == ("lorapar", "rl", "last_answer")
    assert resolved({"RLArgs": {"template": "reasoning"}}) == ("reasoning", "rl", "lenient")
    assert resolved(None) == ("plain", "sft", "lenient")
    assert resolved({"RLArgs": {"template": "lorapar"}}, extraction="lenient") == ("lorapar", "rl", "lenient")
    assert resolved({"SFTArgs": {"template": "lorapar"}}, template="chat") == ("chat", "sft", "lenient")
    assert resolved({"SFTArgs": {"template": "lorapar"}}, phase="rl") == ("lorapar", "rl", "last_answer")
    assert resolve_text_format(EvalArgs()).template == "plain"  # no adapter: the base model
    with pytest.raises(ValueError, match="template 'fancy' is not one of"):
        resolved({"SFTArgs": {"template": "fancy"}})


# ----------------------------------------------------------------------------- models and tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from lorapar.synthetic import SyntheticArgs, make_corpus, train_tokenizer

    docs = make_corpus(SyntheticArgs(n_train=40, n_test=10, n_stories=50, n_table_docs=20), set())
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return Tokenizer(train_tokenizer(docs + ["Question: Answer: A B C D"], str(path), vocab_size=384))


def planted_model(vocab_size: int, favourite: int, dim: int = 16):
    """A model whose every next-token distribution puts its mass on `favourite`, built from weights:
    zero residual blocks leave the normed embedding, every embedding shares a large first coordinate,
    and only the favourite's output row reads that coordinate."""
    from lorapar.config import ModelArgs
    from lorapar.model import Transformer

    model = Transformer(ModelArgs(dim=dim, n_layers=1, n_heads=2, vocab_size=vocab_size, hidden_dim=32))
    model.init_weights(seed=0)
    with torch.no_grad():
        for block in model.layers:
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight[:, 0] = 10.0
        model.output.weight.zero_()
        model.output.weight[favourite, 0] = 5.0
    return model.eval()


def test_mmlu_picks_the_planted_letter(tokenizer):
    question = "Which one?\nA. one\nB. two\nC. three\nD. four\nAnswer:"
    examples = [Example(question, gold, gold, None, {}, "mmlu") for gold in "CAC"]
    model = planted_model(tokenizer.vocab_size, tokenizer.encode("C")[0])
    result = evaluate_mmlu(model, tokenizer, examples, batch_size=2, progress=False)
    assert [r["prediction"] for r in result["records"]] == ["C", "C", "C"]
    assert result["metrics"]["correct"] == 2
    scores = result["records"][0]["scores"]
    assert set(scores) == set("ABCD") and scores["C"] > -0.01 > max(scores["A"], scores["B"], scores["D"])


def test_mmlu_batches_agree_with_single_questions(tokenizer):
    from lorapar.config import ModelArgs
    from lorapar.model import Transformer

    model = Transformer(
        ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size, hidden_dim=64)
    )
    model.init_weights(seed=1)
    examples = [Example(("a " * n) + "?\nA. x\nB. y\nAnswer:", "A", "A", None, {}, "mmlu") for n in (1, 5, 9)]
    batched = evaluate_mmlu(model, tokenizer, examples, batch_size=3, progress=False)["records"]
    for example, record in zip(examples, batched):
        alone = evaluate_mmlu(model, tokenizer, [example], batch_size=1, progress=False)["records"][0]
        assert set(record["scores"]) == {"A", "B"}
        for letter in "AB":
            assert math.isclose(record["scores"][letter], alone["scores"][letter], abs_tol=1e-4)


def test_gsm8k_generation_path_scores_what_the_model_says(tokenizer):
    model = planted_model(tokenizer.vocab_size, tokenizer.eos_id)  # answers nothing: every item malformed
    examples = [gsm8k("3", 1), gsm8k("4", 2)]
    result = evaluate_gsm8k(model, tokenizer, examples, batch_size=2, max_new_tokens=4, progress=False)
    assert result["metrics"]["malformed"] == 2 and result["metrics"]["accuracy"] == 0.0
    assert all(r["finished"] and r["completion"] == "" for r in result["records"])


def test_gsm8k_prompt_of_the_lorapar_template_after_sft_ends_with_eos(tokenizer, monkeypatch):
    """The SFT-stage prompt is BOS + question + EOS; generation continues after that EOS."""
    import lorapar.eval_tasks as eval_tasks
    from lorapar.generate import Generation

    seen = []

    def answer_three(model, prompts, max_new_tokens, **kwargs):
        seen.extend(prompts)
        return Generation(
            tokens=[tokenizer.encode("#### 3") for _ in prompts],
            logprobs=[[] for _ in prompts],
            finished=[True for _ in prompts],
        )

    monkeypatch.setattr(eval_tasks, "generate", answer_three)
    result = evaluate_gsm8k(None, tokenizer, [gsm8k("3")], template="lorapar", progress=False)
    assert seen == [[tokenizer.bos_id, *tokenizer.encode("q"), tokenizer.eos_id]]
    assert result["metrics"]["correct"] == 1 and result["metrics"]["extraction"] == "last_hash"


def test_decode_continuation_keeps_the_leading_space():
    class Spaces:  # decodes like SentencePiece: a word-start piece alone loses its space
        eos_id = 2

        def decode(self, ids):
            return "".join({5: "def f():", 6: "\n", 7: " return", 8: " 1"}[i] for i in ids).lstrip(" ")

    assert decode_continuation(Spaces(), [5, 6], [7, 8, 2]) == " return 1"


# ----------------------------------------------------------------------------- HumanEval sandbox


@pytest.fixture
def humaneval(asset):
    with gzip.open(asset("humaneval/HumanEval.jsonl.gz"), "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_every_canonical_solution_passes_and_wrong_ones_fail(humaneval):
    programs = [program_text(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"]) for p in humaneval]
    results = run_many(programs, workers=2, timeout=10.0, progress=False)
    failed = [(p["task_id"], r.status, r.stderr[-200:]) for p, r in zip(humaneval, results) if not r.passed]
    assert not failed
    wrong = [program_text(p["prompt"], "    return None\n", p["test"], p["entry_point"]) for p in humaneval[:10]]
    assert not any(r.passed for r in run_many(wrong, workers=2, progress=False))


def test_an_infinite_loop_is_killed_at_its_timeout_with_its_children():
    tag = f"lorapar-test-{uuid.uuid4().hex}"  # found in the child's command line: its PID may be a namespace's
    start = time.perf_counter()
    result = run_program(
        "import subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'while True: pass', {tag!r}])\n"
        "while True:\n    pass\n",
        timeout=1.0,
    )
    assert result.status == "timeout" and time.perf_counter() - start < 5.0
    for _ in range(50):  # the orphan is killed with the group (or the namespace), then reaped
        if not processes_with(tag):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"processes {processes_with(tag)} started by the timed-out program are still running")


def processes_with(tag: str) -> list[int]:
    """PIDs of live (not zombie) processes whose command line contains `tag`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                if tag.encode() not in handle.read():
                    continue
            with open(f"/proc/{name}/status") as handle:
                if "zombie" not in handle.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def test_the_sandbox_runs_in_an_empty_directory_with_limits():
    probe = (
        "import os, sys, resource\n"
        "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
        "assert os.environ['HOME'] == os.getcwd()\n"
        "assert not any('lorapar' in p or p in ('', '.') for p in sys.path), sys.path\n"
        "assert resource.getrlimit(resource.RLIMIT_AS)[0] == 256 * 2**20\n"
        "try:\n    import lorapar\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('project importable')\n"
    )
    result = run_program(probe, memory_mb=256)
    assert result.passed, result.stderr
    hog = run_program("x = bytearray(512 * 2**20)\n", memory_mb=256)
    assert hog.status == "failed" and "MemoryError" in hog.stderr


def test_pass_at_k_against_hand_values():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert math.isclose(pass_at_k(10, 3, 1), 0.3)
    assert math.isclose(pass_at_k(5, 2, 2), 1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert math.isclose(pass_at_k(10, 1, 5), 0.5)
    assert pass_at_k(4, 3, 2) == 1.0  # every pair holds a correct sample
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_truncate_completion_stops_at_a_new_top_level_statement():
    body = "    x = 1\n    # note\n    return x\n"
    assert truncate_completion(body + "\ndef other():\n    pass\n") == body
    assert truncate_completion(body + "\nprint(f())") == body
    assert truncate_completion(body) == body


# ----------------------------------------------------------------------------- command line


def test_cli_writes_results_with_records(tmp_path, tokenizer):
    from lorapar.checkpoint import save_model

    save_model(planted_model(tokenizer.vocab_size, tokenizer.encode("B")[0]), str(tmp_path / "base"))
    data = tmp_path / "mmlu.jsonl"
    rows = [{"question": "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:", "answer": letter} for letter in "BBA"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.json"
    from lorapar.evaluate import main

    main(
        [
            "--ckpt",
            str(tmp_path / "base"),
            "--tokenizer",
            tokenizer.path,
            "--task",
            "mmlu",
            "--data",
            str(data),
            "--out",
            str(out),
            "--limit",
            "2",
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["metrics"] == {"accuracy": 1.0, "correct": 2, "n": 2}
    assert len(saved["records"]) == 2 and saved["config"]["limit"] == 2
    with pytest.raises(ValueError, match="--data"):
        run(EvalArgs(ckpt=str(tmp_path / "base"), tokenizer=tokenizer.path, out=str(out)))
