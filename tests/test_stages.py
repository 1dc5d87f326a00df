"""The resolution-stage schedule and the model's use of it."""

import pytest

from gvae_ns.stages import StageSchedule, StageScheduleError


def test_boundaries_and_lookup():
    s = StageSchedule((8, 4, 2), (10, 20, 30))
    assert s.boundaries == (0, 10, 30, 60)
    assert s.total_steps == 60
    assert [s.stage_at(t) for t in (0, 9, 10, 29, 30, 59, 100)] == [0, 0, 1, 1, 2, 2, 2]
    assert [s.downscale_at(t) for t in (0, 10, 30, 1000)] == [8, 4, 2, 2]
    assert [t for t in range(70) if s.is_stage_end(t)] == [9, 29, 59]


@pytest.mark.parametrize(
    "downscales, steps, words",
    [
        ((), (), "empty"),
        ((8, 4), (10,), "one step count per stage"),
        ((4, 8), (1, 1), "strictly decrease"),
        ((4, 4), (1, 1), "strictly decrease"),
        ((2, 0.5), (1, 1), "integer >= 1"),
        ((4, 2), (1, 0), "at least one step"),
    ],
)
def test_bad_schedules_name_the_problem(downscales, steps, words):
    with pytest.raises(StageScheduleError, match=words):
        StageSchedule(downscales, steps)


def test_image_too_small_for_coarsest_stage():
    s = StageSchedule((16, 8), (1, 1))
    s.check_image_size(256, 128, "x.png")
    with pytest.raises(StageScheduleError, match=r"x\.png.*100x100.*fewer than 8"):
        s.check_image_size(100, 100, "x.png")
