"""The pieces of a training run, in the order ``trainer.run`` calls them.

Threads and Horovod's environment, batch sizes and step counts, the learning-rate schedule,
then the model and its optimizer. The autotuner's trial (``knl_train.autotune.trial``) and
``benchmarks/bench_trainer.py`` build from the same pieces, so they time what the trainer runs.

As in TF Model Garden's optimizer factory, the schedule is finished (per-update counting under
gradient accumulation included) before the optimizer is built, and nothing patches the
optimizer afterwards.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import tensorflow as tf

from knl_train import log as knl_log
from knl_train import models
from knl_train.data.pipeline import check_global_batch
from knl_train.data.source import DataSource, Listing, list_splits, open_source
from knl_train.dist import horovod as dist
from knl_train.errors import UserError
from knl_train.optim import build_optimizer, schedules
from knl_train.optim.scaling import scale_schedule
from knl_train.runtime import versions
from knl_train.runtime.rankenv import RankEnv, count_var
from knl_train.train.config import TrainConfig

log = knl_log.get(__name__)

LearningRateSchedule = tf.keras.optimizers.schedules.LearningRateSchedule


# ---- threads and Horovod's environment -------------------------------------------------------------
def default_intra_threads(local_size: int, data_threads: int = 0) -> int:
    """The rank's cores less those its input pipeline decodes on.

    The rank's cores are those it is bound to, or, if unbound (it may use every core), its share
    of them. ``data_threads`` of them are left to tf.data when that still leaves a compute core,
    so decoding does not compete with the compute threads.
    """
    allowed = len(os.sched_getaffinity(0))
    if allowed >= (os.cpu_count() or allowed) and local_size > 1:
        allowed = max(1, allowed // local_size)
    return allowed - data_threads if allowed > data_threads else allowed


def thread_counts(cfg: TrainConfig, local_size: int) -> Tuple[int, int]:
    """(intra, inter) per rank: the config, else the launcher preset's, else automatic."""
    intra = cfg.threads.intra_op or count_var("intra_op") \
        or default_intra_threads(local_size, with_data_threads(cfg).data.threads)
    inter = cfg.threads.inter_op or count_var("inter_op") or 1
    return intra, inter


def with_data_threads(cfg: TrainConfig) -> TrainConfig:
    """``data.threads`` 0: the launcher preset's (KNL_TRAIN_DATA_THREADS), else 1."""
    if cfg.data.threads:
        return cfg
    threads = count_var("data_threads") or 1
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, threads=threads))


def horovod_environment(cfg: TrainConfig) -> dict:
    """Put the config's Horovod tunables in the environment, where Horovod reads them at init.

    Returns the values in effect (the config's, or what the environment already said).
    """
    h = cfg.horovod
    fusion = None if h.fusion_threshold_mb is None else int(h.fusion_threshold_mb * 1024 * 1024)
    os.environ.update(RankEnv(fusion_threshold_bytes=fusion, cycle_time_ms=h.cycle_time_ms).to_environ())
    now = RankEnv.from_environ()
    return {"fusion_threshold_bytes": now.fusion_threshold_bytes, "cycle_time_ms": now.cycle_time_ms,
            "compression": h.compression}


def configure_threads(cfg: TrainConfig, world) -> Tuple[int, int]:
    """Set TF's thread pools for this rank (``thread_counts``); returns (intra, inter)."""
    intra, inter = thread_counts(cfg, world.local_size)
    set_tf_threads(intra, inter)
    return intra, inter


def set_tf_threads(intra: int, inter: int) -> None:
    """Size TF's two thread pools; 0 keeps TF's default (one thread per usable CPU)."""
    # Both must happen before TF creates its thread pools (the first op).
    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)


def configure_keras(cfg: TrainConfig) -> None:
    """The Keras the optimizers need, op determinism if asked for, and the precision policy."""
    versions.check_keras()
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    if cfg.precision == "mixed_bf16":
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")


# ---- batch sizes and step counts -----------------------------------------------------------------
@dataclass(frozen=True)
class RunSizes:
    """A run's batches and lengths. One update = ``passes`` micro-batches of ``per_rank`` on each
    rank = ``global_batch`` images."""
    global_batch: int
    per_rank: int
    passes: int
    updates_per_epoch: int
    total_updates: int
    epochs: int  # epochs begun: the last may be partial when ``steps`` is set


def data_and_sizes(cfg: TrainConfig, world_size: int,
                   listing: Optional[Listing] = None) -> Tuple[DataSource, RunSizes]:
    """The batch sizes (checked first, so a bad batch is named before any data is read), the
    data source (from ``listing`` when given: see ``shared_listing``), and the step counts its
    training set gives."""
    try:
        global_batch, per_rank = cfg.batch_sizes(world_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    data = open_source(cfg.data, seed=cfg.seed, listing=listing)
    updates_per_epoch = check_global_batch(data.num_train, global_batch)
    total_updates = cfg.steps or cfg.epochs * updates_per_epoch
    return data, RunSizes(global_batch=global_batch, per_rank=per_rank,
                          passes=cfg.horovod.backward_passes_per_step,
                          updates_per_epoch=updates_per_epoch, total_updates=total_updates,
                          epochs=-(-total_updates // updates_per_epoch))


def eval_cache(cfg: TrainConfig, num_val: int, world) -> bool:
    """Whether to keep the decoded evaluation set in memory (``eval.cache``; auto: when this
    rank's share, as float32 images, takes at most a quarter of the memory available per rank
    on this node)."""
    if cfg.eval.cache != "auto":
        return bool(cfg.eval.cache)
    import psutil
    share = -(-num_val // world.size) * cfg.data.image_size ** 2 * 3 * 4
    return share <= psutil.virtual_memory().available / max(1, world.local_size) / 4


def shared_listing(cfg: TrainConfig, world) -> Optional[Listing]:
    """The dataset's file listing, made by rank 0 alone and broadcast: one walk of the (parallel)
    file system per job, not one per rank. A bad dataset stops every rank with rank 0's error."""
    listing = dist.decided_by_root(world, lambda: list_splits(cfg.data), name="knl_train.listing")
    if listing is not None and world.size > 1:
        _check_readable(listing, world)
    return listing


def _check_readable(listing: Listing, world) -> None:
    """Every rank sees the files rank 0 listed (a node whose copy of the data is missing would
    otherwise skip every image as unreadable, and hang the job at the next allreduce)."""
    probe = [s.files[i] for s in (listing.train, listing.val) for i in (0, -1)]
    missing = [f for f in probe if not os.path.exists(f)]
    if missing:
        log.error(f"rank {world.rank} cannot see {missing[0]}, which rank 0 listed",
                  extra=knl_log.EVERY_RANK)
    ranks = int(dist.allreduce_sum([1.0 if missing else 0.0], name="knl_train.listing_check")[0])
    if ranks:
        raise UserError(f"{ranks} rank(s) cannot see the dataset that rank 0 listed (each says "
                        "which file above): stage the data on every node, or point data.path at "
                        "a file system that every node mounts")


# ---- the schedule, finished before the optimizer ----------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """The learning rate and momentum the optimizer is built with, and what messages quote."""
    learning_rate: LearningRateSchedule      # at optimizer.iterations (micro-batches)
    momentum: Union[float, LearningRateSchedule]  # likewise
    at_update: LearningRateSchedule          # the learning rate at optimizer update n
    peak_lr: float                           # after batch scaling
    warmup_steps: int
    passes: int                              # micro-batches per update, as the schedules count


def build_schedule(cfg: TrainConfig, *, updates_per_epoch: int, total_updates: int,
                   global_batch: int, passes: int) -> Schedule:
    """The config's LR schedule (scaled to ``global_batch`` when it names a reference batch) and
    momentum, both counting optimizer updates under ``passes`` accumulated micro-batches."""
    s = cfg.schedule
    peak_lr, warmup_epochs = s.peak_lr, s.warmup_epochs
    if s.reference_batch:
        peak_lr, warmup_epochs = scale_schedule(peak_lr, warmup_epochs, s.reference_batch, global_batch,
                                                rule=s.scaling, warmup_rule=s.warmup_scaling)
    at_update = schedules.build_lr_schedule(
        s.kind, steps_per_epoch=updates_per_epoch, epochs=total_updates / updates_per_epoch,
        peak_lr=peak_lr, warmup_epochs=warmup_epochs, warmup_start_lr=s.warmup_start_lr,
        end_lr=s.end_lr, power=s.power, decay_over=s.decay_over,
        boundary_epochs=s.boundary_epochs, decay_factor=s.decay_factor)
    momentum = schedules.build_momentum(cfg.optimizer.momentum, at_update,
                                        cfg.optimizer.momentum_correction)
    # Horovod advances optimizer.iterations on every micro-batch; the schedules count updates.
    return Schedule(learning_rate=schedules.per_update(at_update, passes),
                    momentum=schedules.per_update(momentum, passes), at_update=at_update,
                    peak_lr=peak_lr,
                    warmup_steps=min(total_updates, round(warmup_epochs * updates_per_epoch)),
                    passes=passes)


# ---- the model and its optimizer ------------------------------------------------------------------
def build_model_and_optimizer(cfg: TrainConfig, schedule: Schedule, num_classes: int):
    """(model, optimizer): the config's optimizer on the finished ``schedule``, wrapped by
    Horovod; the registry's model (float32 logits under mixed_bf16), compiled, with its optimizer
    slots created. Seeded by ``cfg.seed``."""
    tf.keras.utils.set_random_seed(cfg.seed)
    try:
        optimizer = dist.distributed_optimizer(
            build_optimizer(cfg.optimizer, schedule.learning_rate, schedule.momentum),
            backward_passes_per_step=schedule.passes,
            compression=cfg.horovod.compression)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = models.build(cfg.model, num_classes=num_classes, image_size=cfg.data.image_size)
    if cfg.precision == "mixed_bf16":
        # Logits in float32: the softmax and its loss keep full precision.
        out = tf.keras.layers.Activation("linear", dtype="float32", name="logits_fp32")(model.output)
        model = tf.keras.Model(model.input, out, name=model.name)
    model.compile(optimizer=optimizer, loss=loss(num_classes, cfg.label_smoothing),
                  metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="top1"),
                           tf.keras.metrics.SparseTopKCategoricalAccuracy(min(5, num_classes), name="top5")])
    # The step (forward, loss, Horovod's allreduce, the optimizer) has no Python branch on a
    # tensor: tracing it as plain TensorFlow skips AutoGraph's conversion, seconds of start-up.
    model.train_step = tf.autograph.experimental.do_not_convert(model.train_step)
    # Slots exist before a restore, so the checkpoint fills them now rather than lazily.
    create_slots(optimizer, model.trainable_variables)
    return model, optimizer


def loss(num_classes: int, label_smoothing: float):
    """Cross-entropy on logits; with ``label_smoothing``, on smoothed one-hot labels."""
    if not label_smoothing:
        return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def smoothed(y, logits):
        onehot = tf.one_hot(tf.cast(tf.reshape(y, [-1]), tf.int32), num_classes)
        return tf.keras.losses.categorical_crossentropy(onehot, logits, from_logits=True,
                                                        label_smoothing=label_smoothing)
    return smoothed


# ---- the only private calls on a legacy Keras optimizer ---------------------------------------
# TF 2.15's legacy optimizers (the ones Horovod wraps) have no public way to create their slots
# up front or to read the learning rate at their current iteration; these two are the only
# places the trainer reaches into one.
def create_slots(optimizer, variables) -> None:
    optimizer._create_all_weights(variables)


def current_lr(optimizer) -> float:
    """The optimizer's own view: includes any per-update wrapping of the schedule."""
    return float(optimizer._decayed_lr(tf.float32))
