"""Broken input files are errors that name the file and what it should hold; every script prints an
expected error as one line (after argparse's usage where it reports through argparse) and exits 2,
with no traceback."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorapar.adapter import load_adapter, save_adapter
from lorapar.checkpoint import load_model, save_model
from lorapar.config import ModelArgs
from lorapar.data import load_examples
from lorapar.errors import InputError
from lorapar.lora import LoraArgs, apply_lora
from lorapar.masks import load_masks
from lorapar.model import Transformer

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dim=16, n_layers=1, n_heads=2, vocab_size=64, hidden_dim=32, max_seq_len=32)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def base(tmp_path) -> Path:
    model = Transformer(ModelArgs(**TINY))
    model.init_weights(seed=0)
    save_model(model, tmp_path / "base")
    return tmp_path / "base"


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    model = Transformer(ModelArgs(**TINY))
    apply_lora(model, LoraArgs(r=2, targets=("q", "v")))
    save_adapter(model, str(tmp_path / "adapter"), LoraArgs(r=2, targets=("q", "v")))
    return tmp_path / "adapter"


def test_a_truncated_model_file_names_itself(base):
    truncate(base / "model.safetensors")
    with pytest.raises(InputError, match=r"base/model.safetensors: not readable as a safetensors weight file.*trunc"):
        load_model(str(base))


def test_a_truncated_pytorch_checkpoint_names_itself(base, tmp_path):
    """A truncated pytorch_model.bin or consolidated.00.pth: the file and what it should be, not miniz's words."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text((base / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, hf / "pytorch_model.bin")
    truncate(hf / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"hf/pytorch_model.bin: not readable as a PyTorch weight file.*trunc"):
        load_model(str(hf))


def test_a_truncated_adapter_or_a_malformed_adapter_config_names_the_file(adapter_dir):
    weights = adapter_dir / "adapter_model.safetensors"
    good = weights.read_bytes()
    truncate(weights)
    with pytest.raises(InputError, match="adapter_model.safetensors: not readable as a safetensors adapter file"):
        load_adapter(Transformer(ModelArgs(**TINY)), str(adapter_dir))
    weights.write_bytes(good)
    config = adapter_dir / "adapter_config.json"
    config.write_text('{"r": 2, ')
    with pytest.raises(InputError, match="adapter_config.json: invalid JSON"):
        load_adapter(Transformer(ModelArgs(**TINY)), str(adapter_dir))
    config.write_text("[1, 2]")
    with pytest.raises(InputError, match="adapter_config.json: expected a JSON object"):
        load_adapter(Transformer(ModelArgs(**TINY)), str(adapter_dir))


def test_a_masks_file_that_is_not_safetensors_names_itself(tmp_path):
    path = tmp_path / "masks.safetensors"
    path.write_text('{"stage1": "not tensors"}\n')
    with pytest.raises(InputError, match="masks.safetensors: not readable as a safetensors file of bool element masks"):
        load_masks(str(path))


def test_a_truncated_gzip_data_file_names_itself(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    rows = "".join(json.dumps({"question": f"q{i}", "answer": f"a\n#### {i}"}) + "\n" for i in range(2000))
    path.write_bytes(gzip.compress(rows.encode()))
    truncate(path)
    with pytest.raises(InputError, match="train.jsonl.gz: not readable as JSON lines.*EOFError"):
        load_examples(str(path), "gsm8k")


@pytest.mark.parametrize(
    "command, flags, message",
    [
        (["train_sft.py"], ["--lr", "nan", "--data", "d.jsonl"], "--lr nan: expected a finite number"),
        (["train_rl.py"], ["--num-generations", "1", "--data", "d.jsonl"], "--num-generations 1: expected >= 2"),
        (["score.py"], ["--data", "MISSING.jsonl"], "MISSING.jsonl"),
        (["classify.py"], ["--data", "MISSING.jsonl", "--teacher", "rule:length"], "MISSING.jsonl"),
        (
            ["-m", "lorapar.evaluate"],
            ["--batch-size", "0", "--data", "d.jsonl"],
            "--batch-size 0: expected a value > 0",
        ),
        (["-m", "lorapar.serve"], ["--port", "70000"], "--port 70000: expected 0..65535"),
        (["-m", "lorapar.pipeline"], ["--rl-generations", "1"], "--rl-generations 1: expected >= 2"),
    ],
)
def test_every_script_prints_one_line_and_exits_2_on_an_expected_error(tmp_path, command, flags, message):
    common = {
        "train_sft.py": ["--ckpt", "b", "--tokenizer", "t", "--out", str(tmp_path / "o")],
        "train_rl.py": ["--ckpt", "b", "--tokenizer", "t", "--out", str(tmp_path / "o")],
        "score.py": ["--ckpt", "b", "--tokenizer", "t", "--out", str(tmp_path / "o")],
        "classify.py": ["--out", str(tmp_path / "o.jsonl")],
        "lorapar.evaluate": ["--ckpt", "b", "--tokenizer", "t", "--out", str(tmp_path / "o.json")],
        "lorapar.serve": ["--ckpt", "b"],
        "lorapar.pipeline": ["--out", str(tmp_path / "o")],
    }[command[-1]]
    env = {k: v for k, v in os.environ.items() if k != "LORAPAR_TRACEBACK"}
    command = [str(REPO / command[0])] if command[0].endswith(".py") else command
    result = subprocess.run(
        [sys.executable, *command, *common, *flags],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert result.returncode == 2, result.stderr
    # One line, or argparse's usage block before its one-line error where the script reports through it.
    usage = lines[0].startswith("usage:")
    assert "Traceback" not in result.stderr and message in lines[-1] and (usage or len(lines) == 1), result.stderr
