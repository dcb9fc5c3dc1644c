"""Distributed training with Horovod: ``horovod`` (init, the optimizer wrapper, collectives),
``guard`` (the ranks' periodic agreement: divergence, stops, stragglers) and ``watchdog`` (stall
detection). They import TensorFlow; who a process is before TensorFlow
starts (its launcher rank and local rank) is ``knl_train.runtime.rankenv``'s."""
