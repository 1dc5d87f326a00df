"""``python -m gvae_ns.synthetic``: the same as the console tool ``gvae-synthetic``."""

from gvae_ns.synthetic.cli import main

main()
