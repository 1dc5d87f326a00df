"""``gvae-bench``: super-resolution quality and speed of gaussianvae against splatfacto, side by side.

For a Blender-format dataset whose test views are at the full (target) resolution, or a nerfstudio-data / COLMAP
capture (:mod:`~gvae_ns.bench.scenes`: every 8th frame held out, scored at ``capture.score_downscale``), the
benchmark

1. makes box-filtered low-resolution (LR) training copies, x2, x4 ... (:func:`gvae_ns.datasets.downscale_blender`;
   test views stay at full resolution; captures: :mod:`~gvae_ns.bench.scene_copies`, nerfstudio-data copies with
   intrinsics scaled, distortion kept and the held-out views undistorted to pinhole cameras);
2. trains every row with ``ns-train`` in subprocesses, with the same step budget for all: splatfacto classic
   and antialiased on each LR copy, gaussianvae through resolution stages on each LR copy (its finest stage
   is the LR copy itself), and the full-resolution oracle;
3. refines the gaussianvae runs (:func:`gvae_ns.refine.cli.refine_run`): "Ours" extrapolates every lineage,
   "Ours-nabla2" the Hessian-selected ones, +1..+4 stages past the finest stage, with the lineage VAE and / or the generative
   densification head ("(GD head)" rows);
4. renders every model at full resolution on the same held-out test cameras with its own code (no ns-eval) and
   scores PSNR, SSIM, LPIPS / BRISQUE where available, the Chamfer distance from Gaussian centres to the
   dataset's ``points_gt.npy`` (when it has one), Gaussian count, training / refinement time and render speed;
5. writes ``results.json``, ``results.md`` and ``crops.png`` (the same crop from the LR baseline, ours, the
   oracle and the ground truth) into the output directory.

Stock splatfacto needs CUDA (gsplat's rasterizer). Without CUDA the baselines are ``gaussianvae`` with one
stage at the training data's resolution and no refinement, i.e. splatfacto's densification and losses with the
project's CPU rasterizer; they are labelled "splatfacto ... (CPU renderer)".

Every finished piece is recorded on disk (``runs/<run>/train.json``, ``refinements/<row>.json``,
``rows/<row>.json``) with a fingerprint of what made it, so running the same command again skips the work
that is done and redoes what changed or failed.

Modules, in the order a run uses them: ``config`` (suite files), ``scenes`` (datasets read into frames and a split)
and ``scene_copies`` (a capture's nerfstudio-data copies), ``plan``, ``train``, ``refine``, ``evaluate`` (usable
alone), ``report``, and ``run`` (the loop and ``main``).
"""
