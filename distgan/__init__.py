"""distgan: GAN training from one CPU to many GPUs on many nodes, with one code path."""

__version__ = "0.1.0"
