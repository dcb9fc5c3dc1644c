"""Data-parallel training with Horovod: one process per rank, launched by mpirun or horovodrun."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import yaml

from knl_train import configs
from knl_train.errors import UserError
from knl_train.io import write_json_atomic, write_text_atomic
from knl_train.train.config import TrainConfig


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


def _configure_threads(cfg: TrainConfig, local_size: int):
    import tensorflow as tf
    # Must happen before TF creates its thread pools (the first op).
    intra = cfg.intra_op_threads or default_intra_threads(local_size, cfg.data.threads)
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(cfg.inter_op_threads)
    return intra


def run(cfg: TrainConfig) -> dict:
    """Train per ``cfg`` on every rank; rank 0 writes the run directory. Returns the summary."""
    t_start = time.perf_counter()
    from knl_train.dist import horovod as dist
    world = dist.init()
    intra = _configure_threads(cfg, world.local_size)

    import tensorflow as tf
    from knl_train import models, stack
    from knl_train.data.pipeline import check_global_batch, user_errors
    from knl_train.data.source import open_source
    from knl_train.optim import build_optimizer
    from knl_train.optim.scaling import scale_schedule
    from knl_train.optim.schedules import build_lr_schedule, build_momentum
    from knl_train.train.callbacks import CheckpointCallback, TrainingMonitor
    from knl_train.train.checkpoint import CheckpointManager

    stack.check_keras()
    log = print if world.is_root else (lambda *a, **k: None)
    try:
        global_batch, per_rank = cfg.batch_sizes(world.size)
    except ValueError as e:
        raise UserError(str(e)) from None

    data = open_source(cfg.data, seed=cfg.seed)
    classes = data.classes
    steps_per_epoch = check_global_batch(data.num_train, global_batch)
    total_steps = steps_per_epoch * cfg.epochs

    run_dir = Path(cfg.run_dir)
    if world.is_root:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml",
                          yaml.safe_dump(_plain(configs.to_dict(cfg)), sort_keys=False))
        write_json_atomic(run_dir / "class_index.json", {w: i for i, w in enumerate(classes)})
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    tf.keras.utils.set_random_seed(cfg.seed)
    s = cfg.schedule
    peak_lr, warmup_epochs = s.peak_lr, s.warmup_epochs
    if s.reference_batch:
        peak_lr, warmup_epochs = scale_schedule(peak_lr, warmup_epochs, s.reference_batch, global_batch,
                                                rule=s.scaling, warmup_rule=s.warmup_scaling)
    warmup_steps = min(total_steps, round(warmup_epochs * steps_per_epoch))
    schedule = build_lr_schedule(s.kind, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                                 peak_lr=peak_lr, warmup_epochs=warmup_epochs,
                                 warmup_start_lr=s.warmup_start_lr, end_lr=s.end_lr, power=s.power,
                                 decay_over=s.decay_over, boundary_epochs=s.boundary_epochs,
                                 decay_factor=s.decay_factor)
    momentum = build_momentum(cfg.optimizer.momentum, schedule, cfg.optimizer.momentum_correction)
    optimizer = dist.distributed_optimizer(build_optimizer(cfg.optimizer, schedule, momentum))
    model = models.build(cfg.model, num_classes=len(classes), image_size=cfg.data.image_size)
    model.compile(optimizer=optimizer,
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="top1")])
    # Identical starting weights on every rank; slots are created later as zeros everywhere.
    dist.broadcast_from_root(model.variables)

    from knl_train.tuning import itex
    log(f"knl-train: {world.size} ranks ({world.controller}), {intra} compute threads/rank, "
        f"ITEX {'on' if itex.active() else 'off'}, "
        f"model {cfg.model} ({model.count_params():,} params), {len(classes)} classes, "
        f"{data.num_train} train / {data.num_val} val images ({cfg.data.format}), global batch {global_batch} "
        f"({per_rank}/rank), {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
        f"{cfg.optimizer.name}{f' ({cfg.optimizer.variant})' if cfg.optimizer.name == 'lars' else ''}, {s.kind} schedule, peak lr {peak_lr:g}, "
        f"warmup {warmup_steps} steps" + (f", recipe {cfg.recipe}" if cfg.recipe else ""))
    sys.stdout.flush()

    train_ds = data.train(world.rank, world.size, per_rank, steps_per_epoch)

    def eval_ds():
        return data.eval(world.rank, world.size, per_rank)

    def current_lr() -> float:
        # The optimizer's own view: includes any per-update wrapping of the schedule.
        return float(optimizer._decayed_lr(tf.float32))

    import horovod.tensorflow.keras as hvd
    monitor = TrainingMonitor(world=world, global_batch=global_batch,
                              steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                              eval_dataset_fn=eval_ds, num_classes=len(classes),
                              metrics_path=str(run_dir / "metrics.jsonl"),
                              log_every=cfg.log_every, lr_fn=current_lr, skips=data.skips,
                              print_fn=lambda m: print(m, flush=True))
    callbacks = [hvd.callbacks.MetricAverageCallback(), monitor]
    if world.is_root:
        if hasattr(optimizer, "trust_ratios"):
            from knl_train.optim.monitor import TrustRatioMonitor
            callbacks.append(TrustRatioMonitor(every=cfg.log_every, log_dir=str(run_dir / "tensorboard"),
                                               jsonl_path=str(run_dir / "metrics.jsonl")))
        ckpt = CheckpointManager(run_dir / "checkpoints", model, optimizer, keep=cfg.keep_checkpoints)
        callbacks.append(CheckpointCallback(ckpt, steps_per_epoch))

    with user_errors():  # bad records (missing feature, label out of range) become UserErrors
        model.fit(train_ds, epochs=cfg.epochs, callbacks=callbacks, verbose=0)

    last = monitor.history[-1]
    steady = monitor.history[1:] or monitor.history
    images = global_batch * steps_per_epoch * len(steady)
    seconds = sum(r["epoch_seconds"] for r in steady)
    summary = {
        "top1": last["val_top1"], "top5": last["val_top5"], "val_loss": last["val_loss"],
        "train_loss": last["loss"], "train_top1": last["top1"],
        "images_per_sec": images / seconds,
        "images_per_sec_per_rank": images / seconds / world.size,
        "world_size": world.size, "controller": world.controller,
        "global_batch": global_batch, "per_rank_batch": per_rank,
        "epochs": cfg.epochs, "steps": total_steps, "num_classes": len(classes),
        "model": cfg.model, "optimizer": cfg.optimizer.name,
        "intra_op_threads": intra, "inter_op_threads": cfg.inter_op_threads,
        "wall_seconds": time.perf_counter() - t_start,
        "config_hash": cfg.hash(),
        "versions": stack.versions() if world.is_root else {},
    }
    if world.is_root:
        write_json_atomic(run_dir / "summary.json", summary)
        log(f"done: top1 {summary['top1']:.3f} (chance {1 / len(classes):.3f}), "
            f"{summary['images_per_sec']:.0f} img/s on {world.size} ranks, "
            f"{summary['wall_seconds']:.1f} s; run directory {run_dir}")
    return summary


def _plain(obj):
    """Tuples to lists, so the resolved config is plain YAML."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
