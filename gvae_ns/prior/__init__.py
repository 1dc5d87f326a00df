"""A cross-scene prior: one GaussianVAE trained on the lineage transitions of many procedural scenes.

* :mod:`gvae_ns.prior.corpus`: the training data, seeded procedural scenes trained through the stages, each
  one's lineage written as a shard;
* :mod:`gvae_ns.prior.train`: the engine, one shard file per scene (:func:`~gvae_ns.prior.train.save_shard`),
  data-parallel training over ``torch.distributed`` (gloo on CPU, NCCL on CUDA) with global normalisation
  statistics, resumable checkpoints (:func:`~gvae_ns.prior.train.train_prior`), and a launcher for local runs
  (:func:`~gvae_ns.prior.train.run_distributed`) that also works under ``torchrun``;
* :mod:`gvae_ns.prior.shipped`: the weights the package ships and the manifest that vouches for them;
* :mod:`gvae_ns.prior.cli`: ``gvae-pretrain``, the three steps end to end.
"""
