"""Progress of the long refinement phases: a rich bar in the terminal and scalars for nerfstudio's writer.

Decoder training, scoring the training views and extrapolation each take seconds to minutes. Each runs inside
:func:`phase`, which shows a nerfstudio-style (rich, ``CONSOLE``) progress bar and sends the losses it is given
to nerfstudio's event writer (tensorboard / wandb / the viewer when ``ns-train`` set them up; nothing is
written when no writer is set up, as in ``gvae-refine``) under ``Refinement/<phase>/<name>``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional

import nerfstudio.configs.base_config  # noqa: F401  (nerfstudio's writer must be imported after its configs)
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Advance = Callable[[int, Optional[Dict[str, float]]], None]
"""``advance(done, losses)``: ``done`` units finished so far; ``losses`` (optional) to log at that point."""


@contextlib.contextmanager
def phase(name: str, total: int, writer_step: int = 0) -> Iterator[Advance]:
    """Show a progress bar for ``total`` units of work named ``name``; yields :data:`Advance`.

    ``writer_step`` offsets the logged steps (ns-train passes its last training step, so the refinement's
    curves follow training's in tensorboard).
    """
    columns = (TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    logged = False
    with Progress(*columns, console=CONSOLE, transient=False, disable=total <= 0) as bar:
        task = bar.add_task(name, total=max(total, 1), info="")

        def advance(done: int, losses: Optional[Dict[str, float]] = None) -> None:
            nonlocal logged
            info = ""
            if losses:
                info = " ".join(f"{k} {v:.4g}" for k, v in list(losses.items())[:3])
                for key, value in losses.items():
                    writer.put_scalar(name=f"Refinement/{name}/{key}", scalar=float(value), step=writer_step + done)
                logged = True
            bar.update(task, completed=min(done, total), info=info)

        yield advance
        bar.update(task, completed=total)
    if logged and writer.EVENT_WRITERS:
        writer.write_out_storage()
