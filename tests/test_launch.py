"""How the pipeline runs the scripts and what both training loops share: `config.to_argv` gives back every
script dataclass through its own flags, a launched script's failure names its stage, the one schedule and
the one optimizer step."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import typing

import pytest
import torch

import train_rl
import train_sft
from lorapar import stages as stages_module
from lorapar.config import add_dataclass_args, dataclass_from_args, to_argv
from lorapar.dist import DistInfo
from lorapar.dmlora.args import DualArgs
from lorapar.evaluate import EvalArgs
from lorapar.grpo import GRPOArgs
from lorapar.importance import ImportanceArgs
from lorapar.lora import LoraArgs
from lorapar.lora_settings import SHARED_LORA_FIELDS, LoraSettings
from lorapar.optim import MaskedAdamW, learning_rate, optimizer_step
from lorapar.partition import PartitionArgs
from lorapar.pipeline import PipelineConfig
from lorapar.script_args import (
    RL_PRESETS,
    SFT_PRESETS,
    ClassifyArgs,
    RLArgs,
    ScoreArgs,
    SFTArgs,
    TrainArgs,
    over_preset,
)
from lorapar.stages import StageFailed, Stages
from lorapar.teachers import TeacherArgs

SCRIPT_DATACLASSES = [
    SFTArgs,
    RLArgs,
    TrainArgs,
    ScoreArgs,
    ClassifyArgs,
    LoraSettings,
    ImportanceArgs,
    PartitionArgs,
    GRPOArgs,
    DualArgs,
    TeacherArgs,
    EvalArgs,
    PipelineConfig,
]


def _candidates(f: dataclasses.Field, value, hint) -> list:
    """Values other than the default to try for field `f` (the first one its dataclass accepts is used)."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if "choices" in f.metadata:
        return [c for c in f.metadata["choices"] if c != value]
    if hint is bool:
        return [not value]
    if hint is int:
        return [(value or 0) + 3, (value or 0) + 1, 1]
    if hint is float:
        return [0.25 if value != 0.25 else 0.5, 1.0 / 3.0, (value or 0.0) * 2 + 1.5, 0.0]
    if hint is str:
        return ["/some where/x.jsonl", "x"]
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return [(0.5, 0.75)] if item is float else [("q", "o"), ()]
    raise AssertionError(f"{f.name}: no candidate values for {hint}")


def _changed_values(cls) -> dict:
    """{field: a non-default value the dataclass accepts}, one per flag field."""
    hints, default, changed = typing.get_type_hints(cls), cls(), {}
    for f in dataclasses.fields(cls):
        for candidate in _candidates(f, getattr(default, f.name), hints[f.name]):
            try:
                dataclasses.replace(default, **{f.name: candidate})
            except (ValueError, TypeError):
                continue
            changed[f.name] = candidate
            break
    return changed


def _parse(cls, argv: list[str]):
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, cls)
    return dataclass_from_args(cls, parser.parse_args(argv))


@pytest.mark.parametrize("cls", SCRIPT_DATACLASSES, ids=lambda c: c.__name__)
def test_to_argv_gives_back_every_field_through_its_flag(cls):
    assert to_argv(cls()) == []  # the defaults need no flag
    changed = _changed_values(cls)
    # every field of a script's settings can be changed and written, or the pipeline could not run it
    names = {f.name for f in dataclasses.fields(cls)}
    assert len(changed) >= len(names) - 1, sorted(names - set(changed))
    for name, value in changed.items():  # one field at a time: that flag and no other
        config = dataclasses.replace(cls(), **{name: value})
        argv = to_argv(config)
        assert argv[0] == "--" + name.replace("_", "-") and len(argv) == 2
        assert _parse(cls, argv) == config, (name, argv)
    everything = cls()
    for name, value in changed.items():
        try:
            everything = dataclasses.replace(everything, **{name: value})
        except (ValueError, TypeError):  # two changes that exclude each other
            pass
    assert _parse(cls, to_argv(everything)) == everything


def test_to_argv_writes_floats_exactly_and_refuses_what_no_flag_can_say():
    train = TrainArgs(lr=1.0 / 3.0, betas=(0.1 + 0.2, 0.999))
    assert _parse(TrainArgs, to_argv(train)) == train  # repr: the same float, bit for bit
    assert to_argv(train, base=train) == []
    with pytest.raises(ValueError, match="SFTArgs.system: None"):
        to_argv(SFTArgs(), base=SFTArgs(system=1))
    with pytest.raises(ValueError, match="comma"):
        to_argv(LoraSettings(targets=("q,k",)))


def test_the_pipelines_commands_give_the_scripts_the_settings_it_built():
    """What Pipeline.sft / .grpo build, over their presets, is what train_sft.py / train_rl.py parse."""
    preset = SFT_PRESETS["lorapar-sft"]
    sft = over_preset(
        SFTArgs,
        preset,
        ckpt="base",
        tokenizer="tok",
        data="l.jsonl",
        format="labelled",
        template="plain",
        max_len=192,
        system=1,
        masks="m.safetensors",
        stage=1,
    )
    train = over_preset(
        TrainArgs,
        preset,
        out="o",
        seed=3,
        max_steps=4,
        lr=2e-3,
        batch_size=8,
        global_batch=8,
        save_every=2,
        resume=True,
    )
    lora = LoraSettings(rank=4, lora_alpha=16.0, targets=("q", "v"))
    argv = [
        "--preset",
        "lorapar-sft",
        *to_argv(sft, over_preset(SFTArgs, preset)),
        *to_argv(train, over_preset(TrainArgs, preset)),
        *to_argv(lora),
    ]
    got_sft, got_train, got_lora = train_sft.parse_config(argv)
    assert (got_sft, got_train) == (sft, train)
    assert (got_lora.r, got_lora.alpha, got_lora.targets, got_lora.seed) == (4, 16.0, ("q", "v"), 3)

    preset = RL_PRESETS["lorapar-grpo"]
    rl = over_preset(
        RLArgs,
        preset,
        ckpt="base",
        tokenizer="tok",
        data="l.jsonl",
        adapter="sft",
        system=2,
        rewards="correct_lenient=2.0",
    )
    grpo = over_preset(GRPOArgs, preset, num_generations=4, max_completion_len=24, beta=0.04, temperature=0.7)
    train = over_preset(TrainArgs, preset, out="o", max_steps=2, lr=1e-4, overwrite=True)
    argv = [
        "--preset",
        "lorapar-grpo",
        *to_argv(rl, over_preset(RLArgs, preset)),
        *to_argv(grpo, over_preset(GRPOArgs, preset)),
        *to_argv(train, over_preset(TrainArgs, preset)),
    ]
    assert train_rl.parse_config(argv) == (rl, grpo, train, None)


def test_lora_alpha_fills_lora_alpha_in_every_command():
    """--lora-alpha is LoraSettings.lora_alpha for the training scripts, score.py and the pipeline alike."""
    for cls in (ImportanceArgs, PipelineConfig):
        assert issubclass(cls, LoraSettings)
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ImportanceArgs)
    assert parser.parse_args(["--lora-alpha", "32"]).lora_alpha == 32.0
    paths = ["--ckpt", "c", "--tokenizer", "t", "--data", "d", "--out", "o"]
    _, _, lora = train_sft.parse_config([*paths, "--lora-alpha", "32", "--rank", "4"])
    assert (lora.alpha, lora.r) == (32.0, 4)
    assert set(SHARED_LORA_FIELDS) <= {f.name for f in dataclasses.fields(LoraArgs)}
    with pytest.raises(SystemExit):  # the LoRA flags are refused beside the adapter they would contradict
        train_rl.parse_config([*paths, "--adapter", "runs/sft", "--lora-alpha", "32"])


def test_a_failed_script_names_its_stage_exit_code_and_stderr(tmp_path, capsys):
    stages = Stages(str(tmp_path), overwrite=False, total=1, threads=1)
    with pytest.raises(StageFailed) as error:
        stages.run("seed0.score", "score", lambda redo: stages.launch("score.py", ["--ckpt", "base"]))
    message = str(error.value)
    assert "stage seed0.score: score.py exited with code 2" in message
    assert "--tokenizer is required" in message and "score.py --ckpt base" in message
    assert "--tokenizer is required" in capsys.readouterr().err  # streamed while it ran, too
    assert not (tmp_path / "stages" / "seed0.score.json").exists()  # a failed stage is no completed one


def test_a_launched_script_gets_the_threads_and_its_command_is_recorded(tmp_path, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a\nb\n#### {i}"}) + "\n" for i in range(3)))
    seen, real_popen = [], subprocess.Popen

    def popen(command, **kwargs):
        seen.append(kwargs["env"])
        return real_popen(command, **kwargs)

    monkeypatch.setattr(stages_module.subprocess, "Popen", popen)
    stages = Stages(str(tmp_path), overwrite=False, total=1, threads=1)
    labels = ClassifyArgs(data=str(data), out=str(tmp_path / "labelled.jsonl"))
    argv = [*to_argv(labels), "--teacher", "rule:gsm8k-steps"]
    stages.run("classify", "classify", lambda redo: stages.launch("classify.py", argv) or {})
    assert seen[0]["OMP_NUM_THREADS"] == "1"
    record = json.loads((tmp_path / "stages" / "classify.json").read_text())
    assert record["commands"][0].endswith("classify.py " + " ".join(argv))
    assert record["cpu_seconds"] > 0.5  # the script's own CPU time, not only this process's
    assert len((tmp_path / "labelled.jsonl").read_text().splitlines()) == 3


def test_sigterm_takes_down_the_script_a_stage_is_running(tmp_path):
    """A script that writes nothing (so no broken pipe would end it once its parent is gone) must go down
    with the process running its stage when that process gets SIGTERM (stages.exit_on_sigterm)."""
    sleeper, pid_file = tmp_path / "sleeper.py", tmp_path / "sleeper.pid"
    sleeper.write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(300)\n")
    program = (
        "from lorapar.stages import Stages, exit_on_sigterm\n"
        "exit_on_sigterm()\n"
        f"stages = Stages({str(tmp_path)!r}, overwrite=False, total=1)\n"
        f"stages.run('sleep', 'sleep', lambda redo: stages.launch({str(sleeper)!r}, [{str(pid_file)!r}]) or {{}})\n"
    )
    runner = subprocess.Popen([sys.executable, "-c", program], cwd=stages_module.ROOT)
    sleeper_pid = None
    try:
        deadline = time.time() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        sleeper_pid = int(pid_file.read_text())
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=30) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):  # terminated and reaped before the runner exited
            os.kill(sleeper_pid, 0)
    finally:
        runner.kill()
        runner.wait()
        if sleeper_pid is not None:
            try:
                os.kill(sleeper_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_one_schedule_for_training_and_pretraining():
    # pretrain.py's cosine with an absolute floor, written as it was before the schedules were one
    old = [
        3e-3 * (s + 1) / 30
        if s < 30
        else 3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + math.cos(math.pi * min(1.0, (s - 30) / max(1, 700 - 30))))
        for s in range(700)
    ]
    assert [learning_rate(s, 700, 3e-3, 30, "cosine", 3e-4) for s in range(700)] == old  # bit for bit
    assert [learning_rate(s, 10, 1.0, 0, "linear") for s in (0, 5)] == [1.0, 0.5]
    assert learning_rate(9, 10, 1.0, 2, "constant") == 1.0


def test_optimizer_step_sets_the_lr_clips_steps_and_releases_the_gradients():
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = MaskedAdamW([p], lr=1.0, weight_decay=0.0)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    norm = optimizer_step(optimizer, [p], DistInfo(), lr=0.1, max_grad_norm=1.0)
    assert float(norm) == pytest.approx(5.0) and p.grad is None
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert torch.allclose(p.detach(), torch.tensor([-0.1, -0.1, 0.0, 0.0]), atol=1e-6)  # Adam's first step: lr * sign
    p.grad = torch.ones(4)
    assert optimizer_step(optimizer, [p], DistInfo(), lr=0.1, max_grad_norm=0.0, zero_grad=False) is None
    assert torch.equal(p.grad, torch.ones(4))  # kept for a caller that reads them after the update (DM-LoRA)
