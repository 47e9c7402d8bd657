"""LoRA-PAR end to end, with its baselines on the same budget, repeated over seeds, in one command.

    python -m lorapar.pipeline                       # embedded default: synthetic task, tiny base, 3 seeds
    python -m lorapar.pipeline --smoke --out /tmp/s  # every stage and row at toy size (~1 min; CI runs it)
    python -m lorapar.pipeline --ckpt llama-2-7b --tokenizer tokenizer.model \\
        --train-data gsm8k/train.jsonl --test-data gsm8k/test.jsonl [--teacher SPEC ...]   # the paper's recipe
    python -m lorapar.report RUN_DIR                 # rebuild results.md / results.json from a run directory

Stages (each writes into its own directory under --out and is skipped when a previous run completed it):
  assets    embedded default only: synthetic task, SentencePiece tokenizer, pretrained tiny base (pretrain.py)
  classify  System 1 / 2 labels by the teachers' majority vote (classify.py); once, the labels do not depend on seeds
  base      greedy evaluation of the base model without an adapter
  then for every seed S (--seeds N: S = seed, seed+1, ...; the task, the base and the labels stay fixed):
  score     element importance per system on a gaussian-initialised adapter, theta partition, random masks
            of equal size (score.py --init gaussian --seed S); its adapter_init/ starts the masked rows.
            score_pissa: the same at the PiSSA init (--init pissa), which the PiSSA row starts from.
  per method an SFT run (train_sft.py), a GRPO run (train_rl.py) and greedy evaluation of each adapter
  on the test split (lorapar.evaluate), all with seed S (adapter init, data order, GRPO samples):
    lora     LoRA+RL: every element trained, standard LoRA init; SFT on all rows, then GRPO on System-2 rows
    lorapar  LoRA-PAR: from the scored adapter, SFT on System-1 rows with the stage-1 mask, GRPO on
             System-2 rows with the stage-2 mask
    random   LoRA-PAR's schedule from the same adapter with random masks of the same size
    pissa    LoRA-PAR from the PiSSA-initialised scored adapter, with the masks scored on it
    dmlora   DM-LoRA (dual-module adapter) SFT on all rows (no GRPO: train_rl.py trains LoRA adapters)
  sweep     --theta-sweep: for the first seed, SFT with the stage-1 mask at each theta, importance-selected
            and random of the same size (the paper's Table 3), each evaluated on the test split
Results: results.json and results.md (mean +- std over seeds, paired bootstrap intervals, the theta
curve and theta.png; lorapar/report.py rebuilds them from the run directory alone).

A stage is complete when its record OUT/stages/NAME.json exists (written last, with its timing); an
interrupted training stage resumes from its latest checkpoint (the scripts' --resume), any other
incomplete stage is redone. --overwrite redoes every stage (the embedded assets are kept: they are
deterministic; delete OUT/assets to rebuild them).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from typing import Optional

import torch

from lorapar import pipeline_config, runlock
from lorapar.config import save_config
from lorapar.errors import run_main
from lorapar.io import atomic_write_json
from lorapar.pipeline_config import EMBEDDED, METHODS, SMOKE, PipelineConfig  # noqa: F401 (the command's settings)
from lorapar.pipeline_stages import PipelineStages
from lorapar.report import build_report
from lorapar.stages import Stages, check_same_config, exit_on_sigterm


class Pipeline(PipelineStages):
    """The run: its independent jobs, run in order on one process or several (--workers)."""

    # ---- the whole run
    def jobs(self) -> list[tuple[tuple[str, int, tuple], Optional[tuple]]]:
        """The run's independent parts as (job, the job it waits for), longest first after the short score
        jobs that the masked rows wait for, so that the workers finish together: every seed's score stages,
        the theta sweep's points (each trains twice), every (seed, row) (rows trained on all examples are
        the longest; DM-LoRA has no GRPO) and the base evaluation."""
        cfg = self.cfg
        inits = tuple(
            init
            for init, rows in (("gaussian", {"lorapar", "random"}), ("pissa", {"pissa"}))
            if rows & set(cfg.methods)
        )
        scores = {s: ("score", s, inits) for s in cfg.seed_values()} if inits else {}
        sweep = [
            ("sweep", cfg.seed, (theta,))
            for theta in cfg.theta_sweep
            if not (theta == cfg.theta and self.sweep_reuses_rows())
        ]
        order = [m for m in ("lora", "random", "lorapar", "pissa", "dmlora") if m in cfg.methods]
        rows = [
            (("row", s, (m,)), scores[s] if m in ("lorapar", "random", "pissa") else None)
            for m in order
            for s in cfg.seed_values()
        ]
        return (
            [(job, None) for job in scores.values()]
            + [(job, None) for job in sweep]
            + rows
            + [(("base", cfg.seed, ()), None)]
        )

    def run_job(self, job: tuple[str, int, tuple], inputs: dict) -> None:
        kind, seed, what = job
        total = {"score": len(what), "sweep": 5, "base": 1}.get(kind, 2 if what == ("dmlora",) else 4)
        stages = Stages(self.cfg.out, self.cfg.overwrite, total=total, threads=self.cfg.threads)
        labelled = self.dir("classify", "labelled.jsonl")
        if kind == "base":
            stages.run(
                "base.eval",
                "evaluate: the base model without an adapter",
                lambda redo: self.evaluate(inputs, "", self.dir("base_eval.json")),
            )
        elif kind == "score":
            self.run_scores(stages, inputs, labelled, seed, what)
        elif kind == "sweep":
            self.run_sweep_point(stages, inputs, labelled, seed, what[0])
        else:
            self.run_row(stages, inputs, labelled, seed, what[0])

    def run(self) -> dict:
        runlock.acquire(self.cfg.out)  # a second pipeline into this --out is refused, naming this process
        try:
            return self._run()
        finally:
            runlock.release(self.cfg.out)

    def _run(self) -> dict:
        cfg = self.cfg
        check_same_config(self.dir("config.json"), cfg)
        save_config(self.dir("config.json"), cfg)
        stages = Stages(cfg.out, cfg.overwrite, total=(0 if cfg.ckpt else 1) + 1, threads=cfg.threads)
        inputs = self.inputs(stages)
        atomic_write_json(self.dir("inputs.json"), inputs)
        stages.run(
            "classify",
            "classify: System 1 / System 2 by the teachers' vote",
            lambda redo: self.classify(stages, inputs, redo),
        )
        jobs = self.jobs()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.workers <= 1:
            for job, _ in jobs:
                self.run_job(job, inputs)
        else:
            run_in_workers(jobs, cfg, inputs, cfg.workers)
        results = build_report(cfg.out)
        print("\n" + results["markdown"])
        return results

    def run_scores(self, stages: Stages, inputs: dict, labelled: str, seed: int, inits: tuple[str, ...]) -> None:
        """score.py for one seed at each init the rows start from: gaussian (LoRA-PAR, random masks), pissa."""
        theta, run = self.cfg.theta, lambda *p: self.dir(f"seed{seed}", *p)  # noqa: E731
        if "gaussian" in inits:
            stages.run(
                f"seed{seed}.score",
                f"seed {seed}: score at the gaussian init, theta {theta} masks, random masks",
                lambda redo: self.score(stages, inputs, labelled, seed, run("score"), "gaussian", theta),
            )
        if "pissa" in inits:
            stages.run(
                f"seed{seed}.score_pissa",
                f"seed {seed}: score at the PiSSA init, theta {theta} masks",
                lambda redo: self.score(stages, inputs, labelled, seed, run("score_pissa"), "pissa", theta),
            )

    def run_row(self, stages: Stages, inputs: dict, labelled: str, seed: int, method: str) -> None:
        """One row of the table for one seed: SFT and its evaluation, then GRPO and its evaluation."""
        run = lambda *p: self.dir(f"seed{seed}", *p)  # noqa: E731
        adapter, masks = self.start(method, seed)
        tag = f"seed{seed}.{method}"
        stages.run(
            f"{tag}.sft",
            f"seed {seed}, {method}: SFT" + (" (System 1, stage-1 mask)" if masks else " (all rows)"),
            lambda redo: self.sft(stages, inputs, labelled, run(method, "sft"), seed, adapter, masks, redo),
        )
        stages.run(
            f"{tag}.sft.eval",
            f"seed {seed}, {method}: evaluate after SFT",
            lambda redo: self.evaluate(inputs, run(method, "sft"), run(method, "eval_sft.json")),
        )
        if method == "dmlora":
            return
        stages.run(
            f"{tag}.rl",
            f"seed {seed}, {method}: GRPO (System 2" + (", stage-2 mask)" if masks else ")"),
            lambda redo: self.grpo(stages, inputs, labelled, method, seed, masks, redo),
        )
        stages.run(
            f"{tag}.rl.eval",
            f"seed {seed}, {method}: evaluate after GRPO",
            lambda redo: self.evaluate(inputs, run(method, "rl"), run(method, "eval_rl.json")),
        )

    def sweep_reuses_rows(self) -> bool:
        """The theta of the main rows is a point of the curve: its seed's lorapar / random SFT runs."""
        return self.cfg.theta in self.cfg.theta_sweep and {"lorapar", "random"} <= set(self.cfg.methods)

    def run_sweep_point(self, stages: Stages, inputs: dict, labelled: str, seed: int, theta: float) -> None:
        """One point of the SFT-only theta curve for one seed: importance-selected vs random stage-1 masks
        of equal size. Both runs start from the adapter its score.py run scored (the same seed scores the
        same examples on the same gaussian adapter, so between thetas only the partition changes)."""
        out = self.dir("sweep", f"theta{theta}")
        stages.run(
            f"sweep.theta{theta}.score",
            f"sweep: theta {theta} masks and random masks (seed {seed})",
            lambda redo: self.score(stages, inputs, labelled, seed, os.path.join(out, "score"), "gaussian", theta),
        )
        for kind, masks in (("importance", "masks.safetensors"), ("random", "random_masks.safetensors")):
            adapter = ["--init-adapter", os.path.join(out, "score", "adapter_init")]
            stages.run(
                f"sweep.theta{theta}.{kind}.sft",
                f"sweep: theta {theta}, {kind} masks: SFT (System 1)",
                lambda redo: self.sft(
                    stages,
                    inputs,
                    labelled,
                    os.path.join(out, kind),
                    seed,
                    adapter,
                    os.path.join(out, "score", masks),
                    redo,
                ),
            )
            stages.run(
                f"sweep.theta{theta}.{kind}.sft.eval",
                f"sweep: theta {theta}, {kind} masks: evaluate",
                lambda redo: self.evaluate(inputs, os.path.join(out, kind), os.path.join(out, f"eval_{kind}.json")),
            )


def run_in_workers(jobs: list[tuple[tuple, Optional[tuple]]], cfg: PipelineConfig, inputs: dict, workers: int) -> None:
    """Run Pipeline.jobs() on `workers` processes, in their order, each once the job it waits for is done.

    The jobs share nothing but the inputs, the labels and the files of the jobs they wait for. The workers
    are spawned (no thread pool or tensor state inherited), one core each, and kept from job to job: a
    job depends on no process state (every stage seeds itself), and each new process would import torch again."""
    finished: queue.SimpleQueue = queue.SimpleQueue()
    pending, running, done = list(jobs), 0, set()
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=exit_on_sigterm) as pool:
        while pending or running:
            ready = [entry for entry in pending if entry[1] is None or entry[1] in done]
            for entry in ready[: workers - running]:
                pending.remove(entry)
                running += 1
                pool.apply_async(
                    run_job_in_worker, ((cfg, inputs, entry[0]),), callback=finished.put, error_callback=finished.put
                )
            if not running:
                raise RuntimeError(f"pipeline jobs wait for jobs that are not in the run: {pending}")
            outcome = finished.get()
            running -= 1
            if isinstance(outcome, BaseException):
                raise outcome  # the pool's exit terminates the other workers (and their scripts)
            done.add(outcome)
            print(f"==== {outcome[0]} {outcome[1]} {','.join(map(str, outcome[2]))}: done", flush=True)


def run_job_in_worker(task: tuple) -> tuple[str, int, tuple]:
    """One job of Pipeline.jobs() in a worker process (module level: a spawned process imports it)."""
    cfg, inputs, job = task
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    Pipeline(cfg).run_job(job, inputs)
    return job


def parse_config(argv: Optional[list[str]] = None) -> PipelineConfig:
    return pipeline_config.parse_config(argv, description=__doc__.split("\n\n")[0])


def main(argv: Optional[list[str]] = None) -> dict:
    cfg = parse_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return Pipeline(cfg).run()


if __name__ == "__main__":
    exit_on_sigterm()  # the command's; main() called in-process leaves the caller's signal handling alone
    run_main(main)
