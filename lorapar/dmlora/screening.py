"""Importance screening of the DM-LoRA expert components: AdaLoRA's sensitivity EMAs and rank budget.

Each expert module of rank r_e holds components i = (row i of A_e, gate E_i, column i of B_e). After
every optimizer step before T - t_final the per-element sensitivity of every expert parameter w is
smoothed as in AdaLoRA (Zhang et al., ICLR 2023; the update order is its reference code's):

    I      = |w * dL/dw|
    I_bar <- beta1 * I_bar + (1 - beta1) * I
    U_bar <- beta2 * U_bar + (1 - beta2) * |I - I_bar|      (I_bar already updated)
    s      = I_bar * U_bar

and a component's score is s(E_i) + mean_j s(A_e[i, j]) + mean_j s(B_e[j, i]). Every delta_T steps the
components of all modules are ranked together and the best `budget_at` of them are kept. Two rules for
the others (`mode`):

- "regrow" (AdaLoRA and the DM-LoRA supplement): their gates are set to 0 and nothing else; every
  component keeps training, so a gated one that still gets gradient grows back and can win its place
  at the next screening. At step T - t_final the last screening fixes the final mask: from then on
  the losers are held by element masks (E_i = 0, A_e row and B_e column bit-identical, optimizer
  state dropped).
- "freeze": the losers are masked at every screening, monotonically (a pruned component never returns:
  its gate is 0 and masked, so its sensitivity is exactly 0), and the optimizer state shrinks as soon
  as a component is pruned.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

from lorapar.dmlora.budget import PRUNING_MODES, budget_at, check_schedule


class SensitivityEMA:
    """The smoothed sensitivity I_bar and uncertainty U_bar of each named tensor (see module docstring)."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85):
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"sensitivity EMA betas must lie in [0, 1); got beta1={beta1}, beta2={beta2}")
        self.beta1, self.beta2 = beta1, beta2
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, name: str, weight: torch.Tensor, grad: Optional[torch.Tensor]) -> None:
        if grad is None:
            raise RuntimeError(
                f"importance screening: {name} has no gradient; call the screener after backward and the "
                "optimizer step but before zero_grad"
            )
        current = (weight.float() * grad.float()).abs()
        if name not in self.sensitivity:
            self.sensitivity[name] = torch.zeros_like(current)
            self.uncertainty[name] = torch.zeros_like(current)
        smoothed = self.sensitivity[name].mul_(self.beta1).add_(current, alpha=1.0 - self.beta1)
        self.uncertainty[name].mul_(self.beta2).add_((current - smoothed).abs_(), alpha=1.0 - self.beta2)

    def score(self, name: str) -> torch.Tensor:
        return self.sensitivity[name] * self.uncertainty[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"sensitivity.{k}": v for k, v in self.sensitivity.items()},
            **{f"uncertainty.{k}": v for k, v in self.uncertainty.items()},
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            kind, _, name = key.partition(".")
            if kind not in ("sensitivity", "uncertainty") or not name:
                raise KeyError(
                    f"screener state: unexpected key {key!r}; expected 'sensitivity.<name>' or 'uncertainty.<name>'"
                )
            getattr(self, kind)[name] = value.clone()


def component_scores(score_A: torch.Tensor, score_B: torch.Tensor, score_E: torch.Tensor) -> torch.Tensor:
    """Score of each component (r,) from element scores of A_e (r, in), B_e (out, r) and E (r,)."""
    return score_E + score_A.mean(dim=1) + score_B.mean(dim=0)


def select_survivors(scores: list[torch.Tensor], alive: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Keep the `budget` best of the `alive` components across all modules; return the kept masks.

    Components not alive are never kept. Exactly `budget` survive (AdaLoRA instead drops every score
    <= the k-th smallest, all ties included); ties are broken by position, deterministically, so every
    data-parallel rank (which sees the same reduced gradients) keeps the same components.
    """
    flat_scores = torch.cat([s.float().flatten() for s in scores])
    flat_alive = torch.cat([a.flatten() for a in alive])
    n_alive = int(flat_alive.sum())
    if n_alive <= budget:
        return [a.clone() for a in alive]
    ranked = torch.where(flat_alive, flat_scores, torch.full_like(flat_scores, -float("inf")))
    order = torch.sort(ranked, descending=True, stable=True).indices
    survivors = torch.zeros_like(flat_alive)
    survivors[order[:budget]] = True
    return list(torch.split(survivors, [a.numel() for a in alive]))


class ExpertModule(Protocol):
    """What the screener needs of a DualLoRALinear."""

    expert_A: torch.nn.Parameter  # (r_e, in)
    expert_B: torch.nn.Parameter  # (out, r_e)
    expert_E: torch.nn.Parameter  # (r_e,)
    expert_alive: torch.Tensor  # (r_e,) bool: not masked

    def prune_experts(self, alive: torch.Tensor) -> None: ...

    def gate_experts(self, kept: torch.Tensor) -> None: ...


class ExpertScreener:
    """Call `step(global_step)` after every optimizer step (before zero_grad).

    Updates the EMAs at every step before T - t_final, screens every `delta_t` steps after t_init and
    once more at step T - t_final (so the budget meets its target exactly there, and that screening's
    mask is the final one), then drops the EMAs and leaves the masks fixed. `t_init` and `t_final` are
    optimizer steps (see schedule_steps for fractions of the run). `on_prune(names)` is called after
    masks changed so the optimizer can drop the state of the newly frozen elements.
    """

    def __init__(
        self,
        modules: dict[str, ExpertModule],
        total_steps: int,
        target_rank: float,
        t_init: int,
        t_final: int,
        delta_t: int,
        beta1: float = 0.85,
        beta2: float = 0.85,
        power: float = 2.0,
        on_prune: Optional[Callable[[list[str]], None]] = None,
        mode: str = "regrow",
    ):
        if not modules:
            raise ValueError("importance screening: the model has no dual-LoRA modules")
        if delta_t < 1:
            raise ValueError(f"importance screening: delta_t must be >= 1, got {delta_t}")
        if mode not in PRUNING_MODES:
            raise ValueError(f"importance screening: unknown pruning mode {mode!r}; expected one of {PRUNING_MODES}")
        self.modules, self.mode = modules, mode
        self.total_steps, self.t_init, self.t_final, self.delta_t, self.power = (
            total_steps,
            t_init,
            t_final,
            delta_t,
            power,
        )
        self.initial_budget = sum(m.expert_E.numel() for m in modules.values())
        self.target_budget = int(round(target_rank * len(modules)))
        check_schedule(total_steps, self.initial_budget, self.target_budget, t_init, t_final)
        self.ema = SensitivityEMA(beta1, beta2)
        self.on_prune = on_prune
        self.last_step = 0
        # The components the last screening kept ("regrow": the others' gates were zeroed there).
        self.kept = {name: m.expert_alive for name, m in modules.items()}

    @property
    def prune_end(self) -> int:
        """The step of the last screening, whose mask is final: T - t_final."""
        return self.total_steps - self.t_final

    @property
    def finished(self) -> bool:
        """Past the pruning phase: the masks are final and the EMAs no longer needed."""
        return self.last_step >= self.prune_end

    def budget(self, step: int) -> int:
        return budget_at(
            step, self.total_steps, self.initial_budget, self.target_budget, self.t_init, self.t_final, self.power
        )

    def live_components(self) -> int:
        """Components kept by the last screening (all of them before the first)."""
        return sum(int(k.sum()) for k in self.kept.values())

    def step(self, global_step: int) -> Optional[int]:
        """Returns the budget applied when this step screened, else None."""
        self.last_step = global_step
        if global_step > self.prune_end:
            return None
        if global_step > 1 and not self.ema.sensitivity:
            raise RuntimeError(
                f"importance screening at step {global_step}: the EMAs are missing (resumed without them?)"
            )
        # As peft's AdaLoRA (which the supplement adapts): the final screening at T - t_final ranks the
        # EMAs of the steps before it, unless there were none (a run with T - t_final = 1).
        if global_step < self.prune_end or not self.ema.sensitivity:
            for name, module in self.modules.items():
                for part in ("A", "B", "E"):
                    param = getattr(module, f"expert_{part}")
                    self.ema.update(f"{name}.{part}", param, param.grad)
        if global_step <= self.t_init or (global_step % self.delta_t and global_step != self.prune_end):
            return None
        budget = self.budget(global_step)
        final = global_step == self.prune_end
        self.screen(budget, final=final)
        if final:  # the masks are fixed: the EMAs (twice the expert's size) are no longer needed
            self.ema = SensitivityEMA(self.ema.beta1, self.ema.beta2)
        return budget

    @torch.no_grad()
    def screen(self, budget: int, final: bool = False) -> list[str]:
        """Keep the `budget` best components; mask the others ("freeze", or the final screening) or
        zero their gates ("regrow"). Returns the names of the modules whose masks changed."""
        names = list(self.modules)
        scores = [
            component_scores(self.ema.score(f"{n}.A"), self.ema.score(f"{n}.B"), self.ema.score(f"{n}.E"))
            for n in names
        ]
        alive = [self.modules[n].expert_alive for n in names]  # "regrow": all True until the final mask
        survivors = select_survivors(scores, alive, budget)
        self.kept = dict(zip(names, (s.clone() for s in survivors)))
        if self.mode == "regrow" and not final:
            for name, kept in zip(names, survivors):
                self.modules[name].gate_experts(kept)
            return []
        changed = [n for n, old, new in zip(names, alive, survivors) if not torch.equal(old, new)]
        for name, new in zip(names, survivors):
            if name in changed:
                self.modules[name].prune_experts(new)
        if changed and self.on_prune is not None:
            self.on_prune(changed)
        return changed

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.ema.state_dict(), **{f"kept.{name}": kept for name, kept in self.kept.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        kept = {key.removeprefix("kept."): value for key, value in state.items() if key.startswith("kept.")}
        unknown = sorted(set(kept) - set(self.modules))
        if unknown:
            raise KeyError(f"screener state: kept-component masks for unknown module(s) {unknown[:3]}")
        self.ema.load_state_dict({k: v for k, v in state.items() if not k.startswith("kept.")})
        self.kept.update({name: value.clone() for name, value in kept.items()})

    def refresh_kept(self) -> None:
        """After loading masks with no screener state (the final phase): the kept set is the mask."""
        self.kept = {name: m.expert_alive for name, m in self.modules.items()}
