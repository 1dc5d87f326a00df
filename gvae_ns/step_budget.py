"""Step-based settings that follow the stage schedule: run length, LR horizon, densification, opacity resets.

splatfacto's densification and learning-rate settings are absolute step numbers tuned for its 30,000-step
run. A gaussianvae run lasts as long as its stage schedule (15,000 steps by default, any length with
``--pipeline.model.stage-steps``), so :func:`follow_schedule` rescales every such setting the user left at
its default, before anything trains (``ns-train`` calls it from ``save_config``, so ``config.yml`` holds the
values used):

* ``--max-num-iterations`` left at the method's default becomes the schedule's total;
* each exponential-decay LR scheduler left at the method's horizon decays over the run instead;
* densification (``stop_split_at``) runs through half of the finest stage, as splatfacto's runs through half
  of its single-resolution training; the screen-size split (``stop_screen_size_at``) keeps splatfacto's share;
* the opacity reset interval keeps splatfacto's share of the run (every 1/10) but spans at least ten
  densification intervals (none when that reaches the densification stop), moved by whole intervals so that
  no reset falls on a stage switch (resetting opacities as the resolution changes compounds two shocks).

A value the user set (anything but splatfacto's or the method's default) is kept as given.
"""

from __future__ import annotations

from typing import List, Sequence

from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.models.splatfacto import SplatfactoModelConfig

from gvae_ns.stages import StageSchedule

SPLATFACTO_RUN_STEPS = 30000
"""The run length splatfacto's step-based defaults are tuned for."""
_SPLATFACTO = SplatfactoModelConfig()
RESET_SHARE = _SPLATFACTO.reset_alpha_every * _SPLATFACTO.refine_every / SPLATFACTO_RUN_STEPS
"""Opacity reset interval as a share of the run (splatfacto: every 3,000 of 30,000 steps)."""
MIN_RESET_INTERVALS = 10
"""Fewest densification intervals between opacity resets (splatfacto: 30)."""
SCREEN_SIZE_SHARE = _SPLATFACTO.stop_screen_size_at / SPLATFACTO_RUN_STEPS
"""Share of the run in which Gaussians large on screen are split (splatfacto: 4,000 of 30,000 steps)."""


def densify_stop(schedule: StageSchedule, run_steps: int) -> int:
    """Step at which densification stops: half-way through the finest stage (of a run of ``run_steps``)."""
    finest_start = schedule.boundaries[-2]
    return finest_start + max(1, (run_steps - finest_start) // 2)


def reset_interval(run_steps: int, refine_every: int, stage_switches: Sequence[int], stop: int) -> int:
    """Opacity reset interval in densification intervals (``reset_alpha_every``); past ``stop`` for none.

    The target is :data:`RESET_SHARE` of the run, at least :data:`MIN_RESET_INTERVALS` densification intervals
    (densification pauses after each reset, so shorter periods leave none); of the counts near it, the nearest
    whose resets (before ``stop``) all stay more than one densification interval away from every stage switch
    is taken. None when even the shortest period reaches ``stop``."""
    target = max(MIN_RESET_INTERVALS, round(RESET_SHARE * run_steps / refine_every))
    never = stop // refine_every + 1
    if target * refine_every >= stop:
        return never
    for delta in range(0, target):
        for every in (target - delta, target + delta):
            if every < MIN_RESET_INTERVALS:
                continue
            period = every * refine_every
            resets = range(period, stop, period)
            if all(abs(r - s) > refine_every for r in resets for s in stage_switches):
                return every
    return never


def follow_schedule(trainer_config, method_run_steps: int) -> List[str]:
    """Rescale the step-based settings of a gaussianvae ``TrainerConfig`` that are at their defaults to its
    stage schedule (see the module docstring); ``method_run_steps`` is the method's default run length.
    Returns one line per changed setting, for the console."""
    model = trainer_config.pipeline.model
    schedule = StageSchedule(tuple(model.stage_downscales), tuple(model.stage_steps))
    changes: List[str] = []
    if trainer_config.max_num_iterations == method_run_steps and schedule.total_steps != method_run_steps:
        trainer_config.max_num_iterations = schedule.total_steps
        changes.append(f"--max-num-iterations {schedule.total_steps} (the stage schedule's total)")
    run_steps = int(trainer_config.max_num_iterations)
    for name, entry in trainer_config.optimizers.items():
        scheduler = entry.get("scheduler")
        if isinstance(scheduler, ExponentialDecaySchedulerConfig) and scheduler.max_steps == method_run_steps \
                and run_steps != method_run_steps:
            scheduler.max_steps = run_steps
            changes.append(f"{name} learning rate decays over {run_steps} steps")
    if model.stop_split_at == _SPLATFACTO.stop_split_at:
        model.stop_split_at = densify_stop(schedule, run_steps)
        changes.append(f"densification stops at step {model.stop_split_at} (half-way through the finest stage)")
    if model.stop_screen_size_at == _SPLATFACTO.stop_screen_size_at:
        model.stop_screen_size_at = max(1, round(SCREEN_SIZE_SHARE * run_steps))
        changes.append(f"screen-size splits stop at step {model.stop_screen_size_at}")
    if model.reset_alpha_every == _SPLATFACTO.reset_alpha_every:
        every = reset_interval(run_steps, int(model.refine_every), schedule.boundaries[1:-1],
                               int(model.stop_split_at))
        model.reset_alpha_every = every
        period = every * int(model.refine_every)
        changes.append(f"opacities reset every {period} steps" if period < model.stop_split_at
                       else "no opacity resets (the run is too short for them)")
    return changes
