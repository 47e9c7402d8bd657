"""Every numeric flag is checked in its dataclass, before anything is written; a diverging run stops.

The checks live in each config's __post_init__, so the command line, the pipeline and Python callers
all get them; the scripts print one line and exit 2 for them (tests/test_errors.py runs that).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_sft import run as run_sft
from test_sft import setup  # noqa: F401  (the tiny base model + arithmetic data fixture)

import train_rl
import train_sft
from lorapar.errors import FlagError
from lorapar.evaluate import EvalArgs
from lorapar.evaluate import run as evaluate_run
from lorapar.grpo import GRPOArgs
from lorapar.lora import LoraArgs
from lorapar.pipeline import PipelineConfig
from lorapar.run import DivergedError
from lorapar.script_args import TrainArgs
from lorapar.serve import ServeArgs
from lorapar.teachers import TeacherArgs

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "cls, name, value, expected",
    [
        (TrainArgs, "lr", NAN, "finite"),
        (TrainArgs, "lr", INF, "finite"),
        (TrainArgs, "lr", 0.0, "> 0"),
        (TrainArgs, "max_steps", -3, ">= 0"),
        (TrainArgs, "epochs", 0, "> 0"),
        (TrainArgs, "batch_size", 0, "> 0"),
        (TrainArgs, "grad_accum", 0, "> 0"),
        (TrainArgs, "betas", (0.9,), "two numbers"),
        (TrainArgs, "betas", (0.9, 1.5), "two numbers"),
        (TrainArgs, "warmup_ratio", 1.5, r"\[0, 1\]"),
        (TrainArgs, "max_grad_norm", NAN, "finite"),
        (TrainArgs, "weight_decay", -0.1, ">= 0"),
        (GRPOArgs, "num_generations", 1, ">= 2.*group"),
        (GRPOArgs, "num_generations", 0, ">= 2"),
        (GRPOArgs, "prompts_per_step", 0, "> 0"),
        (GRPOArgs, "mu", 0, "> 0"),
        (GRPOArgs, "micro_batch", 0, "> 0"),
        (GRPOArgs, "top_p", 0.0, r"\(0, 1\]"),
        (GRPOArgs, "beta", NAN, "finite"),
        (EvalArgs, "batch_size", -1, "> 0"),
        (EvalArgs, "batch_size", 0, "> 0"),
        (EvalArgs, "limit", -3, ">= 0"),
        (EvalArgs, "timeout", 0.0, "> 0"),
        (EvalArgs, "memory_mb", -1, "> 0"),
        (EvalArgs, "k", (0,), ">= 1"),
        (LoraArgs, "alpha", NAN, "finite"),
        (TeacherArgs, "timeout", NAN, "finite"),
        (ServeArgs, "port", 70000, "65535"),
        (ServeArgs, "max_connections", 0, "> 0"),
        (PipelineConfig, "rl_generations", 1, ">= 2"),
        (PipelineConfig, "sft_lr", NAN, "finite"),
    ],
)
def test_a_value_out_of_range_names_the_flag_value_and_range(cls, name, value, expected):
    flag = "--" + name.replace("_", "-")
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    with pytest.raises(FlagError, match=f"^{flag} {shown}: expected.*{expected}"):
        cls(**{name: value})


def test_defaults_and_presets_pass_their_own_checks():
    for cls in (TrainArgs, GRPOArgs, EvalArgs, LoraArgs, TeacherArgs, ServeArgs, PipelineConfig):
        cls()
    for preset in train_sft.PRESETS.values():
        TrainArgs(**preset.get("TrainArgs", {}))
    for preset in train_rl.PRESETS.values():
        TrainArgs(**preset.get("TrainArgs", {}))
        GRPOArgs(**preset.get("GRPOArgs", {}))


@pytest.mark.parametrize(
    "script, flags",
    [
        (train_sft, ["--lr", "nan"]),
        (train_sft, ["--epochs", "0"]),
        (train_sft, ["--max-steps", "-3"]),
        (train_sft, ["--betas", "0.9"]),
        (train_sft, ["--grad-accum", "0"]),
        (train_rl, ["--num-generations", "1"]),
        (train_rl, ["--prompts-per-step", "0"]),
        (train_rl, ["--mu", "0"]),
    ],
)
def test_a_bad_flag_stops_a_script_before_its_run_directory_exists(tmp_path, script, flags):
    out = tmp_path / "run"
    with pytest.raises(FlagError, match=flags[0]):
        script.main(["--ckpt", "base", "--tokenizer", "tok.model", "--data", "data.jsonl", "--out", str(out), *flags])
    assert not out.exists()


def test_evaluate_checks_its_out_and_data_before_the_work(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    common = dict(ckpt="no-such-base", tokenizer="no-such.model", task="gsm8k")
    with pytest.raises(ValueError, match="is a directory"):
        evaluate_run(EvalArgs(**common, data=str(data), out=str(tmp_path)))
    (tmp_path / "done.json").write_text("{}")
    with pytest.raises(ValueError, match="done.json: exists; pass --overwrite"):
        evaluate_run(EvalArgs(**common, data=str(data), out=str(tmp_path / "done.json")))
    with pytest.raises(ValueError, match="empty.jsonl: no examples to evaluate"):
        evaluate_run(EvalArgs(**common, data=str(data), out=str(tmp_path / "new.json")))
    assert (tmp_path / "done.json").read_text() == "{}" and not (tmp_path / "new.json").exists()


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(setup, asset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DivergedError, match=r"step (\d+): loss (nan|inf).*last good checkpoint is .*step-") as caught:
        run_sft(setup, asset, out, "--lr", "1e30", "--max-steps", "8", "--save-every", "1", "--max-grad-norm", "0")
    step = int(caught.value.args[0].split()[1].rstrip(":"))
    lines = Path(out, "metrics.jsonl").read_text().splitlines()
    records = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in metrics")) for line in lines
    ]
    assert max(r["step"] for r in records) == step - 1  # the bad step is neither logged nor saved
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{step - 1:06d}"
    from safetensors.torch import load_file

    tensors = load_file(str(out / "checkpoints" / latest / "adapter_model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in tensors.values())
