"""Label every example System 1 or System 2 by the majority vote of role-playing teachers (LoRA-PAR).

    python classify.py --data train.jsonl --format gsm8k --out labelled.jsonl \\
        --teacher http:http://127.0.0.1:8000#llama --teacher local:ckpt/ --teacher rule:gsm8k-steps

Output: OUT (jsonl) holds each input row plus `system` (1 or 2), `votes` and `replies` (one per teacher,
in --teacher order; a vote is null for an abstention), `teachers`, `decided_by` ("majority", "tie" or
"all-abstain"; the last two take --default-system), `format` and `row_id` (input line + content hash).
An input `system` field (a known label) is kept as `reference_system`, and the summary reports the
vote's accuracy against it. OUT minus its extension + ".summary.json" gets the summary (label split,
per-teacher split and abstentions, Fleiss' kappa, the configuration), written atomically.

Resumable: rows are appended in input order, flushed and fsynced after every batch; a re-run with the same
OUT skips rows already labelled (matched by row_id), repairs a partial last line left by a crash, and
produces the same file an uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from typing import Optional

from tqdm import tqdm

from lorapar import runlock
from lorapar.config import add_dataclass_args, config_to_dict, dataclass_from_args
from lorapar.data import DataError, Example, load_examples
from lorapar.errors import run_main
from lorapar.io import atomic_write_json
from lorapar.script_args import ClassifyArgs, classify_summary_path
from lorapar.teachers import REFUSED, TeacherArgs, fleiss_kappa, majority_vote, make_teacher

log = logging.getLogger("classify")

ADDED_KEYS = ("system", "votes", "replies", "teachers", "decided_by", "format", "row_id")


def row_id(example: Example) -> str:
    """Input line number + a hash of the row's content: stable across runs, changes when the input does."""
    digest = hashlib.sha256(json.dumps(example.source, sort_keys=True).encode()).hexdigest()[:16]
    return f"{example.line}:{digest}"


def read_done(out: str, expected_ids: set[str], teachers: list[str]) -> set[str]:
    """row_ids already in OUT. A partial last line (a crash mid-write) is cut off; anything else that is
    wrong (bad JSON, rows of another input or another teacher set) is an error naming the line."""
    if not os.path.exists(out):
        return set()
    with open(out, "rb+") as handle:
        data = handle.read()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning(
                "%s: removing a partial last line (%d bytes) left by an interrupted run", out, len(data) - complete
            )
            handle.truncate(complete)
            handle.flush()
            os.fsync(handle.fileno())
    done = set()
    for number, text in enumerate(data[:complete].decode("utf-8").splitlines(), 1):
        try:
            row = json.loads(text)
            rid, row_teachers = row["row_id"], row["teachers"]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{out}:{number}: not a classify.py output row ({err}); use a new --out") from None
        if rid not in expected_ids:
            raise DataError(
                f"{out}:{number}: row_id {rid} is not in this input (another --data or --limit?); use a new --out"
            )
        if row_teachers != teachers:
            raise DataError(
                f"{out}:{number}: labelled by teachers {row_teachers}, this run has {teachers}; use a new --out"
            )
        if rid in done:
            raise DataError(
                f"{out}:{number}: row_id {rid} appears twice (two runs wrote into this --out at once?); use a new --out"
            )
        done.add(rid)
    return done


def output_row(example: Example, rid: str, teachers: list[str], votes: list, default: int, path: str) -> dict:
    clash = sorted(set(example.source) & (set(ADDED_KEYS) - {"system"} | {"reference_system"}))
    if clash:
        raise DataError(f"{path}:{example.line}: input field(s) {clash} would be overwritten by classify.py's output")
    row = {k: v for k, v in example.source.items() if k != "system"}
    if "system" in example.source:
        row["reference_system"] = example.source["system"]
    label, how = majority_vote([v for v, _ in votes], default)
    row.update(
        system=label,
        votes=[v for v, _ in votes],
        replies=[r for _, r in votes],
        teachers=teachers,
        decided_by=how,
        format=example.format,
        row_id=rid,
    )
    return row


def summarise(out: str, teachers: list[str]) -> dict:
    with open(out, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    votes = [r["votes"] for r in rows]
    split = Counter(r["system"] for r in rows)
    summary = {
        "rows": len(rows),
        "system_1": split[1],
        "system_2": split[2],
        "decided_by": dict(sorted(Counter(r["decided_by"] for r in rows).items())),
        "abstentions": sum(v is None for vs in votes for v in vs),
        "teachers": [
            {
                "spec": spec,
                **{f"system_{k}": sum(vs[i] == k for vs in votes) for k in (1, 2)},
                "abstained": sum(vs[i] is None for vs in votes),
                "refused": sum(str(r["replies"][i]).startswith(REFUSED) for r in rows),
            }
            for i, spec in enumerate(teachers)
        ],
        "fleiss_kappa": fleiss_kappa(votes),
        "kappa_rows": sum(all(v is not None for v in vs) for vs in votes),
    }
    known = [r for r in rows if r.get("reference_system") in (1, 2)]
    if known:
        summary["reference_accuracy"] = sum(r["system"] == r["reference_system"] for r in known) / len(known)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="SPEC",
        help="a teacher, repeat for several (an odd number unless --allow-even): local:CKPT[,tokenizer=PATH] | "
        "http:URL#MODEL | rule:gsm8k-steps[,threshold=N] | rule:length[,threshold=N] | rule:oracle "
        "(see lorapar/teachers.py)",
    )
    add_dataclass_args(parser, ClassifyArgs)
    add_dataclass_args(parser, TeacherArgs)
    return parser


def main(argv: Optional[list[str]] = None) -> dict:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        args, targs = dataclass_from_args(ClassifyArgs, ns), dataclass_from_args(TeacherArgs, ns)
    except ValueError as error:
        parser.error(str(error))
    specs: list[str] = ns.teacher
    if not args.data or not args.out:
        parser.error("--data and --out are required")
    if not specs:
        parser.error("give at least one --teacher SPEC")
    if len(specs) % 2 == 0 and not args.allow_even:
        parser.error(f"{len(specs)} teachers: an even number can tie; give an odd number or pass --allow-even")

    examples = load_examples(args.data, args.format, skip_bad=args.skip_bad)
    skipped = examples.skipped
    if args.limit:
        examples = examples[: args.limit]
    ids = [row_id(ex) for ex in examples]
    runlock.acquire(args.out, is_dir=False)  # a second run into this --out is refused, naming this one's PID
    done = read_done(args.out, set(ids), specs)
    pending = [(ex, rid) for ex, rid in zip(examples, ids) if rid not in done]
    log.info(
        "%s: %d rows, %d already labelled, %d to label, %d malformed lines skipped",
        args.data,
        len(examples),
        len(done),
        len(pending),
        skipped,
    )

    teachers = [make_teacher(spec, targs) for spec in specs] if pending else []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as handle, tqdm(total=len(pending), desc="classify") as bar:
        for start in range(0, len(pending), targs.batch_size):
            batch = pending[start : start + targs.batch_size]
            answers = [teacher.classify([ex for ex, _ in batch]) for teacher in teachers]
            for j, (ex, rid) in enumerate(batch):
                row = output_row(ex, rid, specs, [a[j] for a in answers], args.default_system, args.data)
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            # A batch's rows are all known at once, so one fsync per batch loses no more work in a crash
            # than one per row would, and it is what makes the rule teachers fast on a full dataset.
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(batch))

    summary = summarise(args.out, specs)
    summary.update(skipped_input_lines=skipped, config={"teachers": specs, **config_to_dict(args, targs)})
    atomic_write_json(classify_summary_path(args.out), summary)
    log.info(
        "System 1: %d, System 2: %d, abstentions: %d, Fleiss' kappa: %s -> %s",
        summary["system_1"],
        summary["system_2"],
        summary["abstentions"],
        summary["fleiss_kappa"],
        args.out,
    )
    runlock.release(args.out, is_dir=False)
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    run_main(main)
