"""The pipeline's --smoke run end to end: every stage, every row over two seeds, the theta sweep, the
statistics, a resumed run, and the report rebuilt from the run directory alone."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lorapar import pipeline, report
from lorapar.config import save_config


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


def _read(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pipeline") / "run")
    return out, pipeline.main(["--smoke", "--threads", "1", "--out", out])


def test_smoke_run_writes_every_row_over_every_seed(smoke):
    out, results = smoke
    assert results["seeds"] == [0, 1]
    assert [row["method"] for row in results["rows"]] == ["base", *pipeline.METHODS]
    for row in results["rows"]:
        phases = [row["after_sft"]] + ([row["after_rl"]] if row["method"] not in ("base", "dmlora") else [])
        for acc in phases:
            for key in ("system1", "system2", "overall"):
                per_seed = acc[key]["per_seed"]
                assert len(per_seed) == (1 if row["method"] == "base" else 2) and all(0 <= v <= 1 for v in per_seed)
                assert acc[key]["mean"] == pytest.approx(sum(per_seed) / len(per_seed))
        if row["method"] not in ("base", "dmlora"):
            assert math.isfinite(row["sft_loss"]) and row["sft_seconds"] > 0 and row["rl_seconds"] > 0
            assert 0.0 <= row["pass_at_g"] <= 1.0
    by_method = {row["method"]: row for row in results["rows"]}
    assert by_method["lora"]["active_sft"] == by_method["lora"]["active_rl"] == 1.0
    for method in ("lorapar", "random", "pissa"):  # masked: strictly fewer elements train
        assert 0.0 < by_method[method]["active_sft"] < 1.0 and 0.0 < by_method[method]["active_rl"] < 1.0
    # the random masks are as large as the partition's
    assert by_method["random"]["active_sft"] == pytest.approx(by_method["lorapar"]["active_sft"])
    assert by_method["random"]["active_rl"] == pytest.approx(by_method["lorapar"]["active_rl"])
    assert 0.0 < by_method["dmlora"]["active_sft"] < 1.0  # pruned expert components

    names = {(c["name"], c["subset"]) for c in results["comparisons"]}
    assert ("LoRA-PAR vs LoRA+RL, after RL", "overall") in names
    assert ("importance vs random masks, after SFT", "overall") in names
    assert ("GRPO vs SFT on S2: LoRA-PAR", "system2") in names
    for c in results["comparisons"]:
        assert c["low"] <= c["diff"] + 1e-12 and c["diff"] <= c["high"] + 1e-12 and c["seeds"] == 2
    assert [p["theta"] for p in results["theta_curve"]] == [0.5, 0.9]
    small, large = results["theta_curve"]
    assert 0 < small["active_stage1"] < large["active_stage1"] < 1


def test_seeds_change_the_adapter_init_and_the_data_order(smoke):
    out, _ = smoke
    from safetensors.torch import load_file

    inits = [
        load_file(os.path.join(out, f"seed{s}", "score", "adapter_init", "adapter_model.safetensors")) for s in (0, 1)
    ]
    assert inits[0].keys() == inits[1].keys()
    assert all(not torch.equal(inits[0][k], inits[1][k]) for k in inits[0])
    for method in ("lora", "lorapar"):
        seeds = [
            _read(os.path.join(out, f"seed{s}", method, "sft", "config.json"))["TrainArgs"]["seed"] for s in (0, 1)
        ]
        assert seeds == [0, 1]
    # the training seed sets the order of the SFT batches (as train_sft.py builds its sampler)
    from lorapar.batching import LengthGroupedSampler

    lengths = [5] * 64
    orders = [list(LengthGroupedSampler(lengths, batch_size=8, seed=s)) for s in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]
    # and the evaluations of the two seeds differ somewhere: they are separate runs, not copies
    evals = [_read(os.path.join(out, f"seed{s}", "lora", "eval_sft.json"))["records"] for s in (0, 1)]
    assert [r["completion"] for r in evals[0]] != [r["completion"] for r in evals[1]]


def test_records_keep_the_exact_prompts_and_the_report_rebuilds_from_the_files(smoke):
    out, results = smoke
    records = _read(os.path.join(out, "seed0", "lorapar", "eval_rl.json"))["records"]
    test_rows = [json.loads(line) for line in open(os.path.join(out, "assets", "test.jsonl"), encoding="utf-8")]
    assert [r["prompt"] for r in records] == [
        f"Question: {row['question']}\nAnswer:" for row in test_rows[: len(records)]
    ]
    with open(os.path.join(out, "results.md"), encoding="utf-8") as handle:
        table = handle.read()
    for label in (
        "LoRA+RL",
        "LoRA-PAR (theta 0.9)",
        "random masks",
        "PiSSA",
        "DM-LoRA",
        "Base model",
        "theta curve",
        "Paired differences",
        "This run cannot resolve",
    ):
        assert label in table
    os.remove(os.path.join(out, "results.md"))
    os.remove(os.path.join(out, "results.json"))
    rebuilt = report.main([out])
    with open(os.path.join(out, "results.md"), encoding="utf-8") as handle:
        assert handle.read() == table == rebuilt["markdown"]
    assert _read(os.path.join(out, "results.json"))["rows"] == json.loads(json.dumps(results["rows"]))
    # a changed per-item record changes the table: it is computed from the files, not remembered
    path = os.path.join(out, "seed0", "lora", "eval_sft.json")
    saved = _read(path)
    edited = json.loads(json.dumps(saved))
    for r in edited["records"]:
        r["correct"] = True
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(edited, handle)
    try:
        row = next(r for r in report.build_results(out)["rows"] if r["method"] == "lora")
        assert row["after_sft"]["overall"]["per_seed"][0] == 1.0
    finally:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(saved, handle)
    with pytest.raises(FileNotFoundError, match="config.json"):
        report.main([os.path.join(out, "seed0")])


def test_a_test_split_without_system_labels_reports_the_overall_column_only(smoke, tmp_path):
    """GSM8K's own test rows carry no `system` field: the report keeps every overall number and interval and
    leaves the per-system cells empty (their empty subsets once made the paired bootstrap raise)."""
    out, results = smoke
    run = str(tmp_path / "run")
    shutil.copytree(out, run, ignore=shutil.ignore_patterns(".lorapar.lock"))
    for name in os.listdir(os.path.join(run, "stages")):
        file = _read(os.path.join(run, "stages", name))["result"].get("file")
        if file:
            evaluation = _read(os.path.join(run, file))
            for record in evaluation["records"]:
                record.pop("system")
            with open(os.path.join(run, file), "w", encoding="utf-8") as handle:
                json.dump(evaluation, handle)
    unlabelled = report.build_results(run)
    assert unlabelled["test_items_by_system"] == {"1": 0, "2": 0}
    for row, full in zip(unlabelled["rows"], results["rows"]):
        for phase in ("after_sft", "after_rl"):
            if full[phase]:
                assert row[phase] == {"overall": full[phase]["overall"]}
    overall = [c for c in results["comparisons"] if c["subset"] == "overall"]
    assert json.loads(json.dumps(unlabelled["comparisons"])) == json.loads(json.dumps(overall)) and overall
    markdown = report.format_report(unlabelled)
    assert "no `system` field" in markdown and re.search(r"\bnan\b", markdown) is None
    assert "| LoRA-PAR vs LoRA+RL, after RL | all |" in markdown and "| S2 |" not in markdown


def test_a_second_run_skips_every_completed_stage(smoke, capsys):
    out, results = smoke
    before = _stage_files(out)
    again = pipeline.main(["--smoke", "--threads", "1", "--out", out])
    after = _stage_files(out)
    rebuilt = (
        "results.json",
        "results.md",
        "config.json",
        "inputs.json",
        "theta.png",
        ".lorapar.lock",
    )  # the run lock holds the PID of the run that took it
    assert sorted(p for p in before if after.get(p) != before[p] and p not in rebuilt) == []
    assert again["rows"] == json.loads(json.dumps(results["rows"]))
    assert "skipped" in capsys.readouterr().out


def test_real_inputs_must_come_together():
    with pytest.raises(SystemExit):
        pipeline.parse_config(["--ckpt", "some/model"])


def test_bad_methods_seeds_and_thetas_are_errors():
    for argv in (["--methods", "lora,qlora"], ["--seeds", "0"], ["--theta-sweep", "0.5,1.5"]):
        with pytest.raises(SystemExit):
            pipeline.parse_config(argv)


def test_a_changed_configuration_is_refused(tmp_path):
    cfg = pipeline.parse_config(["--smoke", "--out", str(tmp_path)])
    path = str(tmp_path / "config.json")
    save_config(path, cfg)
    pipeline.check_same_config(path, dataclasses.replace(cfg, threads=1))  # threads do not change results
    with pytest.raises(SystemExit, match="sft_lr"):
        pipeline.check_same_config(path, dataclasses.replace(cfg, sft_lr=1.0))
    pipeline.check_same_config(path, dataclasses.replace(cfg, sft_lr=1.0, overwrite=True))


def test_masked_rows_wait_for_their_seeds_score_job_and_other_jobs_wait_for_none():
    jobs = pipeline.Pipeline(pipeline.parse_config(["--theta-sweep", "0.3,0.9"])).jobs()
    order = [job for job, _ in jobs]
    assert len(order) == len(set(order))
    rows = [job for job in order if job[0] == "row"]
    assert sorted((seed, what[0]) for _, seed, what in rows) == sorted(
        (seed, method) for seed in (0, 1, 2) for method in pipeline.METHODS
    )
    assert [job for job in order if job[0] == "sweep"] == [("sweep", 0, (0.3,))]  # 0.9 is the LoRA-PAR/random rows
    for job, after in jobs:
        if job[0] == "row" and job[2][0] in ("lorapar", "random", "pissa"):
            assert after == ("score", job[1], ("gaussian", "pissa")) and order.index(after) < order.index(job)
        else:
            assert after is None, job
    only_lora = pipeline.Pipeline(pipeline.parse_config(["--methods", "lora,dmlora"])).jobs()
    assert not [job for job, _ in only_lora if job[0] == "score"]  # nothing to score for rows without masks


def test_a_one_seed_report_gives_each_accuracy_its_interval_over_the_test_items(smoke, tmp_path):
    out, results = smoke
    run = str(tmp_path / "run")
    shutil.copytree(out, run, ignore=shutil.ignore_patterns(".lorapar.lock"))
    config = _read(os.path.join(run, "config.json"))
    config["PipelineConfig"]["seeds"] = 1
    with open(os.path.join(run, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    one = report.build_results(run)
    for row in one["rows"]:
        for phase in ("after_sft", "after_rl"):
            for key, value in (row[phase] or {}).items():
                assert len(value["per_seed"]) == 1 and value["low"] <= value["mean"] <= value["high"], (row, key)
                if 0 < value["mean"] < 1:  # items disagree: the interval has a width
                    assert value["low"] < value["high"]
    markdown = report.format_report(one)
    assert "95% bootstrap interval over the test items" in markdown
    assert re.search(r"\| \d+\.\d \[\d+\.\d, \d+\.\d\] \|", markdown)  # a cell "mean [low, high]"
    assert "mean ± std" in report.format_report(results)  # two seeds keep mean ± std


def test_the_report_names_random_masks_only_beside_their_rows_and_says_what_its_verdicts_hold_for(smoke):
    _, results = smoke
    markdown = report.format_report(results)
    assert "Random masks: score.py's random baseline" in markdown and "holds for this tiny model and task" in markdown
    real = json.loads(json.dumps(results))  # a real-input run with no random-mask row and no theta curve
    real["config"]["ckpt"] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    real["rows"] = [row for row in real["rows"] if row["method"] != "random"]
    real["theta_curve"] = []
    markdown = report.format_report(real)
    assert "Random masks:" not in markdown and "tiny model" not in markdown
    assert "holds for this base model, test split and budget only" in markdown


def _live_processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process that is not a zombie (Linux /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if fields[0] != "Z":
            found[int(entry)] = (int(fields[1]), command)
    return found


def _descendants(pid: int, processes: dict[int, tuple[int, str]]) -> set[int]:
    children = {child for child, (parent, _) in processes.items() if parent == pid}
    return children.union(*(_descendants(child, processes) for child in children))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
def test_sigterm_takes_the_pool_workers_and_the_scripts_they_run_down(tmp_path):
    """By default SIGTERM ends the pipeline at once and leaves its pool workers and the stage scripts they
    launched running, writing into a run directory that no one holds. It must take every one of them down."""
    out = str(tmp_path / "run")
    command = [sys.executable, "-m", "lorapar.pipeline", "--smoke", "--threads", "1", "--workers", "2", "--out", out]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, family = time.time() + 300, set()
        while time.time() < deadline and run.poll() is None:
            processes = _live_processes()
            family = _descendants(run.pid, processes)
            if any("score.py" in processes[pid][1] and processes[pid][0] != run.pid for pid in family):
                break  # a worker is running a script
            time.sleep(0.2)
        else:
            pytest.fail(f"no worker launched score.py (pipeline exit code {run.poll()})")
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.time() + 30
        while family & set(_live_processes()) and time.time() < deadline:
            time.sleep(0.2)
        left = {pid: command for pid, (_, command) in _live_processes().items() if pid in family}
        assert not left, f"still running after the pipeline exited: {left}"
    finally:
        run.kill()
        run.wait()
