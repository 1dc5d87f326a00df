"""The step-based settings follow the stage schedule (gvae_ns/step_budget.py)."""

from __future__ import annotations

import copy

import pytest
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig

from gvae_ns.method import gaussianvae
from gvae_ns.stages import DEFAULT_STAGE_STEPS, StageSchedule
from gvae_ns.step_budget import densify_stop, follow_schedule, reset_interval

METHOD_STEPS = sum(DEFAULT_STAGE_STEPS)


def _config(stage_steps=None, **model):
    config = copy.deepcopy(gaussianvae.config)
    if stage_steps is not None:
        config.pipeline.model.stage_steps = stage_steps
    for key, value in model.items():
        setattr(config.pipeline.model, key, value)
    return config


def test_default_schedule_gives_the_finest_stage_most_steps():
    model = gaussianvae.config.pipeline.model
    assert model.stage_downscales[-1] == 1  # ends at the data's own resolution
    assert model.stage_steps[-1] >= 0.7 * sum(model.stage_steps)
    assert model.rasterize_mode == "antialiased"


def test_defaults_follow_a_shorter_schedule():
    config = _config((200, 400, 1400))
    changes = follow_schedule(config, METHOD_STEPS)
    assert config.max_num_iterations == 2000
    means = config.optimizers["means"]["scheduler"]
    assert isinstance(means, ExponentialDecaySchedulerConfig) and means.max_steps == 2000
    assert config.optimizers["camera_opt"]["scheduler"].max_steps == 2000
    model = config.pipeline.model
    assert model.stop_split_at == 600 + 700  # half-way through the finest stage
    assert model.stop_screen_size_at == round(2000 * 4000 / 30000)
    assert len(changes) >= 4


def test_user_values_are_kept():
    config = _config((200, 400, 1400), stop_split_at=500, reset_alpha_every=7)
    config.max_num_iterations = 1700
    follow_schedule(config, METHOD_STEPS)
    assert config.max_num_iterations == 1700
    assert config.optimizers["means"]["scheduler"].max_steps == 1700  # the horizon is the run's length
    assert config.pipeline.model.stop_split_at == 500
    assert config.pipeline.model.reset_alpha_every == 7


def test_default_run_densifies_into_the_finest_stage_and_resets_off_the_switches():
    config = _config()
    follow_schedule(config, METHOD_STEPS)
    model = config.pipeline.model
    schedule = StageSchedule(tuple(model.stage_downscales), tuple(model.stage_steps))
    assert config.max_num_iterations == METHOD_STEPS
    assert schedule.boundaries[-2] < model.stop_split_at < METHOD_STEPS
    period = model.reset_alpha_every * model.refine_every
    resets = list(range(period, model.stop_split_at, period))
    assert len(resets) >= 3
    assert all(abs(r - s) > model.refine_every for r in resets for s in schedule.boundaries[1:-1])


def test_reset_interval_moves_off_a_stage_switch_and_turns_off_for_short_runs():
    # target 1500 steps would land on the switches at 1500 and 4500
    every = reset_interval(15000, 100, (1500, 4500), 9750)
    assert every != 15
    assert all(abs(r - s) > 100 for r in range(every * 100, 9750, every * 100) for s in (1500, 4500))
    # 300 steps with densification every 50: a tenth of the run is under two intervals, so no resets
    never = reset_interval(300, 50, (30, 90), 195)
    assert never * 50 >= 195


@pytest.mark.parametrize("steps", [(10, 20, 70), (1, 1, 1)])
def test_densify_stop_is_inside_the_finest_stage(steps):
    schedule = StageSchedule((4, 2, 1), steps)
    stop = densify_stop(schedule, schedule.total_steps)
    assert schedule.boundaries[-2] < stop <= schedule.total_steps
