"""A cross-scene prior: one GaussianVAE trained on the lineage transitions of many scenes.

:mod:`gvae_ns.prior.train` holds the engine: one shard file per scene (:func:`~gvae_ns.prior.train.save_shard`),
data-parallel training over ``torch.distributed`` (gloo on CPU, NCCL on CUDA) with global normalisation
statistics, resumable checkpoints (:func:`~gvae_ns.prior.train.train_prior`), and a launcher for local runs
(:func:`~gvae_ns.prior.train.run_distributed`) that also works under ``torchrun``.
"""
