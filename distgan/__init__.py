"""distgan: GAN training from one CPU to many GPUs on many nodes, with one code path."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`distgan.load_generator`, imported on first use so that `import distgan` stays free of torch."""
    if name == "load_generator":
        from distgan.export import load_generator

        return load_generator
    raise AttributeError(f"module 'distgan' has no attribute {name!r}")
