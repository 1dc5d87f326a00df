"""Refinement: a trained run + a decoder -> extra detail past the finest trained stage.

Data flows one way, from the command line down to plain tensors:

* ``cli``: ``gvae-refine`` and :func:`~gvae_ns.refine.cli.refine_pipeline`, the one path from a loaded run to
  a refinement file (used by ``ns-train``'s after-training phase and ``gvae-bench`` too);
* ``refiner``: :class:`~gvae_ns.refine.refiner.Refiner`, plain run data (packed states, ancestor histories,
  scores) + a decoder -> a refinement, cached per (stages, selection);
* ``decoder``: the :class:`~gvae_ns.refine.decoder.Decoder` protocol and its two implementations (lineage VAE,
  densification head);
* ``score``: selection signals on the training views, scores, top-K selection;
* ``result``: the :class:`~gvae_ns.refine.result.Refinement` record, its file, and the run provenance files
  beside a run are tied to.

Nothing here imports the model or the viewer; they hand their state over as plain data.
"""
