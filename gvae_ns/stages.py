"""Resolution stages: which downscale factor each training step uses.

A schedule is a pair of tuples, ``downscales`` (coarse to fine, e.g. ``(8, 4, 2)``) and ``steps`` (how many
training steps each stage lasts). Stage ``s`` covers steps ``[boundaries[s], boundaries[s + 1])``; the last
stage also takes any steps past the end of the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

DEFAULT_STAGE_STEPS = (1500, 3000, 10500)
"""Steps of the default stages (1/4, 1/2, 1/1): 15,000 in all, 70% of them at the data's own resolution."""
MIN_STAGE_PX = 32
"""Short side below which a stage is warned about: it has too few pixels to shape anything."""


class StageScheduleError(ValueError):
    """A stage schedule that cannot be trained."""


@dataclass(frozen=True)
class StageSchedule:
    """Validated resolution-stage schedule."""

    downscales: Tuple[int, ...]
    """Image downscale factor of each stage, coarse to fine."""
    steps: Tuple[int, ...]
    """Training steps of each stage."""

    def __post_init__(self) -> None:
        if len(self.downscales) == 0:
            raise StageScheduleError("stage_downscales is empty: give at least one stage, e.g. (8, 4, 2).")
        if len(self.downscales) != len(self.steps):
            raise StageScheduleError(
                f"stage_downscales has {len(self.downscales)} entries but stage_steps has {len(self.steps)}: "
                "give one step count per stage, e.g. --pipeline.model.stage-steps 2000 2000 4000."
            )
        for d in self.downscales:
            if int(d) != d or d < 1:
                raise StageScheduleError(
                    f"stage_downscales={self.downscales}: every factor must be an integer >= 1 "
                    "(1 = the data's own resolution; a stage cannot be finer than the data)."
                )
        if any(a <= b for a, b in zip(self.downscales, self.downscales[1:])):
            raise StageScheduleError(
                f"stage_downscales={self.downscales} must strictly decrease (coarse to fine), e.g. (8, 4, 2)."
            )
        if any(int(n) != n or n < 1 for n in self.steps):
            raise StageScheduleError(f"stage_steps={self.steps}: every stage needs at least one step.")

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.downscales)

    @property
    def boundaries(self) -> Tuple[int, ...]:
        """First step of each stage, then the total step count: ``len == num_stages + 1``."""
        out = [0]
        for n in self.steps:
            out.append(out[-1] + int(n))
        return tuple(out)

    @property
    def total_steps(self) -> int:
        """Steps in the whole schedule."""
        return self.boundaries[-1]

    def stage_at(self, step: int) -> int:
        """Stage index that trains at ``step``."""
        bounds = self.boundaries
        for s in range(self.num_stages - 1, -1, -1):
            if step >= bounds[s]:
                return s
        return 0

    def downscale_at(self, step: int) -> int:
        """Downscale factor used at ``step``."""
        return int(self.downscales[self.stage_at(step)])

    def is_stage_end(self, step: int) -> bool:
        """Whether ``step`` is the last step of a stage (where the recorder snapshots)."""
        return step + 1 in self.boundaries[1:]

    def check_image_size(self, width: int, height: int, source: str) -> Optional[str]:
        """Raise if the coarsest stage would shrink an image of ``width`` x ``height`` below 8 pixels; return a
        warning when it leaves fewer than :data:`MIN_STAGE_PX` (else ``None``)."""
        coarsest = max(self.downscales)
        short = min(width, height) // coarsest
        if short < 8:
            raise StageScheduleError(
                f"{source}: images are {width}x{height}, so stage downscale {coarsest} leaves "
                f"{width // coarsest}x{height // coarsest} pixels (fewer than 8 per side). Use coarser-to-finer "
                "factors that fit, e.g. --pipeline.model.stage-downscales 4 2 1, or higher-resolution data."
            )
        if short < MIN_STAGE_PX:
            return (f"{source}: images are {width}x{height}, so the coarsest stage (downscale {coarsest}) trains at "
                    f"{width // coarsest}x{height // coarsest} pixels, under {MIN_STAGE_PX} on the short side, where "
                    "it can shape little; consider fewer or finer stages (--pipeline.model.stage-downscales).")
        return None
