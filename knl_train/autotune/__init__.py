"""The autotuner: short measured trials of threading settings on this node."""
