"""Run under a launcher: write what this rank really got (affinity, TF threads, environment)."""

import json
import os
import sys

from knl_train.runtime.rankenv import RankEnv, local_rank
from knl_train.train import setup
from knl_train.train.config import TrainConfig

out = sys.argv[1]
local = local_rank(RankEnv.from_environ().ranks_per_node or 1)
intra, inter = setup.thread_counts(TrainConfig(), local_size=1)
import tensorflow as tf  # noqa: E402  (after the thread counts, as in the trainer)
tf.config.threading.set_intra_op_parallelism_threads(intra)
tf.config.threading.set_inter_op_parallelism_threads(inter)
tf.constant(1.0) + 1.0  # creates the pools
report = {
    "local_rank": local,
    "affinity": sorted(os.sched_getaffinity(0)),
    "tf_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
    "tf_inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
    "env": {k: v for k, v in os.environ.items()
            if k.startswith(("TF_", "OMP_", "KMP_", "HOROVOD_", "KNL_TRAIN_"))},
}
with open(os.path.join(out, f"rank{local}.json"), "w") as f:
    json.dump(report, f)
