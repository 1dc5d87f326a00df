"""gvae-ns: GaussianVAE super-resolution refinement for nerfstudio's splatfacto."""

__version__ = "0.1.0"
