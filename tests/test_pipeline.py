"""The pipeline's --smoke run end to end: every stage, every row of the table, then a resumed run."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

from lorapar import pipeline
from lorapar.config import save_config
from lorapar.report import format_report


def _stage_files(out: str) -> dict[str, float]:
    """Modification times of everything the stages wrote (the assets excluded: they are reused by design)."""
    found = {}
    for root, _, files in os.walk(out):
        if os.path.relpath(root, out).split(os.sep)[0] == "assets":
            continue
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, out)] = os.stat(path).st_mtime_ns
    return found


def test_smoke_run_writes_every_row_then_resumes(tmp_path, capsys):
    out = str(tmp_path / "run")
    results = pipeline.main(["--smoke", "--threads", "1", "--out", out])

    methods = [row["method"] for row in results["rows"]]
    assert methods == ["base", *pipeline.METHODS]
    for row in results["rows"]:
        evaluated = [row["after_sft"]] + ([row["after_rl"]] if row["method"] not in ("base", "dmlora") else [])
        for acc in evaluated:
            for key in ("system1", "system2", "overall"):
                assert 0.0 <= acc[key] <= 1.0, (row["method"], key, acc)
        if row["method"] not in ("base", "dmlora"):
            assert math.isfinite(row["sft_loss"]) and row["sft_seconds"] > 0 and row["rl_seconds"] > 0
    by_method = {row["method"]: row for row in results["rows"]}
    assert by_method["lora"]["active_sft"] == by_method["lora"]["active_rl"] == 1.0
    for method in ("lorapar", "random", "pissa"):  # masked: strictly fewer elements train
        assert 0.0 < by_method[method]["active_sft"] < 1.0 and 0.0 < by_method[method]["active_rl"] < 1.0
    # the random masks have the partition's per-tensor sizes, hence the same active share
    assert by_method["random"]["active_sft"] == pytest.approx(by_method["lorapar"]["active_sft"])
    assert by_method["random"]["active_rl"] == pytest.approx(by_method["lorapar"]["active_rl"])
    assert 0.0 < by_method["dmlora"]["active_sft"] < 1.0  # pruned expert components

    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        assert json.load(handle)["rows"] == json.loads(json.dumps(results["rows"]))
    with open(os.path.join(out, "results.md"), encoding="utf-8") as handle:
        table = handle.read()
    assert table == format_report(results) and table in capsys.readouterr().out
    for label in ("LoRA-PAR (theta 0.9)", "random masks", "PiSSA", "DM-LoRA", "Base model"):
        assert label in table
    with open(os.path.join(out, "config.json"), encoding="utf-8") as handle:
        assert json.load(handle)["PipelineConfig"]["smoke"] is True

    # A second run finds every stage complete: nothing is recomputed, no stage output is touched.
    before = _stage_files(out)
    again = pipeline.main(["--smoke", "--threads", "1", "--out", out])
    after = _stage_files(out)
    changed = sorted(p for p in before if after.get(p) != before[p] and p not in ("results.json", "results.md", "config.json"))
    assert changed == []
    assert again["rows"] == results["rows"]
    assert "skipped" in capsys.readouterr().out


def test_real_inputs_must_come_together():
    with pytest.raises(SystemExit):
        pipeline.parse_config(["--ckpt", "some/model"])


def test_unknown_method_is_an_error():
    with pytest.raises(SystemExit):
        pipeline.parse_config(["--methods", "lora,qlora"])


def test_a_changed_configuration_is_refused(tmp_path):
    cfg = pipeline.parse_config(["--smoke", "--out", str(tmp_path)])
    path = str(tmp_path / "config.json")
    save_config(path, cfg)
    pipeline.check_same_config(path, dataclasses.replace(cfg, threads=1))  # threads do not change results
    with pytest.raises(SystemExit, match="sft_lr"):
        pipeline.check_same_config(path, dataclasses.replace(cfg, sft_lr=1.0))
    pipeline.check_same_config(path, dataclasses.replace(cfg, sft_lr=1.0, overwrite=True))
