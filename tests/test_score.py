import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import score
from lorapar.adapter import adapter_fingerprint, load_adapter
from lorapar.checkpoint import load_model, save_model
from lorapar.config import ModelArgs
from lorapar.data import load_examples
from lorapar.importance import ImportanceArgs, encode_for_scoring, score_rows, select_examples
from lorapar.lora import adapter_state_dict, apply_lora
from lorapar.masks import load_masks
from lorapar.model import Transformer
from lorapar.partition import PartitionArgs, partition, stage_overlap

SMALL_LLAMA = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=128)


def write_checkpoint(path, vocab_size):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=vocab_size, **SMALL_LLAMA))
    model.init_weights(seed=0)
    save_model(model, str(path), format="hf")
    return str(path)


def write_labelled(path, systems=(1, 2)):
    rows = []
    for i in range(8):
        system = systems[i % len(systems)]
        answer = f"{i} plus {i} is {2 * i}.\n#### {2 * i}" if system == 2 else f"#### {i}"
        rows.append({"format": "gsm8k", "question": f"What is {i} plus {i}?", "answer": answer, "system": system})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def inputs(tmp_path, asset):
    tokenizer = str(asset("models/llama2-tokenizer.model"))
    return dict(
        ckpt=write_checkpoint(tmp_path / "base", 32000),
        tokenizer=tokenizer,
        data=write_labelled(tmp_path / "labelled.jsonl"),
    )


def argv(inputs, out, *extra):
    return [
        "--ckpt",
        inputs["ckpt"],
        "--tokenizer",
        inputs["tokenizer"],
        "--data",
        inputs["data"],
        "--out",
        str(out),
        "--samples",
        "3",
        "--max-len",
        "48",
        "--template",
        "plain",
        "--rank",
        "2",
        "--lora-alpha",
        "4",
        "--targets",
        "q,v,down",
        *extra,
    ]


def test_score_writes_consistent_outputs(inputs, tmp_path):
    out = tmp_path / "score"
    result = score.main(argv(inputs, out, "--theta", "0.8", "--alpha", "0.5", "--random-baseline", "--seed", "3"))
    for name in (
        "config.json",
        "importance.safetensors",
        "masks.safetensors",
        "random_masks.safetensors",
        "report.json",
    ):
        assert (out / name).is_file(), name

    # masks are keyed exactly like the adapter the training scripts build
    model = load_model(inputs["ckpt"])
    apply_lora(model, ImportanceArgs(rank=2, lora_alpha=4.0, targets=("q", "v", "down")).lora_args())
    adapter = adapter_state_dict(model)
    stages = load_masks(str(out / "masks.safetensors"))
    assert set(stages) == {"stage1", "stage2"}
    for masks in stages.values():
        assert set(masks) == set(adapter)
        assert all(masks[k].shape == adapter[k].shape and masks[k].dtype == torch.bool for k in adapter)

    # the masks are the partition of the saved scores
    raw = load_file(str(out / "importance.safetensors"))
    scores = {s: {k: raw[f"system{s}.{k}"] for k in adapter} for s in (1, 2)}
    assert len(raw) == 2 * len(adapter) and all(v.any() for v in scores[2].values())
    expected = partition(scores[1], scores[2], PartitionArgs(theta=0.8, alpha=0.5)).stage_masks()
    for stage in ("stage1", "stage2"):
        assert all(torch.equal(stages[stage][k], expected[stage][k]) for k in adapter)

    random_stages = load_masks(str(out / "random_masks.safetensors"))
    assert stage_overlap(random_stages) == stage_overlap(stages)  # global scope: sizes and overlap of the stages
    assert safe_open(str(out / "random_masks.safetensors"), "pt").metadata()["random_scope"] == "global"

    report = json.loads((out / "report.json").read_text())
    assert report == result["report"]
    assert report["random_baseline"]["scope"] == "global" and report["random_baseline"]["seed"] == 3
    baseline = report["random_baseline"]
    assert baseline["counts"] == baseline["importance_counts"] == stage_overlap(stages)
    assert report["seed"] == 3 and report["adapter_init"] == {
        "dir": "adapter_init",
        "init": "gaussian",
        "seed": 3,
        "base_dtype": "float32",
        "sha256": adapter_fingerprint(str(out / "adapter_init")),
    }
    for name in ("masks.safetensors", "random_masks.safetensors"):  # the adapter whose elements the masks rank
        assert safe_open(str(out / name), "pt").metadata()["adapter_init_sha256"] == report["adapter_init"]["sha256"]
    total = report["partition"]["total"]
    assert total["elements"] == sum(v.numel() for v in adapter.values())
    c = total["count"]
    assert c["system1_only"] + c["system2_only"] + c["shared"] + c["neither"] == total["elements"]
    assert c["stage1"] == sum(int(m.sum()) for m in stages["stage1"].values())
    assert set(report["partition"]["by_module"]) == {"q_proj", "v_proj", "down_proj"}
    assert report["scoring"]["system1"]["scored"] == 3 and report["scoring"]["system2"]["available"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["PartitionArgs"]["theta"] == 0.8 and config["ImportanceArgs"]["rank"] == 2
    assert config["ImportanceArgs"]["init"] == "gaussian" and config["ImportanceArgs"]["seed"] == 3


def test_refuses_to_overwrite_without_flag_and_run_scoring_in_process(inputs, tmp_path):
    out = tmp_path / "score"
    cfg = score.ScoreArgs(ckpt=inputs["ckpt"], tokenizer=inputs["tokenizer"], data=inputs["data"], out=str(out))
    importance = ImportanceArgs(samples=2, max_len=40, rank=2, targets=("q",), template="plain")
    first = score.run_scoring(cfg, importance, PartitionArgs(theta=1.0))
    c = first["report"]["partition"]["total"]["count"]
    assert c["system1"] == c["stage1"] and c["neither"] == first["report"]["partition"]["total"]["elements"] - (
        c["system1"] + c["system2"] - c["shared"]
    )
    with pytest.raises(FileExistsError, match="already holds results.*--overwrite"):
        score.run_scoring(cfg, importance)
    cfg.overwrite = True
    second = score.run_scoring(cfg, importance, PartitionArgs(theta=1.0))
    assert second["report"]["partition"] == first["report"]["partition"]  # seeded: the same run again


def test_data_without_one_system_is_an_error(inputs, tmp_path):
    inputs["data"] = write_labelled(tmp_path / "only1.jsonl", systems=(1,))
    with pytest.raises(ValueError, match=r"only1\.jsonl: no System-2 rows"):
        score.main(argv(inputs, tmp_path / "out"))


def test_tokenizer_that_does_not_fit_the_checkpoint(inputs, tmp_path):
    inputs["ckpt"] = write_checkpoint(tmp_path / "small_vocab", 128)
    with pytest.raises(ValueError, match="tokenizer has 32000 pieces"):
        score.main(argv(inputs, tmp_path / "out"))


@pytest.mark.parametrize(
    "flag,value,message",
    [("--theta", "0", "theta must be in"), ("--alpha", "1.5", "alpha must be in"), ("--beta", "-1", "beta must be in")],
)
def test_bad_fractions_on_the_command_line(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        score.parse_config(["--ckpt", "c", "--tokenizer", "t", "--data", "d", "--out", "o", flag, value])
    assert message in capsys.readouterr().err


def test_plot_when_matplotlib_is_installed(inputs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "score"
    score.main(argv(inputs, out))
    assert (out / "importance.png").read_bytes()[:4] == b"\x89PNG"
    assert "importance.png" in json.loads((out / "report.json").read_text())["files"]
    assert not math.isnan(json.loads((out / "report.json").read_text())["partition"]["active_fraction"]["stage1"])


def test_adapter_init_is_the_scored_adapter_and_report_names_the_sampled_lines(inputs, tmp_path):
    out = tmp_path / "score"
    score.main(argv(inputs, out, "--seed", "4", "--samples", "2", "--random-baseline", "--random-scope", "per_tensor"))
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in open(inputs["data"])]
    for system in (1, 2):
        lines = report["scoring"][f"system{system}"]["lines"]
        assert len(lines) == 2 == len(set(lines)) and lines == sorted(lines)
        assert all(rows[n - 1]["system"] == system for n in lines), (system, lines)  # 1-based lines of --data

    # the scores are reproduced, bit for bit, by scoring the saved adapter_init again on those lines
    model = load_model(inputs["ckpt"])
    lora_args = load_adapter(model, str(out / "adapter_init"))
    assert (lora_args.r, lora_args.alpha, lora_args.init, lora_args.seed) == (2, 4.0, "gaussian", 4)
    importance = ImportanceArgs(samples=2, max_len=48, template="plain", rank=2, lora_alpha=4.0, seed=4)
    examples = load_examples(inputs["data"], "labelled")
    raw = load_file(str(out / "importance.safetensors"))
    for system in (1, 2):
        chosen, _ = select_examples(examples, system, 2, 4)
        assert [e.line for e in chosen] == report["scoring"][f"system{system}"]["lines"]
        scores, _ = score_rows(
            model, encode_for_scoring(chosen, tokenizer_of(inputs), importance).rows, batch_size=importance.batch_size
        )
        assert all(torch.equal(scores[k], raw[f"system{system}.{k}"]) for k in scores)

    # --random-scope per_tensor: each tensor's count, recorded as such
    stages = load_masks(str(out / "masks.safetensors"))
    random_stages = load_masks(str(out / "random_masks.safetensors"))
    for stage in ("stage1", "stage2"):
        assert all(int(random_stages[stage][k].sum()) == int(stages[stage][k].sum()) for k in stages[stage])
    assert safe_open(str(out / "random_masks.safetensors"), "pt").metadata()["random_scope"] == "per_tensor"
    assert report["random_baseline"]["scope"] == "per_tensor"


def tokenizer_of(inputs):
    from lorapar.tokenizer import Tokenizer

    return Tokenizer(inputs["tokenizer"])
