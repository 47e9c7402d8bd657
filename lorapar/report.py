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
import os
from typing import Optional

from lorapar.io import atomic_path, atomic_write_json, atomic_write_text
from lorapar.results import SUBSETS, build_results, reading
from lorapar.stats import verdict

# ----------------------------------------------------------------------------- markdown


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ms(entry: Optional[dict], key: str) -> str:
    if not entry or key not in entry:  # no test item of that system
        return "-"
    value = entry[key]
    if len(value["per_seed"]) > 1:
        return f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"
    if "low" not in value:  # a results.json written before the intervals
        return f"{100 * value['mean']:.1f}"
    return f"{100 * value['mean']:.1f} [{100 * value['low']:.1f}, {100 * value['high']:.1f}]"  # one seed: over items


def _secs(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}s"


def _interval(ci: dict) -> str:
    return f"{100 * ci['diff']:+.1f} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]"


def format_report(results: dict) -> str:
    """Markdown: accuracy table, paired differences, theta curve, the reading, the task checks, stage times."""
    lines = accuracy_lines(results) + comparison_lines(results) + theta_lines(results)
    lines += ["", "## Reading", ""] + reading_lines(results)
    lines += ["", "## Task checks", ""] + check_lines(results)
    lines += stage_lines(results)
    return "\n".join(lines) + "\n"


def accuracy_lines(results: dict) -> list[str]:
    """The table of every method's accuracy, active share, pass@G and time, with its notes."""
    cfg, seeds = results["config"], results["seeds"]
    n, by_system = results["test_items"], results["test_items_by_system"]
    split = (
        f"{by_system.get('1', 0)} System 1 / {by_system.get('2', 0)} System 2 by ground truth"
        if by_system.get("1") or by_system.get("2")
        else "no `system` field: no S1 / S2 split"
    )
    lines = [
        f"Accuracy in % (greedy, final number) on {n} test items ({split}), "
        + (
            f"mean ± std over {len(seeds)} seed(s) {seeds}."
            if len(seeds) > 1
            else f"one seed {seeds}, [low, high]: 95% bootstrap interval over the test items."
        ),
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
    uses_random_masks = any(r["method"] == "random" for r in results["rows"]) or results["theta_curve"]
    if scopes and uses_random_masks:
        lines.append(
            f"Random masks: score.py's random baseline, scope {', '.join(scopes)} (global: a random subset of "
            "the whole adapter with each stage's size and the importance stages' overlap)."
        )
    return lines


def comparison_lines(results: dict) -> list[str]:
    """The paired differences with their intervals and readings (none when the run has no comparison)."""
    cfg, lines = results["config"], []
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
    return lines


def theta_lines(results: dict) -> list[str]:
    """The theta sweep's points, importance against random masks (none without a sweep)."""
    lines = []
    if results["theta_curve"]:
        lines += [
            "",
            f"## The theta curve (SFT only, System-1 rows, stage-1 mask, seed {results['seeds'][0]})",
            "",
            "| theta | Active % | Importance: all / S1 / S2 | Random: all / S1 / S2 | importance - random [95% CI] |",
            "|---|---|---|---|---|",
        ]
        for p in results["theta_curve"]:
            imp, rnd = p["importance"], p["random"]
            lines.append(
                f"| {p['theta']:g} | {_pct(p['active_stage1'])} | "
                f"{_pct(imp['overall'])} / {_pct(imp.get('system1'))} / {_pct(imp.get('system2'))} | "
                f"{_pct(rnd['overall'])} / {_pct(rnd.get('system1'))} / {_pct(rnd.get('system2'))} | "
                f"{_interval(p['difference'])} |"
            )
        if results.get("theta_figure"):
            lines += ["", f"![theta curve]({results['theta_figure']})"]
    return lines


def stage_lines(results: dict) -> list[str]:
    """Each stage's wall and CPU seconds, and when the tiny base was pretrained."""
    lines = ["", "## Stages", "", "| Stage | Wall | CPU |", "|---|---|---|"]
    lines += [f"| {s['title']} | {_secs(s['seconds'])} | {_secs(s.get('cpu_seconds'))} |" for s in results["stages"]]
    lines.append(f"| total | {_secs(results['total_seconds'])} | |")
    if "pretrain_seconds" in results["inputs"]:
        lines.append(
            f"\nThe tiny base was pretrained in {_secs(results['inputs']['pretrain_seconds'])} when the assets "
            "were built (the assets stage above, or an earlier run)."
        )
    return lines


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
    what = "this base model, test split and budget" if results["config"].get("ckpt") else "this tiny model and task"
    lines.append(
        f"- A verdict holds for {what} only: the intervals cover test-item and seed "
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
    if lora and lora["after_sft"] and "system2" in lora["after_sft"]:
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
