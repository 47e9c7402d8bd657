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

import argparse
import dataclasses
import json
import multiprocessing
import os
import queue
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from lorapar import runlock
from lorapar.config import add_dataclass_args, dataclass_from_args, field, save_config
from lorapar.errors import FlagError, check_fields, run_main
from lorapar.io import atomic_write_json
from lorapar.report import build_report
from lorapar.stages import Stages, active_fraction, check_same_config, read_metrics, run_dir_flags, script
from lorapar.tokenizer import checkpoint_tokenizer

METHODS = ("lora", "lorapar", "random", "pissa", "dmlora")


@dataclass
class PipelineConfig:
    """Defaults are the paper's recipe (real inputs); EMBEDDED and SMOKE below scale it to the tiny task."""

    out: str = field(default="runs/default", metadata={"help": "run directory (one subdirectory per stage)"})
    smoke: bool = field(default=False, metadata={"help": "toy sizes for a ~1-minute run of every stage (CI)"})
    overwrite: bool = field(default=False, metadata={"help": "redo every stage instead of skipping completed ones"})
    seed: int = field(default=0, metadata={"help": "first training seed (and the seed of the embedded task and base)"})
    seeds: int = field(default=1, metadata={"help": "repeat every method with seeds seed..seed+N-1 (adapter init, data order, sampling); the embedded default uses 3"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default; the embedded default uses 1)"})
    workers: int = field(default=1, metadata={"help": "processes running seeds / the theta sweep at once (the embedded default uses 2)"})
    assets: str = field(default="", metadata={"help": "embedded default: where the built assets live (default OUT/assets)"})
    ckpt: str = field(default="", metadata={"help": "real inputs: base model (Meta dir, HF dir, .gguf or llama2.c .bin)"})
    tokenizer: str = field(default="", metadata={"help": "real inputs: tokenizer.model, tokenizer.json or .gguf (default: the one --ckpt carries)"})
    train_data: str = field(default="", metadata={"help": "real inputs: GSM8K-format training jsonl"})
    test_data: str = field(default="", metadata={"help": "real inputs: GSM8K-format test jsonl ('system' field: per-system accuracy)"})
    teachers: tuple[str, ...] = ()  # --teacher SPEC, repeatable (specs contain commas, so not a list flag)
    teacher_batch_size: int = 16
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": f"rows of the table, among {METHODS}"})
    template: str = field(default="lorapar", metadata={"choices": ["plain", "chat", "reasoning", "lorapar"], "help": "prompt/response template of every stage"})
    rewards: str = field(default="correct=2.0,integer=0.5,strict_format=0.5,soft_format=0.5,xml_count=0.5",
                         metadata={"help": "GRPO rewards (lorapar/rewards.py spec)"})
    # score (importance + partition)
    theta: float = field(default=0.9, metadata={"help": "cumulative-importance threshold per system"})
    theta_sweep: tuple[float, ...] = field(default=(), metadata={"help": "thetas of the SFT-only curve, importance vs random masks, first seed (empty: none)"})
    score_samples: int = field(default=100, metadata={"help": "examples scored per system"})
    # the adapter
    rank: int = 8
    lora_alpha: float = 64.0
    targets: tuple[str, ...] = ("q", "k", "v", "gate", "up", "down")
    # SFT (train_sft.py --preset lorapar-sft, these fields on top)
    sft_steps: int = field(default=0, metadata={"help": "optimizer steps of every SFT run (0: one epoch of its data)"})
    sft_lr: float = 2e-4
    sft_batch_size: int = 4
    sft_global_batch: int = 32
    sft_max_len: int = 512
    # GRPO (train_rl.py --preset lorapar-grpo, these fields on top)
    rl_steps: int = field(default=0, metadata={"help": "GRPO steps of every RL run (0: one epoch of the System-2 prompts)"})
    rl_lr: float = 5e-6
    rl_prompts_per_step: int = 4
    rl_generations: int = 8
    rl_max_prompt_len: int = 128
    rl_max_completion_len: int = 256
    rl_beta: float = field(default=0.0, metadata={"help": "GRPO KL coefficient (0 as TRL v0.19.1, the preset's release)"})
    rl_temperature: float = field(default=1.0, metadata={"help": "GRPO sampling temperature"})
    rl_top_p: float = field(default=1.0, metadata={"help": "GRPO nucleus sampling"})
    rl_micro_batch: int = 8
    # DM-LoRA (train_sft.py --adapter dual)
    dual_rank: int = 128
    dual_shared_rank: int = 32
    dual_alpha: float = 128.0
    dual_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # the supplement's
    dual_target_rank: float = 80.0
    dual_t_init: float = field(default=235 / 1562, metadata={"help": "fraction of the SFT steps (< 1) or steps"})
    dual_t_final: float = field(default=780 / 1562, metadata={"help": "fraction of the SFT steps (< 1) or steps"})
    dual_delta_t: int = 10
    # evaluation
    eval_batch_size: int = 16
    eval_max_new_tokens: int = 256
    eval_limit: int = field(default=0, metadata={"help": "evaluate the first N test items (0: all)"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap replicates of every paired interval"})
    save_every: int = field(default=0, metadata={"help": "training checkpoint interval (0: only at the end); resume granularity"})

    def __post_init__(self) -> None:
        self.methods, self.targets, self.teachers = tuple(self.methods), tuple(self.targets), tuple(self.teachers)
        self.theta_sweep = tuple(float(t) for t in self.theta_sweep)
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; expected among {METHODS}")
        check_fields(  # the stages' own dataclasses check these again; here they fail before any stage runs
            self, positive=("seeds", "workers", "bootstrap", "teacher_batch_size", "score_samples", "rank", "sft_batch_size", "sft_max_len",
                            "rl_prompts_per_step", "rl_max_prompt_len", "rl_max_completion_len", "rl_micro_batch",
                            "dual_rank", "dual_delta_t", "eval_batch_size", "eval_max_new_tokens"),
            positive_float=("lora_alpha", "sft_lr", "rl_lr", "dual_alpha"), open_unit_interval=(),
            non_negative=("seed", "threads", "sft_steps", "sft_global_batch", "rl_steps", "rl_beta", "rl_temperature",
                          "dual_target_rank", "dual_t_init", "dual_t_final", "eval_limit", "save_every"))
        if not 0 < self.theta <= 1 or not 0 < self.rl_top_p <= 1:
            raise FlagError(f"--theta {self.theta} / --rl-top-p {self.rl_top_p}: expected values in (0, 1]")
        if self.rl_generations < 2:
            raise FlagError(f"--rl-generations {self.rl_generations}: expected >= 2 (GRPO needs a group to compare)")
        bad = [t for t in self.theta_sweep if not 0.0 < t <= 1.0]
        if bad:
            raise FlagError(f"--theta-sweep: every theta must be in (0, 1]; got {bad}")

    def seed_values(self) -> list[int]:
        return [self.seed + k for k in range(self.seeds)]


# The embedded default, chosen once for the task and used for every method alike (no per-method
# tuning), sized for 20 minutes on 2 CPU cores with the time spent on seeds and test items first (the
# README gives the measurements behind each size). The tiny base needs larger learning rates than a 7B
# model and the answers are short, so lengths shrink. SFT steps set whether multi-step answers are
# learnt at all in so small a model; GRPO samples at temperature 0.7 so that a group of 8 holds both
# right and wrong completions (pass@8 is reported); its KL coefficient is the preset's (0). One thread
# per process, two processes. The theta sweep (--theta-sweep 0.3,0.6,0.8,0.9,1.0) is off: its 8 extra
# SFT runs would take the run past its 20 minutes.
EMBEDDED = dict(
    seeds=3, threads=1, workers=2, template="plain", rewards="correct_lenient=2.0", score_samples=100, theta_sweep=(),
    sft_steps=800, sft_lr=3e-3, sft_batch_size=8, sft_global_batch=8, sft_max_len=192,
    rl_steps=10, rl_lr=1e-4, rl_prompts_per_step=8, rl_generations=8, rl_max_prompt_len=64, rl_max_completion_len=96,
    rl_micro_batch=32, rl_temperature=0.7, rl_beta=0.0, rl_top_p=1.0, dual_rank=8, dual_shared_rank=2, dual_alpha=64.0,
    dual_target_rank=4.0, dual_t_init=100, dual_t_final=200, dual_delta_t=50, eval_batch_size=100,
    eval_max_new_tokens=96, save_every=250,
)
SMOKE = dict(
    EMBEDDED, seeds=2, score_samples=8, theta_sweep=(0.5, 0.9), sft_steps=4, sft_lr=2e-3, sft_batch_size=8,
    sft_global_batch=8, rl_steps=2, rl_prompts_per_step=2, rl_generations=4, rl_max_completion_len=24,
    dual_t_init=1, dual_t_final=1, dual_delta_t=1, eval_limit=16, eval_max_new_tokens=24, save_every=2, bootstrap=200,
)


def parse_config(argv: Optional[list[str]] = None) -> PipelineConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", dest="teachers", action="append", default=None, metavar="SPEC",
                        help="classify teacher (repeat; an odd number): rule:..., local:CKPT[,tokenizer=PATH], http:URL#MODEL "
                             "(default: real inputs rule:gsm8k-steps; embedded: three rules, see Pipeline.teachers)")
    add_dataclass_args(parser, PipelineConfig, skip=("teachers",))
    ns = parser.parse_args(argv)
    if ns.ckpt and not ns.tokenizer:  # a GGUF file or a model directory may carry its own tokenizer
        ns.tokenizer = checkpoint_tokenizer(ns.ckpt)
    real = [name for name in ("ckpt", "tokenizer", "train_data", "test_data") if getattr(ns, name)]
    if real and len(real) < 4:
        parser.error(f"real inputs need --ckpt, --tokenizer, --train-data and --test-data; got only {['--' + n.replace('_', '-') for n in real]}")
    base = PipelineConfig()
    if not real:
        base = dataclasses.replace(base, **(SMOKE if ns.smoke else EMBEDDED))
    elif ns.smoke:
        base = dataclasses.replace(base, **{k: v for k, v in SMOKE.items() if k not in ("template", "rewards")})
    try:
        cfg = dataclass_from_args(PipelineConfig, ns, base)
    except ValueError as error:
        parser.error(str(error))
    return dataclasses.replace(cfg, teachers=tuple(ns.teachers or ()))


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.dir = lambda *parts: os.path.join(cfg.out, *parts)  # noqa: E731

    # ---- inputs
    def inputs(self, stages: Stages) -> dict:
        cfg = self.cfg
        if cfg.ckpt:
            return {"train": cfg.train_data, "test": cfg.test_data, "tokenizer": cfg.tokenizer, "base": cfg.ckpt}
        from lorapar.pretrain import build_default_assets

        assets = cfg.assets or self.dir("assets")
        scale = "smoke" if cfg.smoke else "full"
        stages.run("assets", f"assets: synthetic task, tokenizer, tiny base ({scale})",
                   lambda redo: build_default_assets(assets, scale, cfg.seed))
        paths = build_default_assets(assets, scale, cfg.seed, progress=False)  # reused: only reads what exists
        with open(os.path.join(paths["base"], "pretrain.json"), encoding="utf-8") as handle:
            paths["pretrain_seconds"] = json.load(handle)["seconds"]  # when built, maybe by an earlier run
        return paths

    def teachers(self, inputs: dict) -> list[str]:
        if self.cfg.teachers:
            return list(self.cfg.teachers)
        if self.cfg.ckpt:
            return ["rule:gsm8k-steps"]
        # The synthetic answers: System 1 has one or two step lines before '####', System 2 three or more
        # (a line restates its event: S1 at most ~16 words, S2 at least ~17), and the rows carry their
        # ground truth. The tiny base as a local role-play teacher (--teacher local:OUT/assets/base) is
        # left out: it has never seen the role-play prompt, its votes carried no signal (183 of 200 rows
        # System 1) and its ~560-token prompts cost ~200 CPU seconds, time the seeds need more.
        return ["rule:gsm8k-steps,threshold=3", "rule:length,threshold=18", "rule:oracle"]

    # ---- stages
    def classify(self, inputs: dict, redo: bool) -> dict:
        classify = script("classify")
        out = self.dir("classify", "labelled.jsonl")
        if redo:
            shutil.rmtree(self.dir("classify"), ignore_errors=True)
        argv = ["--data", inputs["train"], "--format", "gsm8k", "--out", out, "--batch-size", str(self.cfg.teacher_batch_size)]
        for spec in self.teachers(inputs):
            argv += ["--teacher", spec]
        summary = classify.main(argv)
        return {k: summary.get(k) for k in ("rows", "system_1", "system_2", "fleiss_kappa", "reference_accuracy", "teachers")}

    def score(self, inputs: dict, labelled: str, seed: int, out: str, init: str, theta: float) -> dict:
        """score.py at one init and theta: importance, masks, random masks and the scored adapter_init/."""
        score = script("score")
        cfg = self.cfg
        argv = ["--ckpt", inputs["base"], "--tokenizer", inputs["tokenizer"], "--data", labelled, "--out", out,
                "--random-baseline", "--overwrite", "--theta", str(theta), "--samples", str(cfg.score_samples),
                "--template", cfg.template, "--rank", str(cfg.rank), "--lora-alpha", str(cfg.lora_alpha),
                "--targets", ",".join(cfg.targets), "--seed", str(seed), "--max-len", str(cfg.sft_max_len), "--init", init]
        report = score.main(argv)["report"]
        baseline = report.get("random_baseline")
        return {"active_fraction": report["partition"]["active_fraction"], "init": init, "theta": theta, "out": out,
                "random_scope": baseline.get("scope") if isinstance(baseline, dict) else None}

    def start(self, method: str, seed: int) -> tuple[list[str], str]:
        """(train_sft.py adapter flags, stage masks or '') of a method's SFT run for one seed."""
        cfg, run = self.cfg, self.dir(f"seed{seed}")
        if method == "dmlora":
            return ["--adapter", "dual", "--dual-rank", str(cfg.dual_rank), "--dual-shared-rank", str(cfg.dual_shared_rank),
                    "--dual-alpha", str(cfg.dual_alpha), "--dual-targets", ",".join(cfg.dual_targets),
                    "--dual-target-rank", str(cfg.dual_target_rank), "--dual-t-init", str(cfg.dual_t_init),
                    "--dual-t-final", str(cfg.dual_t_final), "--dual-delta-t", str(cfg.dual_delta_t)], ""
        if method == "lora":
            return ["--rank", str(cfg.rank), "--lora-alpha", str(cfg.lora_alpha), "--targets", ",".join(cfg.targets),
                    "--init", "lora"], ""
        score = os.path.join(run, "score_pissa" if method == "pissa" else "score")
        masks = os.path.join(score, "random_masks.safetensors" if method == "random" else "masks.safetensors")
        return ["--init-adapter", os.path.join(score, "adapter_init")], masks

    def sft(self, inputs: dict, labelled: str, out: str, seed: int, adapter: list[str], masks: str, redo: bool) -> dict:
        train_sft = script("train_sft")
        cfg = self.cfg
        argv = ["--preset", "lorapar-sft", "--ckpt", inputs["base"], "--tokenizer", inputs["tokenizer"], "--data", labelled,
                "--format", "labelled", "--template", cfg.template, "--out", out, "--seed", str(seed),
                "--max-steps", str(cfg.sft_steps), "--lr", str(cfg.sft_lr), "--batch-size", str(cfg.sft_batch_size),
                "--global-batch", str(cfg.sft_global_batch), "--max-len", str(cfg.sft_max_len),
                "--save-every", str(cfg.save_every), *adapter, *run_dir_flags(out, redo)]
        if masks:
            argv += ["--system", "1", "--masks", masks, "--stage", "1"]
        train_sft.main(argv)
        losses = [m["loss"] for m in read_metrics(out) if "loss" in m]  # the log survives a resume, unlike main's return
        return {"steps": len(losses), "loss_first": losses[0], "loss": losses[-1], "active_fraction": active_fraction(out)}

    def grpo(self, inputs: dict, labelled: str, method: str, seed: int, masks: str, redo: bool) -> dict:
        train_rl = script("train_rl")
        cfg, out = self.cfg, self.dir(f"seed{seed}", method, "rl")
        argv = ["--preset", "lorapar-grpo", "--ckpt", inputs["base"], "--tokenizer", inputs["tokenizer"],
                "--adapter", self.dir(f"seed{seed}", method, "sft"), "--data", labelled, "--format", "labelled",
                "--system", "2", "--template", cfg.template, "--rewards", cfg.rewards, "--out", out, "--seed", str(seed),
                "--max-steps", str(cfg.rl_steps), "--lr", str(cfg.rl_lr), "--prompts-per-step", str(cfg.rl_prompts_per_step),
                "--num-generations", str(cfg.rl_generations), "--max-prompt-len", str(cfg.rl_max_prompt_len),
                "--max-completion-len", str(cfg.rl_max_completion_len), "--beta", str(cfg.rl_beta),
                "--temperature", str(cfg.rl_temperature), "--top-p", str(cfg.rl_top_p),
                "--micro-batch", str(cfg.rl_micro_batch), "--save-every", str(cfg.save_every), *run_dir_flags(out, redo)]
        if masks:
            argv += ["--masks", masks, "--stage", "2"]
        train_rl.main(argv)
        steps = [m for m in read_metrics(out) if "reward_mean" in m]
        rewards = [m["reward_mean"] for m in steps]
        # pass@G: the share of a step's prompts with at least one correct completion among their G samples
        solved = [next(v for k, v in m.items() if k.startswith("reward/correct") and k.endswith("_any"))
                  for m in steps if any(k.startswith("reward/correct") and k.endswith("_any") for k in m)]
        return {"steps": len(rewards), "reward_first": rewards[0], "reward_last": rewards[-1],
                "reward_mean": sum(rewards) / len(rewards), "active_fraction": active_fraction(out),
                "pass_at_g": sum(solved) / len(solved) if solved else None,
                "pass_at_g_first": solved[0] if solved else None, "generations": cfg.rl_generations}

    def evaluate(self, inputs: dict, adapter: str, out: str) -> dict:
        from lorapar.evaluate import EvalArgs, run

        cfg = self.cfg
        args = EvalArgs(ckpt=inputs["base"], tokenizer=inputs["tokenizer"], adapter=adapter, task="gsm8k", data=inputs["test"],
                        out=out, limit=cfg.eval_limit, batch_size=cfg.eval_batch_size,
                        max_new_tokens=cfg.eval_max_new_tokens, template=cfg.template, overwrite=True)
        return {"metrics": run(args)["metrics"], "file": os.path.relpath(out, cfg.out)}

    # ---- the whole run
    def jobs(self) -> list[tuple[tuple[str, int, tuple], Optional[tuple]]]:
        """The run's independent parts as (job, the job it waits for), longest first after the short score
        jobs that the masked rows wait for, so that the workers finish together: every seed's score stages,
        the theta sweep's points (each trains twice), every (seed, row) (rows trained on all examples are
        the longest; DM-LoRA has no GRPO) and the base evaluation."""
        cfg = self.cfg
        inits = tuple(init for init, rows in (("gaussian", {"lorapar", "random"}), ("pissa", {"pissa"}))
                      if rows & set(cfg.methods))
        scores = {s: ("score", s, inits) for s in cfg.seed_values()} if inits else {}
        sweep = [("sweep", cfg.seed, (theta,)) for theta in cfg.theta_sweep
                 if not (theta == cfg.theta and self.sweep_reuses_rows())]
        order = [m for m in ("lora", "random", "lorapar", "pissa", "dmlora") if m in cfg.methods]
        rows = [(("row", s, (m,)), scores[s] if m in ("lorapar", "random", "pissa") else None)
                for m in order for s in cfg.seed_values()]
        return ([(job, None) for job in scores.values()] + [(job, None) for job in sweep] + rows
                + [(("base", cfg.seed, ()), None)])

    def run_job(self, job: tuple[str, int, tuple], inputs: dict) -> None:
        kind, seed, what = job
        total = {"score": len(what), "sweep": 5, "base": 1}.get(kind, 2 if what == ("dmlora",) else 4)
        stages = Stages(self.cfg.out, self.cfg.overwrite, total=total)
        labelled = self.dir("classify", "labelled.jsonl")
        if kind == "base":
            stages.run("base.eval", "evaluate: the base model without an adapter",
                       lambda redo: self.evaluate(inputs, "", self.dir("base_eval.json")))
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
        stages = Stages(cfg.out, cfg.overwrite, total=(0 if cfg.ckpt else 1) + 1)
        if cfg.threads:  # the serial stages (assets, classify) run alone: they get every core the workers share
            torch.set_num_threads(cfg.threads * cfg.workers)
        inputs = self.inputs(stages)
        atomic_write_json(self.dir("inputs.json"), inputs)
        stages.run("classify", "classify: System 1 / System 2 by the teachers' vote", lambda redo: self.classify(inputs, redo))
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
            stages.run(f"seed{seed}.score", f"seed {seed}: score at the gaussian init, theta {theta} masks, random masks",
                       lambda redo: self.score(inputs, labelled, seed, run("score"), "gaussian", theta))
        if "pissa" in inits:
            stages.run(f"seed{seed}.score_pissa", f"seed {seed}: score at the PiSSA init, theta {theta} masks",
                       lambda redo: self.score(inputs, labelled, seed, run("score_pissa"), "pissa", theta))

    def run_row(self, stages: Stages, inputs: dict, labelled: str, seed: int, method: str) -> None:
        """One row of the table for one seed: SFT and its evaluation, then GRPO and its evaluation."""
        run = lambda *p: self.dir(f"seed{seed}", *p)  # noqa: E731
        adapter, masks = self.start(method, seed)
        tag = f"seed{seed}.{method}"
        stages.run(f"{tag}.sft", f"seed {seed}, {method}: SFT" + (" (System 1, stage-1 mask)" if masks else " (all rows)"),
                   lambda redo: self.sft(inputs, labelled, run(method, "sft"), seed, adapter, masks, redo))
        stages.run(f"{tag}.sft.eval", f"seed {seed}, {method}: evaluate after SFT",
                   lambda redo: self.evaluate(inputs, run(method, "sft"), run(method, "eval_sft.json")))
        if method == "dmlora":
            return
        stages.run(f"{tag}.rl", f"seed {seed}, {method}: GRPO (System 2" + (", stage-2 mask)" if masks else ")"),
                   lambda redo: self.grpo(inputs, labelled, method, seed, masks, redo))
        stages.run(f"{tag}.rl.eval", f"seed {seed}, {method}: evaluate after GRPO",
                   lambda redo: self.evaluate(inputs, run(method, "rl"), run(method, "eval_rl.json")))

    def sweep_reuses_rows(self) -> bool:
        """The theta of the main rows is a point of the curve: its seed's lorapar / random SFT runs."""
        return self.cfg.theta in self.cfg.theta_sweep and {"lorapar", "random"} <= set(self.cfg.methods)

    def run_sweep_point(self, stages: Stages, inputs: dict, labelled: str, seed: int, theta: float) -> None:
        """One point of the SFT-only theta curve for one seed: importance-selected vs random stage-1 masks
        of equal size. Both runs start from the adapter its score.py run scored (the same seed scores the
        same examples on the same gaussian adapter, so between thetas only the partition changes)."""
        out = self.dir("sweep", f"theta{theta}")
        stages.run(f"sweep.theta{theta}.score", f"sweep: theta {theta} masks and random masks (seed {seed})",
                   lambda redo: self.score(inputs, labelled, seed, os.path.join(out, "score"), "gaussian", theta))
        for kind, masks in (("importance", "masks.safetensors"), ("random", "random_masks.safetensors")):
            adapter = ["--init-adapter", os.path.join(out, "score", "adapter_init")]
            stages.run(f"sweep.theta{theta}.{kind}.sft", f"sweep: theta {theta}, {kind} masks: SFT (System 1)",
                       lambda redo: self.sft(inputs, labelled, os.path.join(out, kind), seed, adapter,
                                             os.path.join(out, "score", masks), redo))
            stages.run(f"sweep.theta{theta}.{kind}.sft.eval", f"sweep: theta {theta}, {kind} masks: evaluate",
                       lambda redo: self.evaluate(inputs, os.path.join(out, kind), os.path.join(out, f"eval_{kind}.json")))


def run_in_workers(jobs: list[tuple[tuple, Optional[tuple]]], cfg: PipelineConfig, inputs: dict, workers: int) -> None:
    """Run Pipeline.jobs() on `workers` processes, in their order, each once the job it waits for is done.

    The jobs share nothing but the inputs, the labels and the files of the jobs they wait for. The workers
    are spawned (no thread pool or tensor state inherited), one core each, and kept from job to job: a
    job depends on no process state (every stage seeds itself), and each new process would import torch again."""
    finished: queue.SimpleQueue = queue.SimpleQueue()
    pending, running, done = list(jobs), 0, set()
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        while pending or running:
            ready = [entry for entry in pending if entry[1] is None or entry[1] in done]
            for entry in ready[: workers - running]:
                pending.remove(entry)
                running += 1
                pool.apply_async(run_job_in_worker, ((cfg, inputs, entry[0]),),
                                 callback=finished.put, error_callback=finished.put)
            if not running:
                raise RuntimeError(f"pipeline jobs wait for jobs that are not in the run: {pending}")
            outcome = finished.get()
            running -= 1
            if isinstance(outcome, BaseException):
                raise outcome  # the pool's exit terminates the other workers
            done.add(outcome)
            print(f"==== {outcome[0]} {outcome[1]} {','.join(map(str, outcome[2]))}: done", flush=True)


def run_job_in_worker(task: tuple) -> tuple[str, int, tuple]:
    """One job of Pipeline.jobs() in a worker process (module level: a spawned process imports it)."""
    cfg, inputs, job = task
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    Pipeline(cfg).run_job(job, inputs)
    return job


def main(argv: Optional[list[str]] = None) -> dict:
    return Pipeline(parse_config(argv)).run()


if __name__ == "__main__":
    run_main(main)
