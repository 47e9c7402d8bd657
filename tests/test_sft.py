"""train_sft.py end to end on a tiny LLaMA with the real LLaMA-2 tokenizer (vocab 32000, dim 32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_sft
from lorapar.adapter import load_adapter
from lorapar.checkpoint import save_model
from lorapar.config import ModelArgs
from lorapar.lora import LoraArgs, adapter_state_dict, apply_lora
from lorapar.masks import save_masks
from lorapar.model import Transformer

REPO = Path(__file__).resolve().parents[1]
# max_seq_len 512: the default --max-len, which may not exceed the base's context
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=48, max_seq_len=512)
LORA = dict(r=4, alpha=8.0, targets=("q", "v", "gate", "down"), init="gaussian", init_std=0.05)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def arithmetic_rows(n: int, system=None) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        row = {"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
        if system is not None:
            row["system"] = system
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY))
    model.init_weights(seed=0)
    with torch.no_grad():  # peaked logits, so that a rank-4 adapter on a 32-dim model can move the loss
        model.output.weight.mul_(40)
    save_model(model, root / "base")
    data = write_jsonl(root / "train.jsonl", arithmetic_rows(16))
    return root, str(root / "base"), data


# The tiny runs' training recipe, shared by the SFT tests of every adapter (test_dual, test_adapter_init).
TINY_RECIPE = ["--template", "plain", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--warmup-ratio", "0"]


def run(setup, asset, out, *extra, lora=LORA):
    root, base, data = setup
    argv = [
        "--ckpt",
        base,
        "--tokenizer",
        str(asset("models/llama2-tokenizer.model")),
        "--data",
        data,
        "--out",
        str(out),
        *TINY_RECIPE,
        "--rank",
        str(lora["r"]),
        "--lora-alpha",
        str(lora["alpha"]),
        "--targets",
        ",".join(lora["targets"]),
        "--init",
        lora["init"],
        "--init-std",
        str(lora["init_std"]),
        *extra,
    ]
    return argv, train_sft.main(argv)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def adapter(out) -> dict[str, torch.Tensor]:
    """The adapter in `out` as the model holds it (the file keeps q/k rows in Hugging Face order)."""
    model = Transformer(ModelArgs(**TINY))
    load_adapter(model, str(out))
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def initial_adapter(seed=0) -> dict[str, torch.Tensor]:
    model = Transformer(ModelArgs(**TINY))
    apply_lora(model, LoraArgs(**LORA, seed=seed))
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def test_loss_falls_and_eval_loss_is_logged(setup, asset, tmp_path):
    run(setup, asset, tmp_path / "run", "--max-steps", "12", "--eval-fraction", "0.25", "--eval-every", "6")
    steps = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert len(steps) == 12
    assert steps[-1]["loss"] < 0.75 * steps[0]["loss"], [s["loss"] for s in steps]
    evals = [m["eval_loss"] for m in steps if "eval_loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0]
    config = json.loads(Path(tmp_path / "run", "config.json").read_text())
    assert config["TrainArgs"]["lr"] == 1e-2 and config["LoraArgs"]["r"] == 4
    assert (tmp_path / "run" / "checkpoints" / "step-000012" / "trainer_state.pt").exists()


def test_frozen_elements_bit_identical_with_weight_decay(setup, asset, tmp_path):
    start = initial_adapter()
    gen = torch.Generator().manual_seed(1)
    masks = {k: torch.rand(v.shape, generator=gen) < 0.4 for k, v in start.items()}
    save_masks(str(tmp_path / "masks.safetensors"), {"stage1": masks, "stage2": {k: ~m for k, m in masks.items()}})
    run(
        setup,
        asset,
        tmp_path / "run",
        "--max-steps",
        "3",
        "--weight-decay",
        "0.1",
        "--masks",
        str(tmp_path / "masks.safetensors"),
        "--stage",
        "1",
    )
    end = adapter(tmp_path / "run")
    for key, mask in masks.items():
        assert torch.equal(end[key][~mask], start[key][~mask]), key
        assert (end[key][mask] != start[key][mask]).all(), key


def test_resume_is_bit_identical_to_a_straight_run(setup, asset, tmp_path):
    extra = ["--max-steps", "6", "--dropout", "0.1", "--weight-decay", "0.1", "--save-every", "2"]
    run(setup, asset, tmp_path / "straight", *extra)
    run(setup, asset, tmp_path / "resumed", *extra, "--halt-at", "3")
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    run(setup, asset, tmp_path / "resumed", *extra, "--resume")
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda out: [m["loss"] for m in metrics(out) if "loss" in m]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_two_ranks_match_one_process(setup, asset, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) with the same global batch gives the same adapter (<= 1e-6)."""
    common = ["--max-steps", "3", "--global-batch", "8", "--weight-decay", "0.1"]
    argv, _ = run(setup, asset, tmp_path / "one", *common)
    two = [a if a != str(tmp_path / "one") else str(tmp_path / "two") for a in argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "train_sft.py"),
            *two,
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert json.loads(Path(tmp_path / "two", "config.json").read_text())["grad_accum"] == 2


def test_bad_inputs_give_clear_errors(setup, asset, tmp_path):
    root, base, data = setup
    run(setup, asset, tmp_path / "run", "--max-steps", "1")
    with pytest.raises(FileExistsError, match="already holds a run.*--resume.*--overwrite"):
        run(setup, asset, tmp_path / "run", "--max-steps", "1")
    run(setup, asset, tmp_path / "run", "--max-steps", "1", "--overwrite")
    with pytest.raises(ValueError, match="configuration changed.*lr"):
        run(setup, asset, tmp_path / "run", "--max-steps", "1", "--resume", "--lr", "0.5")

    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        run(setup, asset, tmp_path / "fresh", "--resume")
    with pytest.raises(ValueError, match="no example of system 2 among 16 \\(16 carry no system label"):
        run(setup, asset, tmp_path / "a", "--system", "2")
    with pytest.raises(ValueError, match="no training example left.*16 longer than --max-len 8"):
        run(setup, asset, tmp_path / "b", "--max-len", "8")

    start = initial_adapter()
    other_names = {k.replace("q_proj", "k_proj"): torch.ones_like(v, dtype=torch.bool) for k, v in start.items()}
    save_masks(str(tmp_path / "names.safetensors"), other_names)
    with pytest.raises(ValueError, match="names.safetensors: the masks do not match the adapter.*k_proj"):
        run(setup, asset, tmp_path / "c", "--masks", str(tmp_path / "names.safetensors"))
    other_shapes = {k: torch.ones(v.shape[0] + 1, v.shape[1], dtype=torch.bool) for k, v in start.items()}
    save_masks(str(tmp_path / "shapes.safetensors"), other_shapes)
    with pytest.raises(ValueError, match="shapes.safetensors: the masks do not match the adapter.*shape"):
        run(setup, asset, tmp_path / "d", "--masks", str(tmp_path / "shapes.safetensors"))
    save_masks(
        str(tmp_path / "staged.safetensors"),
        {"stage1": {k: torch.ones_like(v, dtype=torch.bool) for k, v in start.items()}},
    )
    with pytest.raises(ValueError, match="several stages.*--stage"):
        run(setup, asset, tmp_path / "e", "--masks", str(tmp_path / "staged.safetensors"))


def test_presets_and_schedule():
    import train_rl
    from lorapar.optim import lr_at
    from lorapar.script_args import TrainArgs

    paths = ["--ckpt", "c", "--tokenizer", "t", "--data", "d", "--out", "o"]
    sft, train, lora = train_sft.parse_config([*paths, "--preset", "lorapar-sft", "--lr", "1e-4", "--rank", "16"])
    assert (train.lr, train.global_batch, train.warmup_ratio, train.schedule, train.epochs) == (
        1e-4,
        32,
        0.03,
        "cosine",
        1,
    )
    assert (sft.max_len, lora.r, lora.alpha, lora.targets) == (512, 16, 64.0, ("q", "k", "v", "gate", "up", "down"))
    _, grpo, train, _ = train_rl.parse_config([*paths, "--preset", "lorapar-grpo"])
    assert (train.lr, train.betas, train.weight_decay, train.warmup_ratio, train.max_grad_norm) == (
        5e-6,
        (0.9, 0.99),
        0.1,
        0.1,
        0.1,
    )
    assert (grpo.num_generations, grpo.max_prompt_len, grpo.max_completion_len) == (8, 128, 256)

    lrs = [lr_at(step, 20, TrainArgs(lr=1.0, warmup_ratio=0.1)) for step in range(20)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.01
