"""The run folder: where every file of a gaussianvae run lives, for every reader and writer.

``ns-train`` makes ``<output-dir>/<experiment>/gaussianvae/<timestamp>/``; this project adds files beside
nerfstudio's own:

=========================  ========================================================================
path (in the run folder)   what
=========================  ========================================================================
``config.yml``             nerfstudio's run config (``ns-viewer`` / ``ns-export`` / ``gvae-refine`` take it)
``nerfstudio_models/``     ``step-XXXXXXXXX.ckpt`` checkpoints (nothing else may live there: nerfstudio
                           parses every name in it as a step)
``lineage.npz``            the lineage of every Gaussian and the stage snapshots (:mod:`gvae_ns.lineage.format`)
``vae.pt``                 the lineage VAE trained on the run (decoder ``temporal``)
``densify_head.pt``        the generative-densification head trained on the run (decoder ``generative``)
``prior_tuned.pt``         the shipped prior fine-tuned on the run (decoder ``prior-tuned``)
``refinement.pt``          the refinement the viewer and the exporter show (:mod:`gvae_ns.refine.result`)
=========================  ========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

CONFIG_FILE = "config.yml"
CHECKPOINT_DIR = "nerfstudio_models"
LINEAGE_FILE = "lineage.npz"
VAE_FILE = "vae.pt"
DENSIFY_HEAD_FILE = "densify_head.pt"
REFINEMENT_FILE = "refinement.pt"
PRIOR_TUNED_FILE = "prior_tuned.pt"
DECODER_FILES = {"temporal": VAE_FILE, "generative": DENSIFY_HEAD_FILE, "prior-tuned": PRIOR_TUNED_FILE}
"""Decoder name -> the file beside the run that holds it."""


@dataclass(frozen=True)
class RunLayout:
    """The files of the run folder ``root`` (see the module docstring)."""

    root: Path
    """The run folder (the directory that holds ``config.yml``)."""

    @classmethod
    def of_config(cls, config_path: Union[str, Path]) -> "RunLayout":
        """The layout of the run whose ``config.yml`` is ``config_path``."""
        return cls(Path(config_path).parent)

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    def checkpoint(self, step: int) -> Path:
        """The checkpoint file of ``step`` (nerfstudio's name)."""
        return self.checkpoints / f"step-{int(step):09d}.ckpt"

    @property
    def lineage(self) -> Path:
        return self.root / LINEAGE_FILE

    @property
    def refinement(self) -> Path:
        return self.root / REFINEMENT_FILE

    def decoder(self, name: str) -> Path:
        """The file of decoder ``name`` (``temporal``: ``vae.pt``; ``generative``: ``densify_head.pt``)."""
        if name not in DECODER_FILES:
            raise ValueError(f"unknown decoder {name!r}: use one of {sorted(DECODER_FILES)}")
        return self.root / DECODER_FILES[name]
