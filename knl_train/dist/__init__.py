"""Distributed training with Horovod: ``horovod`` (init, the optimizer wrapper, collectives) and
``guard`` (the divergence check). Both import TensorFlow; who a process is before TensorFlow
starts (its launcher rank and local rank) is ``knl_train.runtime.rankenv``'s."""
