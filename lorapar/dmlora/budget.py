"""The DM-LoRA budget schedule: how many expert components stay live after each optimizer step.

Warm-up (nothing pruned) for t_init steps, then a polynomial decay of the global budget from every
component to the target average, reached at step T - t_final, then the final phase with the mask
fixed. Which components survive: lorapar/dmlora/screening.py.
"""

from __future__ import annotations

import math

PRUNING_MODES = ("regrow", "freeze")


def schedule_steps(value: float, total_steps: int, flag: str) -> int:
    """A phase length of the budget schedule in optimizer steps: a value in [0, 1) is that fraction of
    the run (rounded to the nearest step), a whole number >= 1 is a count of steps. So the supplement's
    235 and 780 of 1,562 steps are 0.1504... and 0.4994..., and fit any run length."""
    if value < 0 or math.isnan(value) or (value >= 1 and value != int(value)):
        raise ValueError(
            f"{flag}: expected a fraction of the run in [0, 1) or a whole number of steps >= 1, got {value}"
        )
    return round(value * total_steps) if value < 1 else int(value)


def budget_at(
    step: int, total_steps: int, initial: int, target: int, t_init: int, t_final: int, power: float = 2.0
) -> int:
    """The global number of live expert components after optimizer step `step` (1-based).

        step <= t_init              initial                       (warm-up: nothing pruned)
        t_init < step < T - t_final target + (initial - target) * (1 - (step - t_init) / (T - t_final - t_init))^power
        step >= T - t_final         target                        (final phase: masks fixed)

    power 2 is the DM-LoRA paper's quadratic schedule; AdaLoRA uses 3. The value is rounded down
    (AdaLoRA's `int`), so the budget reaches `target` exactly at step T - t_final.
    """
    check_schedule(total_steps, initial, target, t_init, t_final)
    if step <= t_init:
        return initial
    prune_end = total_steps - t_final
    if step >= prune_end:
        return target
    remaining = 1.0 - (step - t_init) / (prune_end - t_init)
    return int(target + (initial - target) * remaining**power)


def check_schedule(total_steps: int, initial: int, target: int, t_init: int, t_final: int) -> None:
    if not 0 <= t_init or not 0 <= t_final or t_init + t_final >= total_steps:
        raise ValueError(
            f"budget schedule: need 0 <= t_init ({t_init}), 0 <= t_final ({t_final}) and "
            f"t_init + t_final < total steps ({total_steps}); lower --dual-t-init / --dual-t-final"
        )
    if not 0 <= target <= initial:
        raise ValueError(f"budget schedule: target budget {target} must lie in [0, initial budget {initial}]")
