"""Readers on the real files, malformed-line errors, templates, label masking, padding, the sampler."""

from __future__ import annotations

import gzip
import json
from decimal import Decimal

import pytest
import torch

from lorapar.answers import extract_gsm8k_number
from lorapar.batching import LengthGroupedSampler, SFTDataset, collate, encode_example
from lorapar.data import DataError, load_examples, read_jsonl
from lorapar.templates import (
    LORAPAR_SYSTEM_PROMPT,
    REASONING_SYSTEM_PROMPT,
    encode_prompt,
    format_prompt,
    format_response,
)
from lorapar.tokenizer import Tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def tokenizer(asset):
    return Tokenizer(asset("models/llama2-tokenizer.model"))


@pytest.mark.parametrize("split,count,first", [("train", 7473, "72"), ("test", 1319, "18")])
def test_real_gsm8k_loads_and_every_answer_parses(asset, split, count, first):
    examples = load_examples(asset(f"gsm8k/{split}.jsonl"), "gsm8k")
    assert len(examples) == count and examples.skipped == 0
    for ex in examples:
        written = ex.answer.rsplit("#### ", 1)[1].strip().replace(",", "")
        assert Decimal(ex.final) == Decimal(written) and "," not in ex.final  # Decimal() rejects non-numbers
    assert examples[0].final == first and examples[0].system is None


def test_real_mmlu_and_humaneval_load(asset):
    mmlu = load_examples(asset("mmlu/mmlu_sample_1000.jsonl"), "mmlu")
    assert len(mmlu) == 1000 and {ex.final for ex in mmlu} == set("ABCD")
    assert all(ex.question.endswith("Answer:") for ex in mmlu)
    humaneval = load_examples(asset("humaneval/HumanEval.jsonl.gz"), "humaneval")
    assert len(humaneval) == 164 and humaneval[0].source["task_id"] == "HumanEval/0"
    assert format_prompt(humaneval[0]).startswith("from typing import List")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("#### 1,450,000", "1450000"),
        ("so $10.00\n#### $10.00", "10"),
        ("#### -3.50", "-3.5"),
        ("x = 4 then 7.", "7"),
        ("#### 0.25", "0.25"),
        ("nothing here", None),
    ],
)
def test_extract_gsm8k_number(text, expected):
    assert extract_gsm8k_number(text) == expected


def test_instruction_alpaca_dolly_and_gzip(tmp_path):
    rows = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a colour.", "context": "", "response": "Red"},
    ]
    path = tmp_path / "inst.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(json.dumps(r) for r in rows) + "\n")
    a, d = load_examples(path, "instruction")
    assert (a.question, a.answer, d.question, d.answer) == ("Add.\n\n2 and 3", "5", "Name a colour.", "Red")


def test_malformed_lines_name_the_file_and_line(tmp_path):
    good = {"question": "q", "answer": "a\n#### 3"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, "{not json", {"question": "q"}, good])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        read_jsonl(path)
    rows, skipped = read_jsonl(path, skip_bad=True)
    assert (len(rows), skipped) == (4, 1)
    with pytest.raises(DataError, match=r"bad\.jsonl:3"):
        load_examples(path, "gsm8k")
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON \('utf-8' codec"):
        read_jsonl(path)
    path = write_jsonl(tmp_path / "bad2.jsonl", [good, {"question": "q"}, {"question": "q", "answer": "no number"}])
    with pytest.raises(DataError, match=r"bad2\.jsonl:2: .*'answer'"):
        load_examples(path, "gsm8k")
    examples = load_examples(path, "gsm8k", skip_bad=True)
    assert len(examples) == 1 and examples.skipped == 2
    path = write_jsonl(tmp_path / "mmlu.jsonl", [{"question": "Q?\nA. x\nB. y\nAnswer:", "answer": "C"}])
    with pytest.raises(DataError, match=r"mmlu\.jsonl:1: .*letters AB"):
        load_examples(path, "mmlu")


def test_labelled_rows_carry_system(tmp_path):
    row = {"question": "q", "answer": "a\n#### 3", "format": "gsm8k", "system": 2}
    path = write_jsonl(tmp_path / "lab.jsonl", [row, {**row, "system": 3}])
    with pytest.raises(DataError, match=r"lab\.jsonl:2: field 'system' must be 1 or 2"):
        load_examples(path, "labelled")
    assert load_examples(path, "labelled", skip_bad=True)[0].system == 2


def test_reasoning_template_for_gsm8k(tmp_path):
    row = {"question": "Two plus three?", "answer": "She has 2+3 = <<2+3=5>>5 apples.\n#### 5"}
    (example,) = load_examples(write_jsonl(tmp_path / "g.jsonl", [row]), "gsm8k")
    assert format_response(example, "reasoning") == (
        "<reasoning>\nShe has 2+3 = 5 apples.\n</reasoning>\n<answer>\n5\n</answer>\n"
    )
    assert format_prompt(example, "reasoning").startswith("[INST] <<SYS>>\nRespond in the following format")
    assert format_prompt(example, "chat") == "[INST] Two plus three? [/INST]"
    assert format_response(example, "plain") == row["answer"]


# What Hugging Face's Llama-2-chat template renders for example.py's messages [system: SYSTEM_PROMPT, user: q]:
# "<s>[INST] <<SYS>>\n" + system + "\n<</SYS>>\n\n" + q + " [/INST]", the system prompt kept whole.
AUTHORS_RL_PROMPT = (
    "[INST] <<SYS>>\n\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n"
    "...\n</answer>\n\n<</SYS>>\n\nTwo plus three? [/INST]"
)


def test_lorapar_template_is_example_py_s(tmp_path, tokenizer):
    """SFT: BOS + question + EOS (the authors' literal "</s>" is token 2), then the answer as written +
    EOS, loss on the answer and its EOS only; GRPO: the chat prompt with the authors' system prompt."""
    row = {"question": "Two plus three?", "answer": "She has 2+3 = <<2+3=5>>5 apples.\n#### 5"}
    (example,) = load_examples(write_jsonl(tmp_path / "g.jsonl", [row]), "gsm8k")
    assert format_prompt(example, "lorapar") == "Two plus three?"
    assert format_response(example, "lorapar") == row["answer"]  # calculator annotations and "#### 5" kept
    assert format_prompt(example, "lorapar", phase="rl") == AUTHORS_RL_PROMPT
    question, answer = tokenizer.encode(row["question"]), tokenizer.encode(row["answer"])
    assert tokenizer.eos_id == 2 and tokenizer.bos_id == 1
    assert encode_prompt(tokenizer, example, "lorapar") == [1, *question, 2]
    assert encode_prompt(tokenizer, example, "lorapar", "rl") == tokenizer.encode(AUTHORS_RL_PROMPT, bos=True)
    (item,) = SFTDataset([example], tokenizer, template="lorapar", max_len=512).items
    assert item["input_ids"] == [1, *question, 2, *answer, 2]
    assert item["labels"] == [-100] * (len(question) + 2) + answer + [2]
    for template in ("plain", "chat", "reasoning"):  # the phase belongs to lorapar alone
        assert format_prompt(example, template, "rl") == format_prompt(example, template)
    with pytest.raises(ValueError, match="unknown phase 'grpo'"):
        format_prompt(example, "lorapar", "grpo")


def test_alpaca_template_is_the_dmlora_supplement_s(tmp_path, tokenizer):
    """PiSSA's train.py, which the supplement runs: the no-input Alpaca prompt; target = output + "\n" + EOS."""
    row = {"instruction": "Write a function that adds two numbers.", "output": "def add(a, b):\n    return a + b"}
    (example,) = load_examples(write_jsonl(tmp_path / "a.jsonl", [row]), "instruction")
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWrite a function that adds two numbers.\n\n### Response:"
    )
    assert format_prompt(example, "alpaca") == prompt
    assert format_response(example, "alpaca") == row["output"] + "\n"
    (item,) = SFTDataset([example], tokenizer, template="alpaca", max_len=512).items
    answer = tokenizer.encode(row["output"] + "\n")
    assert item["input_ids"] == tokenizer.encode(prompt, bos=True) + answer + [tokenizer.eos_id]
    assert item["labels"][-len(answer) - 1 :] == answer + [tokenizer.eos_id]


def test_chat_templates_follow_the_tokenizer_s_model_family(tmp_path):
    """A Qwen2 / SmolLM2 tokenizer (template chatml) gets ChatML around the question, not LLaMA-2's [INST]."""
    row = {"question": "Two plus three?", "answer": "5\n#### 5"}
    (example,) = load_examples(write_jsonl(tmp_path / "g.jsonl", [row]), "gsm8k")
    chatml = (
        "<|im_start|>system\n" + LORAPAR_SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\nTwo plus three?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert format_prompt(example, "lorapar", "rl", chat="chatml") == chatml
    assert format_prompt(example, "chat", chat="llama3").startswith("<|start_header_id|>user<|end_header_id|>")
    assert format_prompt(example, "plain", chat="chatml") == "Question: Two plus three?\nAnswer:"

    class ChatMLTokenizer:  # records what it is asked to encode
        template, eos_id, bos_id = "chatml", 9, 8

        def __init__(self):
            self.texts = []

        def encode(self, text, bos=False, eos=False):
            self.texts.append(text)
            return [1, 2]

    tokenizer = ChatMLTokenizer()
    encode_prompt(tokenizer, example, "lorapar", "rl")
    assert tokenizer.texts == [chatml]
    SFTDataset([example], tokenizer, template="reasoning", max_len=64)
    assert tokenizer.texts[1].startswith("<|im_start|>system\n" + REASONING_SYSTEM_PROMPT)
    assert format_prompt(example, "reasoning", chat="llama2").startswith("[INST]")


# meta-llama/Llama-2-7b-chat-hf's chat_template (tokenizer_config.json), which example.py's
# tokenizer.apply_chat_template and TRL's GRPOTrainer render the authors' messages with.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def test_lorapar_rl_prompt_is_what_the_llama2_chat_template_renders():
    jinja2 = pytest.importorskip("jinja2")
    from lorapar.data import Example
    from lorapar.templates import LORAPAR_SYSTEM_PROMPT

    question = "  Janet has 3 apples.\nHow many?  "
    messages = [{"role": "system", "content": LORAPAR_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    rendered = jinja2.Template(LLAMA2_CHAT_TEMPLATE).render(messages=messages, bos_token="<s>", eos_token="</s>")
    example = Example(question, "#### 3", "3", None, {})
    assert rendered == "<s>" + format_prompt(example, "lorapar", phase="rl")  # BOS is the tokenizer's


def test_lorapar_scoring_rows_are_example_py_s_collate_fn(tmp_path, tokenizer):
    """Importance scoring under lorapar: question + EOS, then the answer, with no BOS and no final EOS."""
    from lorapar.importance import ImportanceArgs, encode_for_scoring

    row = {"question": "Two plus three?", "answer": "2+3=5\n#### 5"}
    examples = load_examples(write_jsonl(tmp_path / "g.jsonl", [row]), "gsm8k")
    assert ImportanceArgs().template == "lorapar"
    [(ids, labels)] = encode_for_scoring(examples, tokenizer, ImportanceArgs()).rows
    question, answer = tokenizer.encode(row["question"]), tokenizer.encode(row["answer"])
    assert ids == [*question, 2, *answer]
    assert labels == [-100] * (len(question) + 1) + answer
    [(ids, _)] = encode_for_scoring(examples, tokenizer, ImportanceArgs(template="plain")).rows
    assert ids[0] == 1 and ids[-1] == 2  # other templates score exactly what SFT trains on


@pytest.mark.parametrize(
    "text, hashed, last_hash, last_answer",
    [
        ("5+7=12\n#### 12", "12", 12, None),
        ("#### 1,234", "1234", 1, None),  # example.py's integer pattern stops at the comma
        ("#### $1,234.50", "1234.50", None, None),
        ("#### 12\nQuestion: ...\n#### 99", "12\nQuestion: ...", 99, None),  # split("####")[1], stripped
        ("####-3", "-3", -3, None),
        ("<answer>\n12\n</answer>", None, None, 12),
        ("<answer>\n12\n</answer> then <answer> 13 </answer>", None, None, 13),
        ("<answer>\n12.0\n</answer>", None, None, None),  # int() refuses it: wrong, as for the authors
        ("<answer>\n1,000\n</answer>", None, None, None),
        ("<answer>\n12", None, None, None),  # not closed
        ("", None, None, None),
    ],
)
def test_the_authors_answer_rules(text, hashed, last_hash, last_answer):
    from lorapar.answers import hash_answer, last_answer_integer, last_hash_integer

    assert (hash_answer(text), last_hash_integer(text), last_answer_integer(text)) == (hashed, last_hash, last_answer)


def test_label_masking_token_by_token(tokenizer):
    prompt, response = "Question: 2+3?\nAnswer:", "5 apples"
    ids, labels, truncated = encode_example(tokenizer, prompt, response, max_len=64)
    prompt_ids = tokenizer.encode(prompt, bos=True)
    response_ids = tokenizer.encode(response) + [tokenizer.eos_id]
    assert not truncated and ids == prompt_ids + response_ids and ids[0] == tokenizer.bos_id
    for position, (token, label) in enumerate(zip(ids, labels)):
        assert label == (-100 if position < len(prompt_ids) else token)
    assert labels[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids[len(prompt_ids) : -1]) == response
    cut_ids, cut_labels, cut = encode_example(tokenizer, prompt, response, max_len=len(ids) - 2)
    assert cut and cut_ids == ids[:-2] and cut_labels == labels[:-2]


def test_dataset_overflow_and_collate(tokenizer):
    from lorapar.data import Example

    short = Example("1+1?", "2", "2", None, {}, "gsm8k")
    long = Example("1+1?", "two " * 40, None, None, {}, "gsm8k")
    dropped = SFTDataset([short, long], tokenizer, "plain", max_len=24)
    assert (len(dropped), dropped.dropped, dropped.truncated) == (1, 1, 0)
    kept = SFTDataset([short, long], tokenizer, "plain", max_len=24, overflow="truncate")
    assert (len(kept), kept.dropped, kept.truncated, kept.lengths[1]) == (2, 0, 1, 24)
    batch = collate([kept[0], kept[1]], pad_id=tokenizer.pad_id)
    n = len(kept[0]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 24)
    assert batch["input_ids"][0, :n].tolist() == kept[0]["input_ids"]
    assert (batch["input_ids"][0, n:] == tokenizer.pad_id).all() and (batch["labels"][0, n:] == -100).all()
    assert batch["labels"].dtype == torch.long


def test_length_grouped_sampler_is_distributed_and_deterministic():
    lengths = [(i * 37) % 101 for i in range(103)]
    batch, replicas = 4, 2
    samplers = [LengthGroupedSampler(lengths, batch, replicas, rank, seed=1, mega_batches=4) for rank in range(2)]
    per_rank = [list(s) for s in samplers]
    assert len(per_rank[0]) == len(per_rank[1]) == len(samplers[0]) == 52
    assert set(per_rank[0]) | set(per_rank[1]) == set(range(103))  # one index repeated to even out the ranks
    assert per_rank[0] == list(samplers[0])  # deterministic
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != per_rank[0]
    # Batches are length-grouped: far less spread inside a batch than in random batches of the same size.
    spread = [
        max(lengths[i] for i in b) - min(lengths[i] for i in b)
        for b in (per_rank[0][k : k + batch] for k in range(0, 48, batch))
    ]
    assert sum(spread) / len(spread) < 25
    with pytest.raises(ValueError, match="rank 2"):
        LengthGroupedSampler(lengths, batch, 2, 2)
