"""Splatfacto's parameter names, and the packed Gaussian: one row of 59 floats per Gaussian, shared by the
lineage file, the decoders and refinement ("packed", so that "state" keeps meaning gsplat's strategy state).

The row is in splatfacto's raw parameter space:

| slice          | width | what                                    |
|----------------|-------|-----------------------------------------|
| ``MEANS``      | 3     | world position                          |
| ``QUATS``      | 4     | rotation quaternion (w, x, y, z), raw   |
| ``SCALES``     | 3     | log scale                               |
| ``OPACITY``    | 1     | opacity logit                           |
| ``SH_DC``      | 3     | SH band 0 (``features_dc``)             |
| ``SH_REST``    | 45    | SH bands 1..3, (15, 3) flattened        |
"""

from __future__ import annotations

from typing import Dict

import torch

MEANS = slice(0, 3)
QUATS = slice(3, 7)
SCALES = slice(7, 10)
OPACITY = slice(10, 11)
SH_DC = slice(11, 14)
SH_REST = slice(14, 59)
PACKED_DIM = 59
SH_REST_COEFFS = 15  # degree 3: (3 + 1) ** 2 - 1

PARAM_KEYS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")
"""splatfacto's ``gauss_params`` names, in its order: every parameter dict of the project has these keys, and
every digest over parameters (:mod:`gvae_ns.tagged_file`) takes them in this order."""


def pack_gaussians(params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Pack splatfacto's ``gauss_params`` (or any dict with its names) into ``[N, 59]`` floats.

    ``features_rest`` of a lower SH degree is zero-padded to degree 3.
    """
    n = params["means"].shape[0]
    rest = params["features_rest"].reshape(n, -1, 3)
    if rest.shape[1] < SH_REST_COEFFS:
        pad = rest.new_zeros(n, SH_REST_COEFFS - rest.shape[1], 3)
        rest = torch.cat([rest, pad], dim=1)
    return torch.cat(
        [
            params["means"].reshape(n, 3),
            params["quats"].reshape(n, 4),
            params["scales"].reshape(n, 3),
            params["opacities"].reshape(n, 1),
            params["features_dc"].reshape(n, 3),
            rest[:, :SH_REST_COEFFS].reshape(n, 45),
        ],
        dim=1,
    ).float()


def unpack_gaussians(packed: torch.Tensor, sh_rest_coeffs: int = SH_REST_COEFFS) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`pack_gaussians`: ``[N, 59]`` -> splatfacto-shaped parameter dict."""
    n = packed.shape[0]
    return {
        "means": packed[:, MEANS],
        "quats": packed[:, QUATS],
        "scales": packed[:, SCALES],
        "opacities": packed[:, OPACITY],
        "features_dc": packed[:, SH_DC],
        "features_rest": packed[:, SH_REST].reshape(n, SH_REST_COEFFS, 3)[:, :sh_rest_coeffs],
    }
