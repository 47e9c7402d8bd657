"""What each stage of the pipeline does (lorapar/pipeline.py schedules them): read or build the inputs,
classify, score, SFT, GRPO and evaluate, each by running the script or library call a user would run, with
the run's settings. Every method returns the stage's record (its result and files)."""

from __future__ import annotations

import json
import os
import shutil

from lorapar import evaluate
from lorapar.config import to_argv
from lorapar.dmlora.args import DualArgs
from lorapar.grpo import GRPOArgs
from lorapar.importance import ImportanceArgs
from lorapar.lora_settings import LoraSettings
from lorapar.partition import PartitionArgs
from lorapar.pipeline_config import PipelineConfig
from lorapar.pretrain import build_default_assets
from lorapar.script_args import (
    RL_PRESETS,
    SFT_PRESETS,
    ClassifyArgs,
    RLArgs,
    ScoreArgs,
    SFTArgs,
    TrainArgs,
    classify_summary_path,
    over_preset,
)
from lorapar.stages import Stages, active_fraction, read_json, read_metrics, run_dir_state
from lorapar.teachers import TeacherArgs


class PipelineStages:
    """The stages of one run into cfg.out; Pipeline orders and runs them."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.dir = lambda *parts: os.path.join(cfg.out, *parts)  # noqa: E731

    # ---- inputs
    def inputs(self, stages: Stages) -> dict:
        cfg = self.cfg
        if cfg.ckpt:
            return {"train": cfg.train_data, "test": cfg.test_data, "tokenizer": cfg.tokenizer, "base": cfg.ckpt}
        assets = cfg.assets or self.dir("assets")
        scale = "smoke" if cfg.smoke else "full"
        stages.run(
            "assets",
            f"assets: synthetic task, tokenizer, tiny base ({scale})",
            lambda redo: build_default_assets(assets, scale, cfg.seed),
        )
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

    # ---- stages: each script run as a user runs it (Stages.launch), its results read from the files it wrote
    def classify(self, stages: Stages, inputs: dict, redo: bool) -> dict:
        out = self.dir("classify", "labelled.jsonl")
        if redo:
            shutil.rmtree(self.dir("classify"), ignore_errors=True)
        args = ClassifyArgs(data=inputs["train"], format="gsm8k", out=out)
        teachers = [flag for spec in self.teachers(inputs) for flag in ("--teacher", spec)]
        stages.launch(
            "classify.py", [*to_argv(args), *to_argv(TeacherArgs(batch_size=self.cfg.teacher_batch_size)), *teachers]
        )
        summary = read_json(classify_summary_path(out))
        return {
            k: summary.get(k)
            for k in ("rows", "system_1", "system_2", "fleiss_kappa", "reference_accuracy", "teachers")
        }

    def score(self, stages: Stages, inputs: dict, labelled: str, seed: int, out: str, init: str, theta: float) -> dict:
        """score.py at one init and theta: importance, masks, random masks and the scored adapter_init/."""
        cfg = self.cfg
        args = ScoreArgs(
            ckpt=inputs["base"],
            tokenizer=inputs["tokenizer"],
            data=labelled,
            out=out,
            random_baseline=True,
            overwrite=True,
        )
        importance = ImportanceArgs(
            rank=cfg.rank,
            lora_alpha=cfg.lora_alpha,
            targets=cfg.targets,
            samples=cfg.score_samples,
            template=cfg.template,
            max_len=cfg.sft_max_len,
            init=init,
            seed=seed,
        )
        stages.launch("score.py", [*to_argv(args), *to_argv(importance), *to_argv(PartitionArgs(theta=theta))])
        report = read_json(os.path.join(out, "report.json"))
        baseline = report.get("random_baseline")
        return {
            "active_fraction": report["partition"]["active_fraction"],
            "init": init,
            "theta": theta,
            "out": out,
            "random_scope": baseline.get("scope") if isinstance(baseline, dict) else None,
        }

    def start(self, method: str, seed: int) -> tuple[list[str], str]:
        """(train_sft.py adapter flags, stage masks or '') of a method's SFT run for one seed."""
        cfg, run = self.cfg, self.dir(f"seed{seed}")
        if method == "dmlora":
            dual = DualArgs(
                dual_rank=cfg.dual_rank,
                dual_shared_rank=cfg.dual_shared_rank,
                dual_alpha=cfg.dual_alpha,
                dual_targets=cfg.dual_targets,
                dual_target_rank=cfg.dual_target_rank,
                dual_t_init=cfg.dual_t_init,
                dual_t_final=cfg.dual_t_final,
                dual_delta_t=cfg.dual_delta_t,
            )
            return ["--adapter", "dual", *to_argv(dual, skip=("dual_seed",))], ""
        if method == "lora":
            return [*to_argv(LoraSettings(rank=cfg.rank, lora_alpha=cfg.lora_alpha, targets=cfg.targets))], ""
        score = os.path.join(run, "score_pissa" if method == "pissa" else "score")
        masks = os.path.join(score, "random_masks.safetensors" if method == "random" else "masks.safetensors")
        return ["--init-adapter", os.path.join(score, "adapter_init")], masks

    def sft(
        self,
        stages: Stages,
        inputs: dict,
        labelled: str,
        out: str,
        seed: int,
        adapter: list[str],
        masks: str,
        redo: bool,
    ) -> dict:
        cfg, preset = self.cfg, SFT_PRESETS["lorapar-sft"]
        masked = dict(system=1, masks=masks, stage=1) if masks else {}
        args = over_preset(
            SFTArgs,
            preset,
            ckpt=inputs["base"],
            tokenizer=inputs["tokenizer"],
            data=labelled,
            format="labelled",
            template=cfg.template,
            max_len=cfg.sft_max_len,
            **masked,
        )
        train = over_preset(
            TrainArgs,
            preset,
            out=out,
            seed=seed,
            max_steps=cfg.sft_steps,
            lr=cfg.sft_lr,
            batch_size=cfg.sft_batch_size,
            global_batch=cfg.sft_global_batch,
            save_every=cfg.save_every,
            **run_dir_state(out, redo),
        )
        stages.launch(
            "train_sft.py",
            [
                "--preset",
                "lorapar-sft",
                *to_argv(args, over_preset(SFTArgs, preset)),
                *to_argv(train, over_preset(TrainArgs, preset)),
                *adapter,
            ],
        )
        losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
        return {
            "steps": len(losses),
            "loss_first": losses[0],
            "loss": losses[-1],
            "active_fraction": active_fraction(out),
        }

    def grpo(self, stages: Stages, inputs: dict, labelled: str, method: str, seed: int, masks: str, redo: bool) -> dict:
        cfg, preset, out = self.cfg, RL_PRESETS["lorapar-grpo"], self.dir(f"seed{seed}", method, "rl")
        masked = dict(masks=masks, stage=2) if masks else {}
        args = over_preset(
            RLArgs,
            preset,
            ckpt=inputs["base"],
            tokenizer=inputs["tokenizer"],
            data=labelled,
            adapter=self.dir(f"seed{seed}", method, "sft"),
            format="labelled",
            system=2,
            template=cfg.template,
            rewards=cfg.rewards,
            **masked,
        )
        grpo = over_preset(
            GRPOArgs,
            preset,
            prompts_per_step=cfg.rl_prompts_per_step,
            num_generations=cfg.rl_generations,
            max_prompt_len=cfg.rl_max_prompt_len,
            max_completion_len=cfg.rl_max_completion_len,
            beta=cfg.rl_beta,
            temperature=cfg.rl_temperature,
            top_p=cfg.rl_top_p,
            micro_batch=cfg.rl_micro_batch,
        )
        train = over_preset(
            TrainArgs,
            preset,
            out=out,
            seed=seed,
            max_steps=cfg.rl_steps,
            lr=cfg.rl_lr,
            save_every=cfg.save_every,
            **run_dir_state(out, redo),
        )
        stages.launch(
            "train_rl.py",
            [
                "--preset",
                "lorapar-grpo",
                *to_argv(args, over_preset(RLArgs, preset)),
                *to_argv(grpo, over_preset(GRPOArgs, preset)),
                *to_argv(train, over_preset(TrainArgs, preset)),
            ],
        )
        steps = [m for m in read_metrics(out) if "reward_mean" in m]
        rewards = [m["reward_mean"] for m in steps]
        # pass@G: the share of a step's prompts with at least one correct completion among their G samples
        solved = [
            next(v for k, v in m.items() if k.startswith("reward/correct") and k.endswith("_any"))
            for m in steps
            if any(k.startswith("reward/correct") and k.endswith("_any") for k in m)
        ]
        return {
            "steps": len(rewards),
            "reward_first": rewards[0],
            "reward_last": rewards[-1],
            "reward_mean": sum(rewards) / len(rewards),
            "active_fraction": active_fraction(out),
            "pass_at_g": sum(solved) / len(solved) if solved else None,
            "pass_at_g_first": solved[0] if solved else None,
            "generations": cfg.rl_generations,
        }

    def evaluate(self, inputs: dict, adapter: str, out: str) -> dict:
        cfg = self.cfg
        args = evaluate.EvalArgs(
            ckpt=inputs["base"],
            tokenizer=inputs["tokenizer"],
            adapter=adapter,
            task="gsm8k",
            data=inputs["test"],
            out=out,
            limit=cfg.eval_limit,
            batch_size=cfg.eval_batch_size,
            max_new_tokens=cfg.eval_max_new_tokens,
            template=cfg.template,
            overwrite=True,
        )
        return {"metrics": evaluate.run(args)["metrics"], "file": os.path.relpath(out, cfg.out)}
