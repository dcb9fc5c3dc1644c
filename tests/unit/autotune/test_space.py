"""The autotuner's search space (knl_train/autotune/space.py): a candidate's settings and label."""

from __future__ import annotations

from knl_train.autotune.space import Candidate, Machine, baseline, label, settings_for
from knl_train.tuning import preset

TWO_CORES = Machine(cores=2, itex="optional", host="box", cpu="test CPU")


def test_settings_and_labels():
    c = Candidate(itex=True, ranks=2, inter_op=1, blocktime=0)
    s = settings_for(c, TWO_CORES, preset.Settings(fusion_threshold_mb=64))
    assert (s.itex, s.onednn, s.inter_op, s.kmp_blocktime, s.fusion_threshold_mb) == (True, True, 1, 0, 64)
    # 2 ranks on 2 cores: inter-op 1 is TF's own default there
    assert label(c, TWO_CORES) == "ITEX, 2 ranks, blocktime 0"
    assert label(baseline(TWO_CORES), TWO_CORES) == "TF defaults"
    # TF's inter-op default follows the rank's CPUs
    assert settings_for(Candidate(), Machine(cores=8, threads_per_core=2)).inter_op == 16
