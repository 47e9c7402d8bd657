"""bench/gpu_suite.py --dry-run end to end (CPU, tiny shapes, interpreter), so the GPU suite cannot rot."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_every_part_with_real_measurements(tmp_path):
    out = tmp_path / "suite"
    env = {k: v for k, v in os.environ.items() if k not in ("LORAPAR_FORCE_TRITON", "TRITON_INTERPRET")}
    child = subprocess.run(
        [sys.executable, "-m", "bench.gpu_suite", "--out", str(out), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-2000:]
    result = json.loads((out / "gpu_suite.json").read_text())
    assert result["dry_run"] is True
    statuses = {p: d["status"] for p, d in result["parts"].items()}
    assert statuses == {p: "ok" for p in ("tests", "kernels", "steps", "fsdp")}

    tests = result["parts"]["tests"]["records"]
    assert tests and all(r["outcome"] == "passed" for r in tests), tests

    kernels = result["parts"]["kernels"]["records"]
    assert [r["active"] for r in kernels] == [0.4, 1.0]
    for r in kernels:
        assert r["path"] == "triton"  # the interpreted kernels, not the reference
        assert all(r[f"{v}_ms"] > 0 and r[f"{v}_tflops"] > 0 for v in ("base", "fused", "unfused"))

    steps = {r["step"]: r for r in result["parts"]["steps"]["records"]}
    assert steps["sft"]["tokens_per_s"] > 0 and steps["sft"]["peak_memory_gb"] > 0
    grpo = steps["grpo"]
    assert grpo["generated_tokens_per_s"] > 0
    assert abs(grpo["generation_s"] + grpo["logprob_s"] + grpo["update_s"] - grpo["seconds"]) < 1e-6
    if importlib.util.find_spec("peft") and importlib.util.find_spec("transformers"):
        assert steps["sft (transformers+peft)"]["tokens_per_s"] > 0

    (fsdp,) = result["parts"]["fsdp"]["records"]  # one rank on gloo: the same fp32 arithmetic as without FSDP
    assert fsdp["losses_fsdp"] == fsdp["losses_plain"] and fsdp["max_adapter_difference"] == 0.0
    assert fsdp["frozen_unchanged_fsdp"] and fsdp["losses_fsdp"][-1] < fsdp["losses_fsdp"][0]
    summary = (out / "summary.md").read_text()
    assert "## kernels (ok" in summary and "- sft:" in summary and "4 passed" in summary
