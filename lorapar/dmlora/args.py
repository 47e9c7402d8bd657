"""DM-LoRA's settings: the adapter's shape and inits, and its importance screening (the --dual-* flags)."""

from __future__ import annotations

from dataclasses import dataclass

from lorapar.config import field
from lorapar.dmlora.budget import PRUNING_MODES, schedule_steps
from lorapar.errors import FlagError, check_fields

EXPERT_INITS = ("gaussian", "released")
SHARED_INITS = ("pissa", "released")


@dataclass
class DualArgs:
    """DM-LoRA's adapter shape and its importance screening (defaults: the authors' supplement, train.sh)."""

    dual_rank: int = field(default=128, metadata={"help": "total rank r = r_shared + r_expert"})
    dual_shared_rank: int = field(default=32, metadata={"help": "rank of the PiSSA shared module (the rest is expert)"})
    dual_alpha: float = field(default=128.0, metadata={"help": "scale s = alpha / dual_rank for both modules"})
    dual_targets: tuple[str, ...] = field(
        default=("q", "k", "v", "o", "gate", "up", "down"),
        metadata={"help": "target linears (Meta, HF or short names)"},
    )
    dual_dropout: float = 0.0
    dual_shared_init: str = field(
        default="pissa",
        metadata={
            "choices": list(SHARED_INITS),
            "help": "pissa: the principal factors of the loaded W0, the residual in the base (the paper); released: "
            "the supplement's code, the principal factors of a random kaiming matrix and W0 left as it is",
        },
    )
    dual_expert_init: str = field(
        default="gaussian",
        metadata={
            "choices": list(EXPERT_INITS),
            "help": "gaussian: A_e, B_e ~ N(0, init_std^2), E = 0 (AdaLoRA); released: the supplement's kaiming A_e, "
            "B_e = E = 0, which no gradient ever reaches",
        },
    )
    dual_init_std: float = field(default=0.02, metadata={"help": "std of the expert factors A_e, B_e (gaussian init)"})
    dual_svd_niter: int = field(
        default=0,
        metadata={"help": "0 = exact SVD of W0; N > 0 = randomised SVD with N subspace iterations (the supplement: 4)"},
    )
    dual_target_rank: float = field(default=80.0, metadata={"help": "final average number of live expert components"})
    dual_t_init: float = field(
        default=235 / 1562,
        metadata={
            "help": "optimizer steps before pruning starts: a fraction of the run if < 1, else a number of steps "
            "(default: the supplement's 235 of 1562)"
        },
    )
    dual_t_final: float = field(
        default=780 / 1562,
        metadata={
            "help": "last optimizer steps with the final mask fixed: a fraction of the run if < 1, else steps "
            "(default: the supplement's 780 of 1562)"
        },
    )
    dual_delta_t: int = field(default=10, metadata={"help": "re-screen every this many steps"})
    dual_pruning: str = field(
        default="regrow",
        metadata={
            "choices": list(PRUNING_MODES),
            "help": "regrow: a screening zeroes the losers' gates, which may grow back until the final mask at "
            "T - t_final (AdaLoRA, the supplement); freeze: a pruned component is masked for good at once",
        },
    )
    dual_beta1: float = field(default=0.85, metadata={"help": "EMA of the sensitivity |w * grad|"})
    dual_beta2: float = field(default=0.85, metadata={"help": "EMA of the uncertainty |I - I_bar|"})
    dual_budget_power: float = field(default=2.0, metadata={"help": "budget schedule exponent (2 paper, 3 AdaLoRA)"})
    dual_orth_lambda: float = field(default=0.1, metadata={"help": "weight of the orthogonality regulariser"})
    dual_seed: int = field(default=0, metadata={"help": "seed of the expert init (and of a randomised SVD)"})

    @property
    def expert_rank(self) -> int:
        return self.dual_rank - self.dual_shared_rank

    @property
    def scale(self) -> float:
        return self.dual_alpha / self.dual_rank

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive=("dual_delta_t",),
            positive_float=("dual_alpha", "dual_budget_power"),
            non_negative=(
                "dual_init_std",
                "dual_svd_niter",
                "dual_t_init",
                "dual_t_final",
                "dual_orth_lambda",
                "dual_seed",
                "dual_target_rank",
            ),
            unit_interval=("dual_beta1", "dual_beta2"),
        )
        if not 0 <= self.dual_dropout < 1:
            raise FlagError(f"--dual-dropout {self.dual_dropout}: expected a value in [0, 1)")
        if not 0 < self.dual_shared_rank < self.dual_rank:
            raise ValueError(
                f"DualArgs: need 0 < dual_shared_rank ({self.dual_shared_rank}) < dual_rank ({self.dual_rank})"
            )
        if not 0 <= self.dual_target_rank <= self.expert_rank:
            raise ValueError(
                f"DualArgs: dual_target_rank ({self.dual_target_rank}) must lie in [0, expert rank {self.expert_rank}]"
            )
        for flag, value in (("--dual-t-init", self.dual_t_init), ("--dual-t-final", self.dual_t_final)):
            schedule_steps(value, 1, flag)  # the form of the value; the run length is checked by the screener
        for flag, value, choices in (
            ("--dual-pruning", self.dual_pruning, PRUNING_MODES),
            ("--dual-expert-init", self.dual_expert_init, EXPERT_INITS),
            ("--dual-shared-init", self.dual_shared_init, SHARED_INITS),
        ):
            if value not in choices:
                raise ValueError(f"DualArgs: {flag} {value!r}; expected one of {choices}")

    def schedule(self, total_steps: int) -> tuple[int, int]:
        """(t_init, t_final) in optimizer steps for a run of `total_steps`."""
        return (
            schedule_steps(self.dual_t_init, total_steps, "--dual-t-init"),
            schedule_steps(self.dual_t_final, total_steps, "--dual-t-final"),
        )
