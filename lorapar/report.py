"""The pipeline's results, rebuilt from a run directory alone: `python -m lorapar.report RUN_DIR`.

Reads RUN_DIR/config.json, the stage records RUN_DIR/stages/*.json and the per-item evaluation files
they name (one record per test item: the exact prompt, the completion, the extracted answer), and
writes results.json, results.md and, with matplotlib, theta.png. Nothing is taken from the pipeline's
memory, so a table can be recomputed and audited from the files.

Accuracy is greedy GSM8K-style exact match of the final number on the test split, split by the test
rows' ground-truth `system` field. A method's row gives mean +- sample standard deviation over seeds
of its SFT adapter ("after SFT") and of the GRPO adapter trained from it ("after RL"). The paired
differences resample test items and seeds together (lorapar/stats.py); a claim of the paper is
"supported" when the 95% interval excludes zero in the paper's direction, "contradicted" when it
excludes zero the other way, and "not resolved" otherwise. Active % is the share of the adapter's
elements its masks let train in that stage (DM-LoRA: components left after pruning). pass@G is the
share of GRPO prompts with at least one correct completion among their G samples, averaged over steps.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import numpy as np

from lorapar.io import atomic_path, atomic_write_json, atomic_write_text
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

    def matrix(self, stages: list[str]) -> Optional[np.ndarray]:
        """(seeds, items) correctness, or None when any stage is missing."""
        rows = [self.get(s) for s in stages]
        return None if any(r is None for r in rows) else np.stack(rows)


def arm_stages(seeds: list[int], method: str, phase: str) -> list[str]:
    return [f"seed{s}.{method}.{phase}.eval" for s in seeds]


def summary(values: list[float]) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "per_seed": values}


def accuracy_summary(outcomes: Outcomes, stages: list[str]) -> Optional[dict]:
    matrix = outcomes.matrix(stages)
    if matrix is None:
        return None
    return {key: summary([float(v) for v in outcomes.subset(matrix, key).mean(axis=1)]) for key, _ in SUBSETS}


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
            "after_sft": accuracy_summary(outcomes, ["base.eval"]),
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
                "after_sft": accuracy_summary(outcomes, arm_stages(seeds, method, "sft")),
                "after_rl": accuracy_summary(outcomes, arm_stages(seeds, method, "rl")),
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
        for subset in subsets:
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
            point[kind] = {key: float(outcomes.subset(values, key).mean()) for key, _ in SUBSETS}
        point["difference"] = paired_bootstrap(imp, rnd, cfg["bootstrap"], seed=100 + len(points))
        points.append(point)
    return sorted(points, key=lambda p: p["theta"])


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- markdown


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ms(entry: Optional[dict], key: str) -> str:
    if not entry:
        return "-"
    value = entry[key]
    return (
        f"{100 * value['mean']:.1f}"
        if len(value["per_seed"]) == 1
        else f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"
    )


def _secs(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}s"


def _interval(ci: dict) -> str:
    return f"{100 * ci['diff']:+.1f} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]"


def format_report(results: dict) -> str:
    """Markdown: accuracy table, paired differences, theta curve, the reading, the task checks, stage times."""
    cfg, seeds = results["config"], results["seeds"]
    n, by_system = results["test_items"], results["test_items_by_system"]
    lines = [
        f"Accuracy in % (greedy, final number) on {n} test items ({by_system.get('1', 0)} System 1 / "
        f"{by_system.get('2', 0)} System 2 by ground truth), mean ± std over {len(seeds)} seed(s) {seeds}.",
        "",
        "| Method | Active % (SFT / RL) | S1 SFT | S2 SFT | All SFT | S1 RL | S2 RL | All RL | pass@G | SFT time | "
        "RL time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        active = (
            "-"
            if row.get("active_sft") is None
            else _pct(row["active_sft"]) + (f" / {_pct(row['active_rl'])}" if row.get("active_rl") is not None else "")
        )
        sft, rl = row["after_sft"], row["after_rl"]
        lines.append(
            " | ".join(
                [
                    f"| {row['label']}",
                    active,
                    _ms(sft, "system1"),
                    _ms(sft, "system2"),
                    _ms(sft, "overall"),
                    _ms(rl, "system1"),
                    _ms(rl, "system2"),
                    _ms(rl, "overall"),
                    _pct(row.get("pass_at_g")),
                    _secs(row.get("sft_seconds")),
                    _secs(row.get("rl_seconds")) + " |",
                ]
            )
        )
    lines += [
        "",
        f"pass@G: share of GRPO prompts with a correct completion among their G = {cfg['rl_generations']} "
        "samples, mean over steps and seeds. Times: mean seconds per seed.",
    ]
    scopes = sorted({str(s.get("random_scope")) for s in results["score"].values()})
    if scopes:
        lines.append(
            f"Random masks: score.py's random baseline, scope {', '.join(scopes)} (global: a random subset of "
            "the whole adapter with each stage's size and the importance stages' overlap)."
        )
    if results["comparisons"]:
        lines += [
            "",
            "## Paired differences",
            "",
            f"Accuracy difference a - b in points, 95% bootstrap interval over test items and seeds "
            f"({cfg['bootstrap']} replicates).",
            "",
            "| Comparison | Items | a - b [95% CI] | Paper | This run |",
            "|---|---|---|---|---|",
        ]
        for c in results["comparisons"]:
            lines.append(
                f"| {c['name']} | {dict(SUBSETS)[c['subset']]} | {_interval(c)} | {c['paper']} | {c['reading']} |"
            )
    if results["theta_curve"]:
        lines += [
            "",
            f"## The theta curve (SFT only, System-1 rows, stage-1 mask, seed {seeds[0]})",
            "",
            "| theta | Active % | Importance: all / S1 / S2 | Random: all / S1 / S2 | importance - random [95% CI] |",
            "|---|---|---|---|---|",
        ]
        for p in results["theta_curve"]:
            imp, rnd = p["importance"], p["random"]
            lines.append(
                f"| {p['theta']:g} | {_pct(p['active_stage1'])} | "
                f"{_pct(imp['overall'])} / {_pct(imp['system1'])} / {_pct(imp['system2'])} | "
                f"{_pct(rnd['overall'])} / {_pct(rnd['system1'])} / {_pct(rnd['system2'])} | "
                f"{_interval(p['difference'])} |"
            )
        if results.get("theta_figure"):
            lines += ["", f"![theta curve]({results['theta_figure']})"]
    lines += ["", "## Reading", ""] + reading_lines(results)
    lines += ["", "## Task checks", ""] + check_lines(results)
    lines += ["", "## Stages", "", "| Stage | Wall | CPU |", "|---|---|---|"]
    lines += [f"| {s['title']} | {_secs(s['seconds'])} | {_secs(s.get('cpu_seconds'))} |" for s in results["stages"]]
    lines.append(f"| total | {_secs(results['total_seconds'])} | |")
    if "pretrain_seconds" in results["inputs"]:
        lines.append(
            f"\nThe tiny base was pretrained in {_secs(results['inputs']['pretrain_seconds'])} when the assets "
            "were built (the assets stage above, or an earlier run)."
        )
    return "\n".join(lines) + "\n"


def reading_lines(results: dict) -> list[str]:
    """What the intervals say about the paper's claims, grouped by outcome."""
    groups: dict[str, list[str]] = {"supports": [], "contradicts": [], "not resolved": []}
    for c in results["comparisons"]:
        if c["reading"] in groups:
            groups[c["reading"]].append(f"{c['name']} ({dict(SUBSETS)[c['subset']]}: {_interval(c)})")
    curve = results["theta_curve"]
    for p in curve:
        found = reading("higher", verdict(p["difference"]))
        groups[found].append(f"importance vs random masks at theta {p['theta']:g}, SFT ({_interval(p['difference'])})")
    lines = []
    for title, key in (
        ("This run supports", "supports"),
        ("This run contradicts", "contradicts"),
        ("This run cannot resolve", "not resolved"),
    ):
        items = groups[key]
        lines.append(f"- **{title}** ({len(items)}): " + ("; ".join(items) if items else "none") + ".")
    lines.append(
        "- A verdict holds for this tiny model and task only: the intervals cover test-item and seed "
        "variation, not a change of model, task or budget."
    )
    return lines


def check_lines(results: dict) -> list[str]:
    rows = {r["method"]: r for r in results["rows"]}
    lines = []
    base = rows["base"]["after_sft"]
    if base:
        lines.append(
            f"- Base model: {_ms(base, 'overall')}% overall ({_ms(base, 'system1')} S1 / {_ms(base, 'system2')} S2)."
        )
    lora = rows.get("lora")
    if lora and lora["after_sft"]:
        s2 = lora["after_sft"]["system2"]["mean"]
        ok = "within" if 0.15 <= s2 <= 0.70 else "OUTSIDE"
        lines.append(f"- Full LoRA's System-2 accuracy after SFT: {_pct(s2)}% ({ok} the 15-70% the task is built for).")
    passes = [
        (r["label"], r["pass_at_g"], r.get("pass_at_g_first"))
        for r in results["rows"]
        if r.get("pass_at_g") is not None
    ]
    for label, value, first in passes:
        lines.append(f"- {label}: pass@G of the GRPO prompts {_pct(value)}% (first step {_pct(first)}%).")
    return lines or ["- none measured"]


# ----------------------------------------------------------------------------- figure and entry point


def draw_theta(results: dict, path: str) -> Optional[str]:
    """theta.png: SFT accuracy against the active share, importance vs random; None without matplotlib."""
    curve = results["theta_curve"]
    if not curve:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    x = [100 * p["active_stage1"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("importance", "o-"), ("random", "s--")):
        ax.plot(x, [100 * p[kind]["overall"] for p in curve], style, label=f"{kind} masks")
    for xi, p in zip(x, curve):
        ax.annotate(
            f"θ={p['theta']:g}",
            (xi, 100 * p["importance"]["overall"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set(
        xlabel="active elements in stage 1 (% of the adapter)",
        ylabel="test accuracy after SFT (%)",
        title="LoRA-PAR theta curve (SFT only)",
    )
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return os.path.basename(path)


def build_report(run_dir: str) -> dict:
    """Rebuild results.json, results.md and theta.png from run_dir; returns the results with "markdown"."""
    results = build_results(run_dir)
    results["theta_figure"] = draw_theta(results, os.path.join(run_dir, "theta.png"))
    markdown = format_report(results)
    atomic_write_json(os.path.join(run_dir, "results.json"), results)
    atomic_write_text(os.path.join(run_dir, "results.md"), markdown)
    return {**results, "markdown": markdown}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description="Rebuild results.md and results.json from a pipeline run directory.")
    parser.add_argument("run_dir", help="the pipeline's --out directory")
    args = parser.parse_args(argv)
    results = build_report(args.run_dir)
    print(results["markdown"])
    return results


if __name__ == "__main__":
    main()
