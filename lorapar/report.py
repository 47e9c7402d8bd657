"""The pipeline's results: one row per method, like the paper's table, as JSON and as markdown.

Accuracy is greedy GSM8K-style exact match of the final number on the test split, split by the test
rows' ground-truth `system` field when they carry one ("after SFT" / "after RL" columns: a method's
SFT adapter and the GRPO adapter trained from it). Active % is the share of the adapter's elements
its masks let train in that stage (LoRA-PAR: the theta partition; DM-LoRA: components left after
pruning). Times are wall-clock seconds of the training stages; evaluation is listed with the stages.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

LABELS = {
    "base": "Base model (no adapter)",
    "lora": "LoRA (all elements; SFT all rows -> GRPO S2)",
    "lorapar": "LoRA-PAR (theta {theta})",
    "random": "LoRA-PAR, random masks of equal size",
    "pissa": "LoRA-PAR, PiSSA init (theta {theta})",
    "dmlora": "DM-LoRA (SFT all rows, no GRPO)",
}


def accuracies(metrics: Optional[dict]) -> Optional[dict]:
    """{"system1", "system2", "overall", "n"} from lorapar.evaluate's metrics (None when not run)."""
    if metrics is None:
        return None
    by_system = metrics.get("by_system", {})
    return {"system1": by_system.get("1", {}).get("accuracy"), "system2": by_system.get("2", {}).get("accuracy"),
            "overall": metrics["accuracy"], "n": metrics["n"], "malformed": metrics.get("malformed")}


def summarise(cfg, records: dict[str, dict], inputs: dict) -> dict:
    """results.json: the configuration, every stage's time and result, and one row per method."""
    result = lambda name: records[name]["result"] if name in records else None  # noqa: E731
    seconds = lambda name: records[name]["seconds"] if name in records else None  # noqa: E731
    rows = [{"method": "base", "label": LABELS["base"], "active_sft": None, "active_rl": None,
             "after_sft": accuracies(result("base.eval")), "after_rl": None, "sft_seconds": None, "rl_seconds": None}]
    for method in cfg.methods:
        sft, rl = result(f"{method}.sft"), result(f"{method}.rl")
        rows.append({
            "method": method, "label": LABELS[method].format(theta=cfg.theta),
            "active_sft": sft["active_fraction"], "active_rl": rl["active_fraction"] if rl else None,
            "after_sft": accuracies(result(f"{method}.sft.eval")), "after_rl": accuracies(result(f"{method}.rl.eval")),
            "sft_seconds": seconds(f"{method}.sft"), "rl_seconds": seconds(f"{method}.rl"),
            "sft_loss": sft["loss"], "rl_reward_first": rl["reward_first"] if rl else None,
            "rl_reward_last": rl["reward_last"] if rl else None,
        })
    stages = [{"name": name, "title": r["title"], "seconds": r["seconds"]} for name, r in records.items()]
    return {"config": dataclasses.asdict(cfg), "rows": rows, "stages": stages, "inputs": inputs,
            "classify": result("classify"), "score": result("score"),
            "total_seconds": sum(s["seconds"] for s in stages)}


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _secs(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}s"


def format_report(results: dict) -> str:
    """Markdown: the method table, then the stage times and the classify / score summaries."""
    lines = [
        "| Method | Active % (SFT / RL) | S1 acc SFT | S2 acc SFT | All SFT | S1 acc RL | S2 acc RL | All RL | SFT time | RL time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        sft, rl = row["after_sft"] or {}, row["after_rl"] or {}
        active = "-" if row["active_sft"] is None else _pct(row["active_sft"]) + (
            f" / {_pct(row['active_rl'])}" if row["active_rl"] is not None else "")
        lines.append(" | ".join([
            f"| {row['label']}", active, _pct(sft.get("system1")), _pct(sft.get("system2")), _pct(sft.get("overall")),
            _pct(rl.get("system1")), _pct(rl.get("system2")), _pct(rl.get("overall")),
            _secs(row["sft_seconds"]), _secs(row["rl_seconds"]) + " |",
        ]))
    n = next((r["after_sft"]["n"] for r in results["rows"] if r["after_sft"]), 0)
    lines += ["", f"Accuracy in % on {n} test items (greedy, final number); S1/S2 by the test rows' ground-truth system."]
    classify, score = results.get("classify"), results.get("score")
    if classify:
        agreement, kappa = classify.get("reference_accuracy"), classify.get("fleiss_kappa")
        lines.append(f"classify: {classify['system_1']} System-1 / {classify['system_2']} System-2 rows; "
                     f"Fleiss' kappa {'n/a' if kappa is None else f'{kappa:.3f}'}" +
                     (f"; vote matches the ground truth on {100 * agreement:.1f}%" if agreement is not None else ""))
    if score:
        active = score["active_fraction"]
        lines.append(f"score: stage 1 trains {_pct(active['stage1'])}%, stage 2 {_pct(active['stage2'])}% of the adapter")
    lines += ["", "| Stage | Time |", "|---|---|"]
    lines += [f"| {s['title']} | {_secs(s['seconds'])} |" for s in results["stages"]]
    lines.append(f"| total | {_secs(results['total_seconds'])} |")
    if "pretrain_seconds" in results["inputs"]:
        lines.append(f"\nThe tiny base was pretrained in {_secs(results['inputs']['pretrain_seconds'])} when the assets were built.")
    return "\n".join(lines) + "\n"
