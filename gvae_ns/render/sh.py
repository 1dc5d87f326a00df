"""Spherical-harmonics colours in PyTorch: the real SH basis (gsplat/3DGS sign convention) up to degree 3.

:func:`eval_sh` is the reference; :func:`gvae_ns.render.compiled.eval_sh_cpp` computes the same in C++.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (
    1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396,
)
_SH_C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Real SH basis (gsplat/3DGS sign convention) of unit directions ``[..., 3]`` -> ``[..., (d+1)^2]``."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, _SH_C0)]
    if degree >= 1:
        out += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            _SH_C2[0] * x * y,
            _SH_C2[1] * y * z,
            _SH_C2[2] * (2 * zz - xx - yy),
            _SH_C2[3] * x * z,
            _SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            _SH_C3[0] * y * (3 * xx - yy),
            _SH_C3[1] * x * y * z,
            _SH_C3[2] * y * (4 * zz - xx - yy),
            _SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _SH_C3[4] * x * (4 * zz - xx - yy),
            _SH_C3[5] * z * (xx - yy),
            _SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, dim=-1)


def eval_sh(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Colour ``[..., 3]`` of SH ``coeffs [..., K, 3]`` (first ``(degree+1)^2`` used) along ``dirs [..., 3]``."""
    n_bases = (degree + 1) ** 2
    basis = sh_basis(degree, F.normalize(dirs, dim=-1))
    return torch.matmul(basis.unsqueeze(-2), coeffs[..., :n_bases, :]).squeeze(-2)
