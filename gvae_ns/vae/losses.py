"""Training objective of the GaussianVAE (paper eq. 1, supplement eqs. 2-5) plus two terms it needs.

``recon = mse_w * MSE + chamfer_w * Chamfer + exist_w * Exist + shape_w * Shape``

``total = recon(posterior z) + kl_w * beta(t) * KL + prior_w * PriorFit + prior_path_w * recon(prior z)``

- **KL** (per stream, summed): Monte-Carlo ``log q(z|x) - log p_flow(z|h)`` at the posterior sample
  (``h``: the encoded history the flow prior is conditioned on).
- **PriorFit** (per stream, summed): ``-log p_flow(z|h)`` with ``z`` and ``h`` detached. This is the KL's
  gradient with respect to the flow's own parameters, applied at full weight: the paper's tiny KL weight
  is meant to leave the *posterior* free, but scaled by ``1e-6 * beta`` the flow would barely learn
  (its gradients would sink below Adam's epsilon), and inference samples ``z`` from the flow.
- **Prior path** (the hybrid objective of Sohn et al.'s CVAE): the children are decoded a second time
  from ``z ~ p_flow(z|h)`` and scored with the same reconstruction terms. With a near-zero KL weight the
  decoder otherwise learns to read the target out of the posterior's ``z`` and degrades when
  inference hands it a prior sample; this term trains the path inference actually takes.
- **MSE** (appearance): colour (SH DC), opacity and SH-rest changes on normalised features, averaged
  over existing target slots; the three groups count equally so the 45 SH-rest numbers don't drown
  colour and opacity.
- **Chamfer** (geometry): eq. 5 on child positions, in parent units (offsets from
  :mod:`~gvae_ns.vae.features`), set to set per parent over existing slots, both directions.
- **Exist**: binary cross-entropy of every slot's exist logit against the target mask, per stream.
- **Shape** (geometry; not in the paper, which never supervises scale or rotation directly but whose
  model predicts them): MSE of the normalised rotation and log-scale changes over existing slots.

Why the default weights (:class:`LossWeights`):

- ``kl = 1e-6`` (paper): the latent only has to carry what the history cannot predict; a strong KL
  collapses the posterior onto the prior and the decoder ignores ``z``. The flow's own parameters still
  learn at full speed, because Adam normalises each parameter's gradient scale.
- ``mse = 1.0`` (paper): the reference; features are normalised, so each group's MSE starts near 1.
- ``chamfer = 0.01`` (paper): eq. 5 *sums* squared distances over both sets (up to ``2 C`` terms of
  three coordinates each) instead of averaging one normalised coordinate, so it is one to two orders
  of magnitude larger than the MSE terms at equal error.
- ``exist = 1.0``: a per-slot BCE is O(1), on the MSE's footing; existence decides densification.
- ``shape = 1.0``: normalised like the appearance MSE.
- ``prior_path = 0.5``: half the posterior path's weight (Sohn et al. mix the two paths); enough to
  keep the prior-sample decodings on target without erasing the latent's role.
- ``prior = 1.0``: touches only the flow's parameters, so its scale just sets the flow's step size
  (Adam makes that nearly scale-free); 1 keeps it on the other terms' footing in logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gvae_ns.vae import features as feats
from gvae_ns.vae.model import StreamOutput, VAEOutput

# Column ranges inside each stream's feature vector (see features.GEOMETRY / APPEARANCE).
_GEO_OFFSET = slice(feats.REL_OFFSET.start, feats.REL_OFFSET.stop)
_GEO_SHAPE = slice(feats.REL_ROTATION.start, feats.REL_LOG_SCALE.stop)
_APP0 = feats.APPEARANCE.start
_APP_SH_REST = slice(feats.REL_SH_REST.start - _APP0, feats.REL_SH_REST.stop - _APP0)
_APP_RGB = slice(feats.REL_RGB.start - _APP0, feats.REL_RGB.stop - _APP0)
_APP_OPACITY = slice(feats.REL_OPACITY.start - _APP0, feats.REL_OPACITY.stop - _APP0)


@dataclass
class LossWeights:
    """Weights of the loss terms (see the module docstring for why these defaults)."""

    kl: float = 1e-6
    """KL against the flow prior (multiplied by the cyclic ``beta(t)``)."""
    mse: float = 1.0
    """Appearance MSE (colour, opacity, SH rest)."""
    chamfer: float = 0.01
    """Chamfer distance on child positions (parent units)."""
    exist: float = 1.0
    """Exist-flag binary cross-entropy."""
    shape: float = 1.0
    """Geometry MSE on rotation and log-scale changes."""
    prior: float = 1.0
    """Flow-prior fit to the (detached) posterior samples."""
    prior_path: float = 0.5
    """Reconstruction of children decoded from a *prior* sample, relative to the posterior path's 1."""


def cyclic_beta(step: int, alpha: float, period: int) -> float:
    """Cyclic KL annealing ``beta(t) = min(alpha * (t mod R), 1)`` with ramp period ``R``."""
    if period < 1:
        raise ValueError(f"cyclic_beta: period must be >= 1, got {period}")
    return min(alpha * (step % period), 1.0)


def kl_monte_carlo(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Single-sample estimate of ``KL(q || p)``: mean over the batch of ``log q(z) - log p(z)``."""
    return (log_q - log_p).mean()


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the slots where ``mask [B, C]`` is set (0 when none is)."""
    m = mask[..., None].to(pred.dtype)
    count = m.sum() * pred.shape[-1]
    return ((pred - target).pow(2) * m).sum() / count.clamp_min(1.0)


def chamfer_distance(pred: Tensor, target: Tensor, mask: Tensor, pred_mask: Optional[Tensor] = None) -> Tensor:
    """Eq. 5 per parent between point sets ``pred [B, C, 3]`` and ``target [B, C, 3]``.

    Only slots set in ``mask`` (target) / ``pred_mask`` (prediction, defaults to ``mask``) take part,
    in both directions; the per-parent sums are averaged over parents with at least one point on each
    side (0 when there are none)."""
    pred_mask = mask if pred_mask is None else pred_mask
    d = (pred[:, :, None, :] - target[:, None, :, :]).pow(2).sum(-1)
    pair = pred_mask[:, :, None] & mask[:, None, :]
    big = torch.finfo(d.dtype).max
    d = torch.where(pair, d, torch.full_like(d, big))
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    to_target = torch.where(pred_mask, d.amin(dim=2), zero).sum(1)
    to_pred = torch.where(mask, d.amin(dim=1), zero).sum(1)
    valid = pred_mask.any(1) & mask.any(1)
    per_parent = torch.where(valid, to_target + to_pred, zero)
    return per_parent.sum() / valid.sum().clamp_min(1).to(d.dtype)


def exist_bce(logits: Tensor, mask: Tensor) -> Tensor:
    """Binary cross-entropy of exist logits ``[B, C]`` against the target mask, mean over slots."""
    return F.binary_cross_entropy_with_logits(logits, mask.to(logits.dtype))


def _require_target(stream: StreamOutput, name: str) -> None:
    if stream.target is None or stream.log_q is None or stream.log_p_fit is None or stream.target_mask is None:
        raise ValueError(f"vae_loss: the {name} output has no target; run the model with targets")


def reconstruction_terms(
    geo_features: Tensor,
    geo_raw: Tensor,
    geo_exist: Tensor,
    app_features: Tensor,
    app_exist: Tensor,
    geo: StreamOutput,
    app: StreamOutput,
) -> Dict[str, Tensor]:
    """MSE, Chamfer, shape and exist terms of one decoding against the targets held by ``geo``/``app``."""
    mask = geo.target_mask
    mse = (
        masked_mse(app_features[..., _APP_RGB], app.target[..., _APP_RGB], mask)
        + masked_mse(app_features[..., _APP_OPACITY], app.target[..., _APP_OPACITY], mask)
        + masked_mse(app_features[..., _APP_SH_REST], app.target[..., _APP_SH_REST], mask)
    )
    chamfer = chamfer_distance(geo_raw[..., _GEO_OFFSET], geo.raw_target[..., _GEO_OFFSET], mask)
    shape = masked_mse(geo_features[..., _GEO_SHAPE], geo.target[..., _GEO_SHAPE], mask)
    exist = exist_bce(geo_exist, mask) + exist_bce(app_exist, mask)
    return {"mse": mse, "chamfer": chamfer, "shape": shape, "exist": exist}


def _weighted(terms: Dict[str, Tensor], weights: LossWeights) -> Tensor:
    return (
        weights.mse * terms["mse"]
        + weights.chamfer * terms["chamfer"]
        + weights.shape * terms["shape"]
        + weights.exist * terms["exist"]
    )


def vae_loss(output: VAEOutput, weights: LossWeights, beta: float) -> Dict[str, Tensor]:
    """All loss terms of a training forward pass (``targets`` given) and their weighted ``total``.

    Also returns ``recon`` (the weighted reconstruction terms of the posterior path, the quantity a
    fit should drive down) and, when the output holds a prior-path decoding, ``recon_prior``."""
    geo, app = output.geometry, output.appearance
    _require_target(geo, "geometry")
    _require_target(app, "appearance")
    kl = kl_monte_carlo(geo.log_q, geo.log_p) + kl_monte_carlo(app.log_q, app.log_p)
    prior = -(geo.log_p_fit.mean() + app.log_p_fit.mean())
    terms = reconstruction_terms(geo.features, geo.raw_features, geo.exist_logits, app.features,
                                 app.exist_logits, geo, app)
    recon = _weighted(terms, weights)
    total = recon + weights.kl * beta * kl + weights.prior * prior
    out = {"total": total, "recon": recon, "kl": kl, "prior": prior, **terms}
    if weights.prior_path > 0:
        if geo.prior_features is None or app.prior_features is None:
            raise ValueError("vae_loss: weights.prior_path > 0 needs a forward pass with prior_path=True")
        prior_terms = reconstruction_terms(geo.prior_features, geo.prior_raw_features, geo.prior_exist_logits,
                                           app.prior_features, app.prior_exist_logits, geo, app)
        out["recon_prior"] = _weighted(prior_terms, weights)
        out["total"] = total + weights.prior_path * out["recon_prior"]
    return out
