"""CPU tuning: launch lines (and, later, topology, presets and the autotuner)."""
