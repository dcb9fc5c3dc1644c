"""The data-parallel trainer: config, training loop, callbacks and checkpoints."""
