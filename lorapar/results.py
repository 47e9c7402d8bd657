"""The numbers of a pipeline run, read from its directory alone (lorapar/report.py renders them).

build_results reads RUN_DIR/config.json, the stage records RUN_DIR/stages/*.json and the per-item
evaluation files they name, and returns every accuracy, paired difference and reading the report shows.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from lorapar.stats import mean_std, paired_bootstrap, verdict

LABELS = {
    "base": "Base model (no adapter)",
    "lora": "LoRA+RL (all elements: SFT on all rows, then GRPO on S2)",
    "lorapar": "LoRA-PAR (theta {theta})",
    "random": "LoRA-PAR schedule, random masks of equal size",
    "pissa": "LoRA-PAR, PiSSA init (theta {theta})",
    "dmlora": "DM-LoRA (SFT on all rows, no GRPO)",
}
SUBSETS = (("overall", "all"), ("system1", "S1"), ("system2", "S2"))

# The paired comparisons: (name, arm a, arm b, subsets, the paper's direction for a - b or None, the paper's evidence).
# An arm is (method, "sft" | "rl").
COMPARISONS = (
    (
        "LoRA-PAR vs LoRA+RL, after RL",
        ("lorapar", "rl"),
        ("lora", "rl"),
        ("overall", "system1", "system2"),
        "higher",
        "LLaMA-2-7B GSM8K 34.57 vs LoRA 2 epochs 31.86; Qwen2.5-7B 81.65 vs LoRA+RL 69.83",
    ),
    (
        "LoRA-PAR vs LoRA, after SFT",
        ("lorapar", "sft"),
        ("lora", "sft"),
        ("overall", "system1", "system2"),
        None,
        "27.07 vs 27.8 after one epoch (about equal)",
    ),
    (
        "importance vs random masks, after SFT",
        ("lorapar", "sft"),
        ("random", "sft"),
        ("overall", "system1", "system2"),
        "higher",
        "Table 3, theta 0.9: 27.3 vs 23.43",
    ),
    (
        "importance vs random masks, after RL",
        ("lorapar", "rl"),
        ("random", "rl"),
        ("overall", "system2"),
        None,
        "not reported",
    ),
    (
        "GRPO vs SFT on S2: LoRA+RL",
        ("lora", "rl"),
        ("lora", "sft"),
        ("system2",),
        "higher",
        "PiSSA 30.63 -> 37.45 (+RL)",
    ),
    ("GRPO vs SFT on S2: LoRA-PAR", ("lorapar", "rl"), ("lorapar", "sft"), ("system2",), "higher", "27.07 -> 34.57"),
    ("GRPO vs SFT on S2: random masks", ("random", "rl"), ("random", "sft"), ("system2",), None, "not reported"),
    ("GRPO vs SFT on S2: LoRA-PAR PiSSA", ("pissa", "rl"), ("pissa", "sft"), ("system2",), "higher", "30.86 -> 41.85"),
    (
        "LoRA-PAR PiSSA init vs LoRA init, after RL",
        ("pissa", "rl"),
        ("lorapar", "rl"),
        ("overall",),
        "higher",
        "41.85 (theta 0.95) vs 34.57 (theta 0.9)",
    ),
    (
        "DM-LoRA vs LoRA, after SFT",
        ("dmlora", "sft"),
        ("lora", "sft"),
        ("overall",),
        "higher",
        "DM-LoRA paper: +2.3 on GSM8K over LoRA",
    ),
)


# ----------------------------------------------------------------------------- reading a run


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_run(run_dir: str) -> dict:
    """config, stage records and inputs of a run directory (errors name the missing file)."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: not a pipeline run directory (no config.json)")
    stage_dir = os.path.join(run_dir, "stages")
    records = {}
    if os.path.isdir(stage_dir):
        found = [read_json(os.path.join(stage_dir, n)) for n in os.listdir(stage_dir) if n.endswith(".json")]
        for record in sorted(found, key=lambda r: (r.get("finished_at", 0), r["name"])):  # the order they ran
            records[record["name"]] = record
    inputs_path = os.path.join(run_dir, "inputs.json")
    return {
        "dir": run_dir,
        "config": read_json(config_path)["PipelineConfig"],
        "records": records,
        "inputs": read_json(inputs_path) if os.path.exists(inputs_path) else {},
    }


class Outcomes:
    """Per-item correctness of every evaluated adapter, read from its evaluation file once."""

    def __init__(self, run: dict):
        self.run, self.cache = run, {}
        self.systems: Optional[np.ndarray] = None

    def get(self, stage: str) -> Optional[np.ndarray]:
        record = self.run["records"].get(stage)
        if record is None:
            return None
        if stage not in self.cache:
            path = os.path.join(self.run["dir"], record["result"]["file"])
            items = read_json(path)["records"]
            systems = np.array([r.get("system") or 0 for r in items])
            if self.systems is None:
                self.systems = systems
            elif not np.array_equal(self.systems, systems):
                raise ValueError(f"{path}: its test items differ from the other evaluations of this run")
            self.cache[stage] = np.array([bool(r["correct"]) for r in items], dtype=np.float64)
        return self.cache[stage]

    def subset(self, values: np.ndarray, subset: str) -> np.ndarray:
        if subset == "overall":
            return values
        return values[..., self.systems == int(subset[-1])]

    def has(self, subset: str) -> bool:
        """Whether the test items hold any of `subset` (test rows without a `system` field hold no S1 / S2)."""
        return subset == "overall" or (self.systems is not None and bool((self.systems == int(subset[-1])).any()))

    def matrix(self, stages: list[str]) -> Optional[np.ndarray]:
        """(seeds, items) correctness, or None when any stage is missing."""
        rows = [self.get(s) for s in stages]
        return None if any(r is None for r in rows) else np.stack(rows)


def arm_stages(seeds: list[int], method: str, phase: str) -> list[str]:
    return [f"seed{s}.{method}.{phase}.eval" for s in seeds]


def summary(values: list[float]) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "per_seed": values}


def accuracy_summary(outcomes: Outcomes, stages: list[str], n_boot: int) -> Optional[dict]:
    """Per subset: mean and std over seeds, and the accuracy's 95% bootstrap interval over test items and
    seeds (low, high; the paired bootstrap of the arm against an arm that is never right)."""
    matrix = outcomes.matrix(stages)
    if matrix is None:
        return None
    found = {}
    for key, _ in filter(lambda entry: outcomes.has(entry[0]), SUBSETS):
        values = outcomes.subset(matrix, key)
        interval = paired_bootstrap(values, np.zeros_like(values), n_boot)
        found[key] = {
            **summary([float(v) for v in values.mean(axis=1)]),
            "low": interval["low"],
            "high": interval["high"],
        }
    return found


def build_results(run_dir: str) -> dict:
    run = load_run(run_dir)
    cfg, records = run["config"], run["records"]
    seeds = [cfg["seed"] + k for k in range(cfg["seeds"])]
    outcomes = Outcomes(run)
    result = lambda name: records[name]["result"] if name in records else None  # noqa: E731
    mean_of = lambda name_fn, key: _mean([result(name_fn(s))[key] for s in seeds if result(name_fn(s))])  # noqa: E731

    base = outcomes.get("base.eval")
    rows = [
        {
            "method": "base",
            "label": LABELS["base"],
            "after_sft": accuracy_summary(outcomes, ["base.eval"], cfg["bootstrap"]),
            "after_rl": None,
        }
    ]
    for method in cfg["methods"]:
        rows.append(
            {
                "method": method,
                "label": LABELS[method].format(theta=cfg["theta"]),
                "active_sft": mean_of(lambda s: f"seed{s}.{method}.sft", "active_fraction"),
                "active_rl": mean_of(lambda s: f"seed{s}.{method}.rl", "active_fraction"),
                "after_sft": accuracy_summary(outcomes, arm_stages(seeds, method, "sft"), cfg["bootstrap"]),
                "after_rl": accuracy_summary(outcomes, arm_stages(seeds, method, "rl"), cfg["bootstrap"]),
                "sft_loss": mean_of(lambda s: f"seed{s}.{method}.sft", "loss"),
                "pass_at_g": mean_of(lambda s: f"seed{s}.{method}.rl", "pass_at_g"),
                "pass_at_g_first": mean_of(lambda s: f"seed{s}.{method}.rl", "pass_at_g_first"),
                "sft_seconds": _mean(
                    [records[f"seed{s}.{method}.sft"]["seconds"] for s in seeds if f"seed{s}.{method}.sft" in records]
                ),
                "rl_seconds": _mean(
                    [records[f"seed{s}.{method}.rl"]["seconds"] for s in seeds if f"seed{s}.{method}.rl" in records]
                ),
            }
        )

    comparisons = []
    for k, (name, a, b, subsets, direction, paper) in enumerate(COMPARISONS):
        ma, mb = outcomes.matrix(arm_stages(seeds, *a)), outcomes.matrix(arm_stages(seeds, *b))
        if ma is None or mb is None:
            continue
        for subset in filter(outcomes.has, subsets):
            ci = paired_bootstrap(outcomes.subset(ma, subset), outcomes.subset(mb, subset), cfg["bootstrap"], seed=k)
            found = verdict(ci)
            comparisons.append(
                {
                    "name": name,
                    "subset": subset,
                    **ci,
                    "verdict": found,
                    "paper_direction": direction,
                    "paper": paper,
                    "reading": claim_reading(direction, subset, subsets, found),
                }
            )

    sweep = theta_curve(cfg, records, outcomes, seeds[0])
    stages = [
        {"name": n, "title": r["title"], "seconds": r["seconds"], "cpu_seconds": r.get("cpu_seconds")}
        for n, r in records.items()
    ]
    n_items = 0 if base is None else len(base)
    by_system = {} if outcomes.systems is None else {str(s): int((outcomes.systems == s).sum()) for s in (1, 2)}
    return {
        "config": cfg,
        "seeds": seeds,
        "rows": rows,
        "comparisons": comparisons,
        "theta_curve": sweep,
        "stages": stages,
        "inputs": run["inputs"],
        "classify": result("classify"),
        "score": {str(s): result(f"seed{s}.score") for s in seeds if result(f"seed{s}.score")},
        "test_items": n_items,
        "test_items_by_system": by_system,
        "total_seconds": sum(s["seconds"] for s in stages),
    }


def claim_reading(direction: Optional[str], subset: str, subsets: tuple[str, ...], found: str) -> str:
    """A claim is read on one subset: all test items where the comparison has them (the papers report
    overall accuracy; a per-system row then says where a difference comes from and is no verdict), else
    its only subset (GRPO vs SFT is about System 2)."""
    claimed = "overall" if "overall" in subsets else subsets[0]
    return reading(direction if subset == claimed else None, found)


def reading(direction: Optional[str], found: str) -> str:
    if direction is None:
        return "no claim"
    if found == "unresolved":
        return "not resolved"
    return "supports" if found == direction else "contradicts"


def theta_curve(cfg: dict, records: dict, outcomes: Outcomes, seed: int) -> list[dict]:
    """One point per theta: the stage-1 active share and SFT accuracy of importance and random masks."""
    points = []
    for theta in cfg.get("theta_sweep") or []:
        if f"sweep.theta{theta}.score" in records:
            score = records[f"sweep.theta{theta}.score"]["result"]
            stage = lambda kind: f"sweep.theta{theta}.{kind}.sft.eval"  # noqa: E731
        elif theta == cfg["theta"] and f"seed{seed}.score" in records:
            score = records[f"seed{seed}.score"]["result"]
            stage = lambda kind: f"seed{seed}.{'lorapar' if kind == 'importance' else 'random'}.sft.eval"  # noqa: E731
        else:
            continue
        imp, rnd = outcomes.get(stage("importance")), outcomes.get(stage("random"))
        if imp is None or rnd is None:
            continue
        point = {"theta": theta, "active_stage1": score["active_fraction"]["stage1"]}
        for kind, values in (("importance", imp), ("random", rnd)):
            point[kind] = {key: float(outcomes.subset(values, key).mean()) for key, _ in SUBSETS if outcomes.has(key)}
        point["difference"] = paired_bootstrap(imp, rnd, cfg["bootstrap"], seed=100 + len(points))
        points.append(point)
    return sorted(points, key=lambda p: p["theta"])


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
