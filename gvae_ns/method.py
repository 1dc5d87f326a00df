"""``ns-train gaussianvae``: the method registered under ``nerfstudio.method_configs``.

Same optimiser settings as splatfacto; the step budget is the stage schedule's, and the step-based settings
(run length, LR horizon, densification, opacity resets) follow it (:mod:`gvae_ns.step_budget`). Every nerfstudio dataparser
works (``blender-data``, ``nerfstudio-data``, ``colmap`` ...). The device defaults to CUDA when it is there
and to the CPU rasterizer (compiled C++, PyTorch fallback) otherwise.
"""

from __future__ import annotations

import torch
from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification

from gvae_ns.model import GaussianVAEModelConfig
from gvae_ns.stages import DEFAULT_STAGE_STEPS
from gvae_ns.trainer import GaussianVAETrainerConfig

_MODEL = GaussianVAEModelConfig()
_TOTAL_STEPS = sum(DEFAULT_STAGE_STEPS)


def _adam(lr: float) -> dict:
    return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": None}


gaussianvae = MethodSpecification(
    config=GaussianVAETrainerConfig(
        method_name="gaussianvae",
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=_TOTAL_STEPS,
        mixed_precision=False,
        machine=MachineConfig(device_type="cuda" if torch.cuda.is_available() else "cpu"),
        pipeline=VanillaPipelineConfig(
            datamanager=FullImageDatamanagerConfig(
                dataparser=NerfstudioDataParserConfig(load_3D_points=True),
                cache_images_type="uint8",
            ),
            model=_MODEL,
        ),
        optimizers={
            "means": {
                "optimizer": AdamOptimizerConfig(lr=1.6e-4, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=_TOTAL_STEPS),
            },
            "features_dc": _adam(0.0025),
            "features_rest": _adam(0.0025 / 20),
            "opacities": _adam(0.05),
            "scales": _adam(0.005),
            "quats": _adam(0.001),
            "camera_opt": {
                "optimizer": AdamOptimizerConfig(lr=1e-4, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(
                    lr_final=5e-7, max_steps=_TOTAL_STEPS, warmup_steps=1000, lr_pre_warmup=0
                ),
            },
            "bilateral_grid": {
                "optimizer": AdamOptimizerConfig(lr=2e-3, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(
                    lr_final=1e-4, max_steps=_TOTAL_STEPS, warmup_steps=1000, lr_pre_warmup=0
                ),
            },
        },
        # the viewer listens on this machine only; --viewer.websocket-host 0.0.0.0 opens it to the network
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15, websocket_host="127.0.0.1"),
        vis="viewer",
    ),
    description="Splatfacto through resolution stages + lineage GaussianVAE refinement past the trained resolution.",
)
