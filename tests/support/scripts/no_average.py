"""``knl-train`` with the optimizer left unwrapped, so ranks do not average their gradients.

The failure the divergence guard exists for (Horovod's Keras integration under Keras 3 fails
this way, silently); the tests run it on real ranks to see the guard stop the job.
"""

import sys

from knl_train.dist import horovod as dist

dist.distributed_optimizer = lambda optimizer, **kwargs: optimizer

from knl_train.cli import main  # noqa: E402  (after the patch)

sys.exit(main(sys.argv[1:]))
