"""Run directories: an exclusive lock naming its holder, stale locks taken over, and --overwrite that
deletes nothing until the new run's inputs have loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_sft import (
    REPO,
    setup,  # noqa: F401  (the tiny base model + arithmetic data fixture)
)
from test_sft import run as run_sft

import score
from lorapar import runlock
from lorapar.data import DataError


def hold_lock(target: Path, is_dir: bool = True) -> subprocess.Popen:
    """Another live process holding `target`'s lock, as a running script would."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from lorapar import runlock; "
            f"runlock.acquire(sys.argv[1], is_dir={is_dir}); print('held', flush=True); time.sleep(60)",
            str(target),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_is_refused_with_the_holders_pid_and_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(runlock.RunLocked, match=f"run is in use by process {holder.pid}"):
            runlock.acquire(str(tmp_path / "run"))
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "run" / runlock.LOCK_NAME).read_text().strip() == str(holder.pid)  # left behind: stale
    runlock.acquire(str(tmp_path / "run"))
    assert (tmp_path / "run" / runlock.LOCK_NAME).read_text().strip() != str(holder.pid)
    runlock.release(str(tmp_path / "run"))


def test_train_sft_refuses_a_run_directory_in_use_and_writes_nothing(setup, asset, tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        with pytest.raises(runlock.RunLocked, match=f"in use by process {holder.pid}"):
            run_sft(setup, asset, out, "--max-steps", "1")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [runlock.LOCK_NAME]


def test_train_sft_overwrite_with_bad_data_keeps_the_previous_run(setup, asset, tmp_path):
    out = tmp_path / "run"
    run_sft(setup, asset, out, "--max-steps", "1")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a\\n#### 1"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        run_sft((setup[0], setup[1], str(bad)), asset, out, "--max-steps", "1", "--overwrite")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # not a byte of the finished run changed
    run_sft(setup, asset, out, "--max-steps", "2", "--overwrite")  # good inputs: replaced
    assert (out / "checkpoints" / "step-000002").is_dir() and not (out / "checkpoints" / "step-000001").exists()


def test_score_overwrite_with_bad_data_keeps_the_previous_results(tmp_path):
    out = tmp_path / "scores"
    out.mkdir()
    for name in ("config.json", "masks.safetensors", "report.json"):
        (out / name).write_text(f"previous {name}\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a", "system": 1}\n[1, 2]\n')
    cfg = score.ScoreArgs(ckpt="base", tokenizer="tok.model", data=str(bad), out=str(out), overwrite=True)
    with pytest.raises(DataError, match="bad.jsonl:2"):
        score.run_scoring(cfg)
    assert all((out / n).read_text() == f"previous {n}\n" for n in ("config.json", "masks.safetensors", "report.json"))


def test_the_pipeline_refuses_an_out_directory_in_use_and_writes_nothing(tmp_path):
    from lorapar import pipeline

    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        with pytest.raises(runlock.RunLocked, match=f"in use by process {holder.pid}"):
            pipeline.main(["--smoke", "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [runlock.LOCK_NAME]
