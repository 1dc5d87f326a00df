"""The generative-densification head (Generative Densification, CVPR 2025), the second refinement decoder.

``serialization`` (space-filling-curve order of Gaussians), ``patch_attention`` (attention within fixed-size
patches of that order), ``head`` (the network: serialized transformer, up-sampling, keep mask) and ``train``
(training on lineage transitions, its file ``densify_head.pt``, and stage-by-stage application).
"""
