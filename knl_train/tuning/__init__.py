"""CPU tuning: topology detection, threading presets, per-rank plans, launcher lines, the autotuner."""
