"""The scored adapter is the trained adapter: score.py -> OUT/adapter_init -> train_sft.py --init-adapter
-> train_rl.py, on a tiny LLaMA with the real LLaMA-2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_sft import TINY, TINY_RECIPE, adapter, write_jsonl

import score
import train_rl
import train_sft
from lorapar import launch
from lorapar.adapter import read_adapter_args
from lorapar.checkpoint import load_model, save_model
from lorapar.config import ModelArgs
from lorapar.lora import LoraArgs, apply_lora, lora_modules
from lorapar.masks import load_masks
from lorapar.model import Transformer

TARGETS = "q,v,down"


def labelled_rows(n: int) -> list[dict]:
    """System 1: the bare answer; System 2: a worked line before it (labelled as classify.py writes)."""
    rows = []
    for i in range(n):
        a, b, system = i % 7 + 1, i % 5 + 2, 1 + i % 2
        answer = f"#### {a + b}" if system == 1 else f"{a} + {b} = {a + b}\n#### {a + b}"
        rows.append({"format": "gsm8k", "question": f"What is {a} plus {b}?", "answer": answer, "system": system})
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_init")
    model = Transformer(ModelArgs(**TINY))
    model.init_weights(seed=0)
    with torch.no_grad():  # peaked logits, so that a small adapter moves the loss (as test_sft)
        model.output.weight.mul_(40)
    save_model(model, root / "base")
    return {"root": root, "base": str(root / "base"), "data": write_jsonl(root / "labelled.jsonl", labelled_rows(16))}


def tokenizer(asset) -> str:
    return str(asset("models/llama2-tokenizer.model"))


def run_score(inputs, asset, out, *extra):
    return score.main(
        [
            "--ckpt",
            inputs["base"],
            "--tokenizer",
            tokenizer(asset),
            "--data",
            inputs["data"],
            "--out",
            str(out),
            "--samples",
            "4",
            "--max-len",
            "48",
            "--template",
            "plain",
            "--rank",
            "2",
            "--lora-alpha",
            "4",
            "--targets",
            TARGETS,
            "--seed",
            "5",
            *extra,
        ]
    )


def sft_argv(inputs, asset, init_adapter, out, *extra) -> list[str]:
    return [
        "--ckpt",
        inputs["base"],
        "--tokenizer",
        tokenizer(asset),
        "--data",
        inputs["data"],
        "--format",
        "labelled",
        "--system",
        "1",
        "--out",
        str(out),
        *TINY_RECIPE,
        "--weight-decay",
        "0.1",
        "--init-adapter",
        str(init_adapter),
        *extra,
    ]


def rl_argv(inputs, asset, sft, out, *extra) -> list[str]:
    return [
        "--ckpt",
        inputs["base"],
        "--tokenizer",
        tokenizer(asset),
        "--adapter",
        str(sft),
        "--data",
        inputs["data"],
        "--format",
        "labelled",
        "--system",
        "2",
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
        "test_train_rl:characters=1.0",
        "--lr",
        "1e-2",
        "--warmup-ratio",
        "0",
        "--micro-batch",
        "4",
        "--weight-decay",
        "0.1",
        *extra,
    ]


def capture_models(monkeypatch, module, name: str) -> list:
    """Wrap module.<name>(model, ...) so that the test sees every model it built."""
    seen, original = [], getattr(module, name)

    def wrapped(model, *args, **kwargs):
        seen.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return seen


def bases(model) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().clone() for name, m in lora_modules(model).items()}


@pytest.fixture(scope="module")
def scored_once():
    return {}


@pytest.fixture
def scored(inputs, asset, scored_once) -> Path:
    """A gaussian scoring run (seed 5), made once per module."""
    if not scored_once:
        run_score(inputs, asset, inputs["root"] / "score")
        scored_once["dir"] = inputs["root"] / "score"
    return scored_once["dir"]


def test_masked_sft_and_grpo_leave_the_rest_of_adapter_init_untouched(inputs, asset, scored, tmp_path):
    init_dir = scored / "adapter_init"
    start = adapter(init_dir)
    masks = scored / "masks.safetensors"
    stages = load_masks(str(masks))
    # no --rank / --lora-alpha / --targets / --init: all from the adapter
    train_sft.main(
        sft_argv(inputs, asset, init_dir, tmp_path / "sft", "--max-steps", "3", "--masks", str(masks), "--stage", "1")
    )
    sft_config = json.loads((tmp_path / "sft" / "config.json").read_text())["LoraArgs"]
    assert (sft_config["r"], sft_config["alpha"], sft_config["init"], sft_config["seed"]) == (2, 4.0, "gaussian", 5)
    after_sft = adapter(tmp_path / "sft")
    active = sum(int(m.sum()) for m in stages["stage1"].values())
    assert 0 < active < sum(m.numel() for m in stages["stage1"].values())  # a real split, not all or nothing
    for key, mask in stages["stage1"].items():
        assert torch.equal(after_sft[key][~mask], start[key][~mask]), key
        assert (after_sft[key][mask] != start[key][mask]).all(), key

    train_rl.main(
        rl_argv(
            inputs, asset, tmp_path / "sft", tmp_path / "rl", "--max-steps", "2", "--masks", str(masks), "--stage", "2"
        )
    )
    after_rl = adapter(tmp_path / "rl")
    moved = 0
    for key in start:
        stage1, stage2 = stages["stage1"][key], stages["stage2"][key]
        neither = ~(stage1 | stage2)
        assert torch.equal(after_rl[key][neither], start[key][neither]), key
        assert torch.equal(after_rl[key][stage1 & ~stage2], after_sft[key][stage1 & ~stage2]), key
        moved += int((after_rl[key][stage2] != after_sft[key][stage2]).sum())
    assert moved > 0 and sum(int((~(stages["stage1"][k] | stages["stage2"][k])).sum()) for k in start) > 0


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_residual_base_is_the_scored_one_through_sft_and_grpo(inputs, asset, tmp_path, monkeypatch, init):
    scored = capture_models(monkeypatch, score, "apply_lora")
    loaded = capture_models(monkeypatch, launch, "load_adapter")  # both scripts load through lorapar.launch
    run_score(inputs, asset, tmp_path / "score", "--init", init)
    init_dir = tmp_path / "score" / "adapter_init"
    assert (init_dir / "adapter_init.safetensors").is_file()
    train_sft.main(sft_argv(inputs, asset, init_dir, tmp_path / "sft", "--max-steps", "2"))
    train_rl.main(rl_argv(inputs, asset, tmp_path / "sft", tmp_path / "rl", "--max-steps", "1"))
    (scored,), (trained, reinforced) = scored, loaded
    residual = bases(scored)
    original = load_model(inputs["base"]).state_dict()
    assert all(not torch.equal(w, original[f"{name}.weight"]) for name, w in residual.items())  # a real residual
    for model in (trained, reinforced):
        after = bases(model)
        assert residual.keys() == after.keys()
        assert all(torch.equal(residual[k], after[k]) for k in residual)
    scored_modules, trained_modules = lora_modules(scored), lora_modules(trained)
    for name, m in scored_modules.items():
        assert torch.equal(m.init_A, m.lora_A) and torch.equal(m.init_B, m.lora_B)  # scoring never moved the adapter
        assert torch.equal(trained_modules[name].init_A, m.init_A) and torch.equal(
            trained_modules[name].init_B, m.init_B
        )
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["LoraArgs"]["init"] == init


def test_score_draws_and_records_pissa_niter_and_train_sft_refuses_another(
    inputs, asset, tmp_path, monkeypatch, capsys
):
    """score.py --pissa-niter reaches the init (the randomized SVD's factors, not the exact ones), adapter_init/
    records it, and train_sft.py --init-adapter takes it from there: a different --pissa-niter is refused."""
    scored = capture_models(monkeypatch, score, "apply_lora")
    run_score(inputs, asset, tmp_path / "score", "--init", "pissa", "--pissa-niter", "2")
    init_dir = tmp_path / "score" / "adapter_init"
    stored = read_adapter_args(str(init_dir))
    assert (stored.init, stored.pissa_niter, stored.seed) == ("pissa", 2, 5)
    assert json.loads((tmp_path / "score" / "config.json").read_text())["ImportanceArgs"]["pissa_niter"] == 2
    shape = dict(r=2, alpha=4.0, targets=tuple(TARGETS.split(",")), init="pissa", seed=5)
    randomized, exact = load_model(inputs["base"]), load_model(inputs["base"])
    apply_lora(randomized, LoraArgs(**shape, pissa_niter=2))
    apply_lora(exact, LoraArgs(**shape, pissa_niter=0))
    (model,) = scored
    for name, m in lora_modules(model).items():
        assert torch.equal(m.init_A, lora_modules(randomized)[name].init_A), name
    assert any(not torch.equal(m.init_A, lora_modules(exact)[name].init_A) for name, m in lora_modules(model).items())
    with pytest.raises(SystemExit):
        train_sft.parse_config(sft_argv(inputs, asset, init_dir, tmp_path / "sft", "--pissa-niter", "0"))
    err = capsys.readouterr().err
    assert f"--pissa-niter 0 conflicts with the adapter in --init-adapter {init_dir}" in err, err
    assert "pissa_niter=2" in err, err
    _, _, lora = train_sft.parse_config(sft_argv(inputs, asset, init_dir, tmp_path / "sft", "--pissa-niter", "2"))
    assert (lora.init, lora.pissa_niter) == ("pissa", 2)


def test_resume_from_an_init_adapter_is_bit_identical(inputs, asset, tmp_path):
    run_score(inputs, asset, tmp_path / "score", "--init", "pissa")
    init_dir = tmp_path / "score" / "adapter_init"
    extra = ["--max-steps", "4", "--save-every", "2", "--dropout", "0.1"]
    train_sft.main(sft_argv(inputs, asset, init_dir, tmp_path / "straight", *extra))
    train_sft.main(sft_argv(inputs, asset, init_dir, tmp_path / "resumed", *extra, "--halt-at", "2"))
    train_sft.main(sft_argv(inputs, asset, init_dir, tmp_path / "resumed", *extra, "--resume"))
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["LoraArgs"]["dropout"] == 0.1


@pytest.mark.parametrize(
    "flag,value,have",
    [
        ("--rank", "4", "r=2"),
        ("--lora-alpha", "8.0", "alpha=4.0"),
        ("--targets", "q,k", "targets=('q', 'v', 'down')"),
        ("--init", "lora", "init='gaussian'"),
    ],
)
def test_a_flag_that_conflicts_with_the_init_adapter_names_both_values(
    inputs, asset, scored, tmp_path, capsys, flag, value, have
):
    init_dir = scored / "adapter_init"
    with pytest.raises(SystemExit):
        train_sft.parse_config(sft_argv(inputs, asset, init_dir, tmp_path / "sft", flag, value))
    err = capsys.readouterr().err
    assert f"{flag} {value} conflicts with the adapter in --init-adapter {init_dir}" in err and have in err, err
    # the same values as the adapter's are no conflict, in any spelling of the targets
    cfg, _, lora = train_sft.parse_config(
        sft_argv(inputs, asset, init_dir, tmp_path / "sft", "--rank", "2", "--targets", "down_proj,wq,v")
    )
    assert lora.r == 2 and lora.seed == 5 and cfg.init_adapter == str(init_dir)


def test_masks_of_another_adapter_and_another_base_dtype_are_refused(inputs, asset, scored, tmp_path):
    run_score(inputs, asset, tmp_path / "other", "--seed", "6", "--init", "pissa")
    with pytest.raises(
        ValueError, match=r"other/masks.safetensors ranks the elements of another adapter than --init-adapter"
    ):
        train_sft.main(
            sft_argv(
                inputs,
                asset,
                scored / "adapter_init",
                tmp_path / "a",
                "--masks",
                str(tmp_path / "other" / "masks.safetensors"),
                "--stage",
                "1",
            )
        )
    with pytest.raises(
        ValueError, match="scored over a float32 base, this run's base is bfloat16.*--base-dtype float32"
    ):
        train_sft.main(
            sft_argv(inputs, asset, tmp_path / "other" / "adapter_init", tmp_path / "b", "--base-dtype", "bfloat16")
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything was written
    report = json.loads((tmp_path / "other" / "report.json").read_text())["adapter_init"]
    assert report["base_dtype"] == "float32" and report["init"] == "pissa" and len(report["sha256"]) == 64


def test_init_adapter_errors_before_anything_is_written(inputs, asset, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_sft.parse_config(sft_argv(inputs, asset, tmp_path / "missing", tmp_path / "sft"))
    assert "adapter config not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_sft.parse_config(sft_argv(inputs, asset, tmp_path / "missing", tmp_path / "sft", "--adapter", "dual"))
    assert "--adapter dual" in capsys.readouterr().err
    assert not (tmp_path / "sft").exists()
