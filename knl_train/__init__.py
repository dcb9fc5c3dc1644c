"""knl-train: large-batch data-parallel CNN training on CPU supercomputers."""

__version__ = "0.1.0"
