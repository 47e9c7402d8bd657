"""train_rl.py end to end: from an SFT adapter, masked GRPO on a tiny LLaMA with the real LLaMA-2 tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sft import REPO, TINY, adapter, arithmetic_rows, write_jsonl

import train_rl
import train_sft
from lorapar.checkpoint import save_model
from lorapar.config import ModelArgs
from lorapar.masks import save_masks
from lorapar.model import Transformer
from lorapar.rewards import DEFAULT_SPEC


def characters(completion: str, example) -> float:
    """A reward with spread on random text: the completion's length in characters / 100."""
    return len(completion) / 100


@pytest.fixture(scope="module")
def built():
    return {}


@pytest.fixture
def sft_run(built, tmp_path_factory, asset):
    """A base model, data and a 2-step SFT adapter (gaussian init so A and B are non-zero), built once."""
    if not built:
        built.update(build_sft(tmp_path_factory.mktemp("rl"), str(asset("models/llama2-tokenizer.model"))))
    return built


def build_sft(root: Path, tokenizer: str) -> dict:
    model = Transformer(ModelArgs(**TINY))
    model.init_weights(seed=0)
    with torch.no_grad():
        model.output.weight.mul_(40)
    save_model(model, root / "base")
    data = write_jsonl(root / "train.jsonl", arithmetic_rows(8, system=2))
    train_sft.main(
        [
            "--ckpt",
            str(root / "base"),
            "--tokenizer",
            tokenizer,
            "--data",
            data,
            "--out",
            str(root / "sft"),
            "--template",
            "plain",
            "--batch-size",
            "4",
            "--max-steps",
            "2",
            "--rank",
            "4",
            "--targets",
            "q,v,down",
            "--init",
            "gaussian",
            "--init-std",
            "0.05",
        ]
    )
    return {"base": str(root / "base"), "data": data, "tokenizer": tokenizer, "sft": str(root / "sft")}


def rl_argv(s, out, *extra) -> list[str]:
    return [
        "--ckpt",
        s["base"],
        "--tokenizer",
        s["tokenizer"],
        "--adapter",
        s["sft"],
        "--data",
        s["data"],
        "--out",
        str(out),
        "--template",
        "plain",
        "--prompts-per-step",
        "2",
        "--num-generations",
        "4",
        "--max-completion-len",
        "6",
        "--rewards",
        "test_train_rl:characters=1.0,correct=2.0",
        "--lr",
        "1e-2",
        "--warmup-ratio",
        "0",
        "--micro-batch",
        "4",
        *extra,
    ]


def run(s, out, *extra):
    return train_rl.main(rl_argv(s, out, *extra))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def test_logs_and_resume_is_bit_identical(sft_run, tmp_path):
    """beta > 0 against the SFT adapter, mu = 2, dapo: a halted and resumed run equals a straight one."""
    extra = ["--max-steps", "4", "--beta", "0.1", "--mu", "2", "--loss-type", "dapo", "--weight-decay", "0.1"]
    run(sft_run, tmp_path / "straight", *extra)
    run(sft_run, tmp_path / "resumed", *extra, "--halt-at", "2")
    run(sft_run, tmp_path / "resumed", *extra, "--resume")
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [m for m in metrics(tmp_path / "straight") if "reward_mean" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for key in (
        "reward/test_train_rl:characters_mean",
        "reward/correct_std",
        "kl",
        "clip_fraction",
        "zero_std_groups",
        "completion_length_mean",
        "generation_seconds",
        "training_seconds",
    ):
        assert key in steps[0], key
    assert all(m["kl"] > 0 for m in steps)  # the second pass of every step has moved away from the reference
    assert [m["reward_mean"] for m in steps] == [
        m["reward_mean"] for m in metrics(tmp_path / "resumed") if "reward_mean" in m
    ]


def test_frozen_elements_bit_identical_after_grpo(sft_run, tmp_path):
    start = adapter(sft_run["sft"])
    gen = torch.Generator().manual_seed(2)
    masks = {k: torch.rand(v.shape, generator=gen) < 0.5 for k, v in start.items()}
    save_masks(str(tmp_path / "masks.safetensors"), {"stage1": {k: ~m for k, m in masks.items()}, "stage2": masks})
    run(
        sft_run,
        tmp_path / "run",
        "--max-steps",
        "2",
        "--weight-decay",
        "0.1",
        "--beta",
        "0.04",
        "--reference",
        "base",
        "--masks",
        str(tmp_path / "masks.safetensors"),
        "--stage",
        "2",
        "--system",
        "2",
    )
    end = adapter(tmp_path / "run")
    assert all(m["kl"] > 0 for m in metrics(tmp_path / "run") if "kl" in m)  # the SFT adapter is not the base
    for key, mask in masks.items():
        assert torch.equal(end[key][~mask], start[key][~mask]), key
        assert (end[key][mask] != start[key][mask]).all(), key


def test_two_ranks_match_one_process(sft_run, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) with the same prompts per step gives the same completions,
    rewards and adapter (<= 1e-6) as one process: sampling seeds follow the prompt, not the rank, and
    the dapo loss divides by the token count of all ranks (uneven between them)."""
    common = [
        "--max-steps",
        "3",
        "--prompts-per-step",
        "4",
        "--micro-batch",
        "3",
        "--temperature",
        "1.0",
        "--weight-decay",
        "0.1",
        "--mu",
        "2",
        "--beta",
        "0.1",
        "--loss-type",
        "dapo",
        "--lr",
        "1e-3",
    ]
    run(sft_run, tmp_path / "one", *common)
    argv = rl_argv(sft_run, tmp_path / "two", *common, "--device", "cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "train_rl.py"),
            *argv,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    logged = (
        "reward_mean",
        "reward_std",
        "reward/test_train_rl:characters_mean",
        "completion_length_mean",
        "zero_std_groups",
        "loss",
        "kl",
        "clip_fraction",
        "grad_norm",
    )
    for a, b in zip(one[1:], two[1:], strict=True):
        assert {k: pytest.approx(a[k], rel=1e-5, abs=1e-6) for k in logged} == {k: b[k] for k in logged}, a["step"]
    assert two[0]["world_size"] == 2 and one[1]["reward_std"] > 0
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    start = adapter(sft_run["sft"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
        assert not torch.equal(a[key], start[key]), key


def test_bad_inputs_give_clear_errors(sft_run, tmp_path):
    with pytest.raises(SystemExit):  # argparse: LoRA shape flags conflict with --adapter
        run(sft_run, tmp_path / "a", "--rank", "16")
    with pytest.raises(ValueError, match="1 prompts do not fill one step of --prompts-per-step 2"):
        run(sft_run, tmp_path / "b", "--max-examples", "1")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        run(sft_run, tmp_path / "c", "--rewards", "nope=1")
    with pytest.raises(ValueError, match="no example of system 1"):
        run(sft_run, tmp_path / "d", "--system", "1")
    with pytest.raises(FileNotFoundError, match="adapter config not found"):
        run(sft_run, tmp_path / "e", "--adapter", str(tmp_path))


def test_long_prompts_are_left_truncated_and_counted(sft_run, tmp_path):
    """--max-prompt-len cuts from the left, as TRL does: every prompt trains, its last tokens kept."""
    run(sft_run, tmp_path / "run", "--max-steps", "1", "--max-prompt-len", "4")
    first = metrics(tmp_path / "run")[0]
    assert (first["prompts"], first["prompts_truncated"]) == (8, 8)
    cfg, grpo, _, _ = train_rl.parse_config(rl_argv(sft_run, tmp_path / "x", "--max-prompt-len", "4"))
    tokenizer = train_rl.Tokenizer(sft_run["tokenizer"])
    prompts, truncated = train_rl.load_prompts(cfg, grpo, tokenizer)
    full, _ = train_rl.load_prompts(cfg, train_rl.GRPOArgs(max_prompt_len=10_000), tokenizer)
    assert truncated == 8 and [ids for _, ids in prompts] == [ids[-4:] for _, ids in full]


def test_every_gsm8k_training_prompt_survives_grpo_loading(asset, tmp_path):
    """The paper preset's prompts (example.py's chat prompt, 128 tokens): all 7,473 questions of GSM8K's
    training split are kept, the long ones left-truncated and counted, none longer than 128 tokens."""
    data, tokenizer = str(asset("gsm8k/train.jsonl")), str(asset("models/llama2-tokenizer.model"))
    cfg, grpo, _, _ = train_rl.parse_config(
        [
            "--preset",
            "lorapar-grpo",
            "--ckpt",
            "unused",
            "--tokenizer",
            tokenizer,
            "--data",
            data,
            "--out",
            str(tmp_path),
        ]
    )
    assert (cfg.template, grpo.max_prompt_len) == ("lorapar", 128)
    prompts, truncated = train_rl.load_prompts(cfg, grpo, train_rl.Tokenizer(tokenizer))
    assert len(prompts) == 7473 and max(len(ids) for _, ids in prompts) <= 128
    assert [e.line for e, _ in prompts] == list(range(1, 7474))
    long = sum(len(ids) == 128 for _, ids in prompts)
    assert 0 < truncated <= long  # the authors' system prompt alone is about 40 tokens
    end = train_rl.Tokenizer(tokenizer).encode(" [/INST]")[-4:]
    assert all(ids[-4:] == end for _, ids in prompts)  # the question's end and the chat marker survive


def test_paper_preset_is_trl_v0_19_1(tmp_path):
    """--preset lorapar-grpo: example.py's settings, and TRL v0.19.1's defaults for what it leaves out."""
    cfg, grpo, train, _ = train_rl.parse_config(
        ["--preset", "lorapar-grpo", "--ckpt", "c", "--tokenizer", "t", "--data", "d", "--out", str(tmp_path)]
    )
    assert train_rl.PINNED_TRL == "v0.19.1"
    assert (train.lr, tuple(train.betas), train.weight_decay, train.warmup_ratio, train.max_grad_norm) == (
        5e-6,
        (0.9, 0.99),
        0.1,
        0.1,
        0.1,
    )
    assert (grpo.prompts_per_step, grpo.num_generations, grpo.micro_batch) == (4, 8, 8)  # 8 x 4 completions
    assert (grpo.beta, grpo.temperature, grpo.top_p, grpo.loss_type, grpo.mu) == (0.0, 1.0, 1.0, "bnpo", 1)
    assert grpo.shuffle_micro_batches and grpo.scale_rewards and grpo.epsilon == 0.2
    assert (cfg.template, cfg.rewards) == ("lorapar", DEFAULT_SPEC)


def test_the_trl_table_s_flags_give_each_release_s_semantics(tmp_path):
    """Every row of docs/trl_grpo_defaults.md's flag table parses, and gives that release's β, reference,
    temperature, loss aggregation, prompts per step and micro-batch shuffle."""
    import re
    import shlex

    expected = {  # release: (beta, reference, temperature, loss_type, prompts_per_step, micro_batch, shuffle)
        "v0.19.1": (0.0, "sft", 1.0, "bnpo", 4, 8, True),  # beta 0: the reference is never used
        "v0.18": (0.04, "base", 1.0, "bnpo", 4, 8, True),
        "v0.17": (0.04, "base", 0.9, "bnpo", 4, 8, False),
        "v0.15": (0.04, "base", 0.9, "grpo", 4, 8, False),
        "v0.14": (0.04, "sft", 0.9, "grpo", 32, 64, False),
    }
    table = (REPO / "docs" / "trl_grpo_defaults.md").read_text().split("## The lorapar flags for each release")[1]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (v[\d.]+)[^|]*\| ([^|]*)\|", table, flags=re.M)}
    assert set(expected) <= set(rows)
    base = ["--preset", "lorapar-grpo", "--ckpt", "c", "--tokenizer", "t", "--data", "d", "--out", str(tmp_path)]
    for release, want in expected.items():
        flags = [f for chunk in re.findall(r"`([^`]*)`", rows[release]) for f in shlex.split(chunk)]
        _, grpo, _, _ = train_rl.parse_config(base + flags)
        got = (
            grpo.beta,
            grpo.reference,
            grpo.temperature,
            grpo.loss_type,
            grpo.prompts_per_step,
            grpo.micro_batch,
            grpo.shuffle_micro_batches,
        )
        assert got == want, release
