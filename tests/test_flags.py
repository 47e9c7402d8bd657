"""Every numeric flag is checked in its dataclass, before anything is written; a diverging run stops.

The checks live in each config's __post_init__, so the command line, the pipeline and Python callers
all get them; the scripts print one line and exit 2 for them (tests/test_errors.py runs that).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pkgutil
from pathlib import Path

import pytest
from test_sft import run as run_sft
from test_sft import setup  # noqa: F401  (the tiny base model + arithmetic data fixture)

import classify
import lorapar
import score
import train_rl
import train_sft
from lorapar.errors import FlagError
from lorapar.evaluate import EvalArgs
from lorapar.evaluate import run as evaluate_run
from lorapar.grpo import GRPOArgs
from lorapar.importance import ImportanceArgs
from lorapar.lora import LoraArgs
from lorapar.lora_init import LoraInit
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
        (LoraArgs, "pissa_niter", -1, ">= 0"),
        (ImportanceArgs, "init_std", -0.1, ">= 0"),
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


def config_classes() -> list[type]:
    """Every dataclass of the library and the scripts."""
    modules = [importlib.import_module(m.name) for m in pkgutil.walk_packages(lorapar.__path__, "lorapar.")]
    modules += [score, train_sft, train_rl, classify]
    return [
        value
        for module in modules
        for value in vars(module).values()
        if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == module.__name__
    ]


def test_the_lora_init_settings_have_one_definition():
    """--init, --init-std and --pissa-niter are LoraInit's fields in every config that has them: inherited as
    they are, or (score.py's init) re-defaulted by config.field_of, which keeps LoraInit's very metadata. A
    config that declares one again with its own help, or outside LoraInit, fails here."""
    declared = {f.name: f for f in dataclasses.fields(LoraInit)}
    having = set()
    for cls in config_classes():
        for f in dataclasses.fields(cls):
            if cls is LoraInit or f.name not in declared:
                continue
            having.add((cls.__name__, f.name))
            where = f"{cls.__module__}.{cls.__name__}.{f.name}"
            assert issubclass(cls, LoraInit), f"{where} is declared outside LoraInit"
            assert f.metadata is declared[f.name].metadata, f"{where} has its own help/choices, not LoraInit's"
            assert f.type == declared[f.name].type, where
            if f is not declared[f.name]:  # re-declared: only for another default, only through field_of
                assert (cls, f.name, f.default) == (ImportanceArgs, "init", "gaussian"), where
    assert {(c, n) for c in ("LoraArgs", "ImportanceArgs") for n in declared} <= having


def option_help(script, flag: str, capsys) -> str:
    """The --help entry of `flag` of a script, on one line."""
    with pytest.raises(SystemExit):
        script.parse_config(["--help"])
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(flag + " "))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" " * 10))
    return " ".join(" ".join(lines[start:end]).split())


def test_score_draws_gaussian_by_default_and_the_training_scripts_lora(capsys):
    """One --init with two defaults: score.py's gaussian (with B = 0 every A-score is zero), the training
    scripts' lora; the same help text around them, and --init-std / --pissa-niter the same in all three."""
    paths = ["--ckpt", "c", "--tokenizer", "t", "--data", "d", "--out", "o"]
    _, importance, _ = score.parse_config(paths)
    assert (importance.init, importance.init_std, importance.pissa_niter) == ("gaussian", 0.01, 0)
    assert importance.lora_args().init == "gaussian"
    _, _, lora = train_sft.parse_config(paths)
    assert (lora.init, lora.init_std, lora.pissa_niter) == ("lora", 0.01, 0)
    helps = {s: option_help(s, "--init", capsys) for s in (score, train_sft, train_rl)}
    assert helps[score].endswith("(default: 'gaussian')"), helps[score]
    for script in (train_sft, train_rl):
        assert helps[script] == helps[score].replace("'gaussian')", "'lora')"), helps[script]
    for flag in ("--init-std", "--pissa-niter"):
        assert len({option_help(s, flag, capsys) for s in (score, train_sft, train_rl)}) == 1, flag


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
