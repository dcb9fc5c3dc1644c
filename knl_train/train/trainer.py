"""Data-parallel training with Horovod: one process per rank, launched by mpirun or horovodrun."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import yaml

from knl_train import yamlconfig
from knl_train.errors import UserError
from knl_train.atomic import write_json_atomic, write_text_atomic
from knl_train.train.config import TrainConfig
from knl_train.runtime.rankenv import count_var


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


def _horovod_environment(cfg: TrainConfig) -> dict:
    """Put the config's Horovod tunables in the environment, where Horovod reads them at init.

    Returns the values in effect (the config's, or what the environment already said).
    """
    h = cfg.horovod
    if h.fusion_threshold_mb is not None:
        os.environ["HOROVOD_FUSION_THRESHOLD"] = str(int(h.fusion_threshold_mb * 1024 * 1024))
    if h.cycle_time_ms is not None:
        os.environ["HOROVOD_CYCLE_TIME"] = f"{h.cycle_time_ms:g}"
    return {"fusion_threshold_bytes": _number(os.environ.get("HOROVOD_FUSION_THRESHOLD"), int),
            "cycle_time_ms": _number(os.environ.get("HOROVOD_CYCLE_TIME"), float),
            "compression": h.compression}


def _number(text, kind):
    try:
        return kind(text) if text else None
    except ValueError:
        return None


def run(cfg: TrainConfig, resume: str = "auto") -> dict:
    """Train per ``cfg`` on every rank; rank 0 writes the run directory. Returns the summary.

    ``resume``: ``auto`` (from the run directory's newest checkpoint, if any), ``resume``
    (there must be one) or ``fresh``.
    """
    t_start = time.perf_counter()
    cfg = with_data_threads(cfg)
    horovod_settings = _horovod_environment(cfg)
    from knl_train.dist import horovod as dist
    world = dist.init()
    intra, inter = thread_counts(cfg, world.local_size)
    import tensorflow as tf
    # Both must happen before TF creates its thread pools (the first op).
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)

    from knl_train import models
    from knl_train.runtime import versions
    from knl_train.data.pipeline import check_global_batch, user_errors
    from knl_train.data.source import open_source
    from knl_train.optim import build_optimizer
    from knl_train.optim.scaling import scale_schedule
    from knl_train.optim.schedules import build_lr_schedule, build_momentum
    from knl_train.train import resume as resuming
    from knl_train.train.callbacks import Position, RunControl, TrainingMonitor
    from knl_train.train.checkpoint import CheckpointManager
    from knl_train.train.signals import StopRequest

    versions.check_keras()
    log = print if world.is_root else (lambda *a, **k: None)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    if cfg.precision == "mixed_bf16":
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        global_batch, per_rank = cfg.batch_sizes(world.size)
    except ValueError as e:
        raise UserError(str(e)) from None
    passes = cfg.horovod.backward_passes_per_step

    data = open_source(cfg.data, seed=cfg.seed)
    classes = data.classes
    updates_per_epoch = check_global_batch(data.num_train, global_batch)
    total_updates = cfg.steps or cfg.epochs * updates_per_epoch
    epochs = -(-total_updates // updates_per_epoch)

    run_dir = Path(cfg.run_dir)
    resolved = yamlconfig.plain(yamlconfig.to_dict(cfg))
    start = _agree_on_start(world, run_dir, resume, global_batch, passes, resolved)
    if start and start["step"] >= total_updates:
        return _already_complete(world, run_dir, start, log)
    if world.is_root:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        write_json_atomic(run_dir / "class_index.json", {w: i for i, w in enumerate(classes)})
        if start:
            resuming.trim_metrics(run_dir / "metrics.jsonl", start["step"])
        else:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    tf.keras.utils.set_random_seed(cfg.seed)
    s = cfg.schedule
    peak_lr, warmup_epochs = s.peak_lr, s.warmup_epochs
    if s.reference_batch:
        peak_lr, warmup_epochs = scale_schedule(peak_lr, warmup_epochs, s.reference_batch, global_batch,
                                                rule=s.scaling, warmup_rule=s.warmup_scaling)
    warmup_steps = min(total_updates, round(warmup_epochs * updates_per_epoch))
    schedule = build_lr_schedule(s.kind, steps_per_epoch=updates_per_epoch,
                                 epochs=total_updates / updates_per_epoch,
                                 peak_lr=peak_lr, warmup_epochs=warmup_epochs,
                                 warmup_start_lr=s.warmup_start_lr, end_lr=s.end_lr, power=s.power,
                                 decay_over=s.decay_over, boundary_epochs=s.boundary_epochs,
                                 decay_factor=s.decay_factor)
    momentum = build_momentum(cfg.optimizer.momentum, schedule, cfg.optimizer.momentum_correction)
    try:
        optimizer = dist.distributed_optimizer(build_optimizer(cfg.optimizer, schedule, momentum),
                                               backward_passes_per_step=passes,
                                               compression=cfg.horovod.compression)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = models.build(cfg.model, num_classes=len(classes), image_size=cfg.data.image_size)
    if cfg.precision == "mixed_bf16":
        # Logits in float32: the softmax and its loss keep full precision.
        out = tf.keras.layers.Activation("linear", dtype="float32", name="logits_fp32")(model.output)
        model = tf.keras.Model(model.input, out, name=model.name)
    model.compile(optimizer=optimizer, loss=_loss(len(classes), cfg.label_smoothing),
                  metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="top1"),
                           tf.keras.metrics.SparseTopKCategoricalAccuracy(min(5, len(classes)), name="top5")])
    # Slots exist before a restore, so the checkpoint fills them now rather than lazily.
    optimizer._create_all_weights(model.trainable_variables)
    manager = CheckpointManager(run_dir / "checkpoints", model, optimizer,
                                keep=cfg.checkpoint.keep) if world.is_root else None
    if start and world.is_root:
        manager.restore(run_dir / "checkpoints" / start["name"])
    # Identical weights, slots and step counter on every rank: rank 0's.
    dist.broadcast_from_root(model.variables + optimizer.variables())

    from knl_train.runtime import itex
    log(f"knl-train: {world.size} ranks ({world.controller}), {intra} compute threads/rank, "
        f"ITEX {'on' if itex.active() else 'off'}, "
        f"model {cfg.model} ({model.count_params():,} params, {cfg.precision}), {len(classes)} classes, "
        f"{data.num_train} train / {data.num_val} val images ({cfg.data.format}), global batch {global_batch} "
        f"({per_rank}/rank" + (f" x {passes} accumulated" if passes > 1 else "") + "), "
        f"{updates_per_epoch} steps/epoch, {total_updates} steps, "
        f"{cfg.optimizer.name}{f' ({cfg.optimizer.variant})' if cfg.optimizer.name == 'lars' else ''}, {s.kind} schedule, peak lr {peak_lr:g}, "
        f"warmup {warmup_steps} steps" + (f", recipe {cfg.recipe}" if cfg.recipe else ""))
    if start:
        log(f"resuming from {run_dir / 'checkpoints' / start['name']}: step {start['step']}, "
            f"epoch {start['epoch'] + 1}, batch {start['batch']}")
        for note in start.get("notes", []):
            log(note)
    sys.stdout.flush()

    def current_lr() -> float:
        # The optimizer's own view: includes any per-update wrapping of the schedule.
        return float(optimizer._decayed_lr(tf.float32))

    import horovod.tensorflow.keras as hvd
    position = Position(updates_per_epoch=updates_per_epoch, passes=passes, total_updates=total_updates,
                        epoch=start["epoch"] if start else 0, batch=start["batch"] if start else 0)
    stop = StopRequest()
    control = RunControl(world=world, position=position, guard_every=cfg.guard_every, manager=manager,
                         checkpoint_every_epochs=cfg.checkpoint.every_epochs,
                         checkpoint_every_minutes=cfg.checkpoint.every_minutes, stop_request=stop,
                         lr_at=lambda step: float(schedule(step)),
                         state_extra={"global_batch": global_batch, "passes": passes,
                                      "world_size": world.size, "config_hash": cfg.hash(),
                                      "config": resolved},
                         print_fn=lambda m: print(m, flush=True))
    if start:
        control.last_checkpoint = str(run_dir / "checkpoints" / start["name"])
    monitor = TrainingMonitor(world=world, position=position, global_batch=global_batch, epochs=epochs,
                              eval_dataset_fn=lambda: data.eval(world.rank, world.size, per_rank),
                              eval_every=cfg.eval.every_epochs, num_classes=len(classes),
                              metrics_path=str(run_dir / "metrics.jsonl"),
                              log_dir=str(run_dir / "tensorboard"), log_every=cfg.log_every,
                              lr_fn=current_lr, skips=data.skips,
                              print_fn=lambda m: print(m, flush=True))
    callbacks = [hvd.callbacks.MetricAverageCallback(), control, monitor]
    if world.is_root and hasattr(optimizer, "trust_ratios"):
        from knl_train.optim.monitor import TrustRatioMonitor
        callbacks.append(TrustRatioMonitor(every=cfg.log_every, log_dir=str(run_dir / "tensorboard"),
                                           jsonl_path=str(run_dir / "metrics.jsonl"),
                                           step_fn=lambda: position.update))

    first_epoch, first_batch = position.epoch, position.batch
    with stop, user_errors():  # bad records (missing feature, label out of range) become UserErrors
        for epoch in range(first_epoch, epochs):
            skip = first_batch if epoch == first_epoch else 0
            todo = min(position.micro_per_epoch, (total_updates - epoch * updates_per_epoch) * passes)
            position.epoch, position.batch, position.end_batch = epoch, skip, todo
            train_ds = data.train(world.rank, world.size, per_rank, epoch, skip, todo - skip)
            model.fit(train_ds, epochs=epoch + 1, initial_epoch=epoch, callbacks=callbacks, verbose=0)
            if position.stopped:
                break

    if position.stopped:
        log(f"stopped by {stop.name or 'a signal'} at step {position.update}: checkpoint "
            f"{control.last_checkpoint} written; rerun the same command to resume from it")
        return {"stopped": True, "step": position.update, "checkpoint": control.last_checkpoint}

    history = monitor.history
    last = history[-1]
    steady = history[1:] or history
    seconds = sum(r["epoch_seconds"] for r in steady)
    images = sum(r["images_per_sec"] * r["epoch_seconds"] for r in steady)
    final_val = next((r for r in reversed(history) if "val_top1" in r), {})
    summary = {
        "top1": final_val.get("val_top1"), "top5": final_val.get("val_top5"),
        "val_loss": final_val.get("val_loss"),
        "train_loss": last["loss"], "train_top1": last["top1"],
        "images_per_sec": images / seconds,
        "images_per_sec_per_rank": images / seconds / world.size,
        "world_size": world.size, "controller": world.controller,
        "global_batch": global_batch, "per_rank_batch": per_rank, "backward_passes_per_step": passes,
        "epochs": epochs, "steps": total_updates, "num_classes": len(classes),
        "resumed_from_step": start["step"] if start else None,
        "model": cfg.model, "optimizer": cfg.optimizer.name, "precision": cfg.precision,
        "horovod": horovod_settings,
        "intra_op_threads": intra, "inter_op_threads": inter,
        "wall_seconds": time.perf_counter() - t_start,
        "config_hash": cfg.hash(),
        "versions": versions.versions() if world.is_root else {},
    }
    if world.is_root:
        write_json_atomic(run_dir / "summary.json", summary)
        log(f"done: top1 {summary['top1']:.3f} (chance {1 / len(classes):.3f}), "
            f"{summary['images_per_sec']:.0f} img/s on {world.size} ranks, "
            f"{summary['wall_seconds']:.1f} s; run directory {run_dir}")
    return summary


def _loss(num_classes: int, label_smoothing: float):
    import tensorflow as tf
    if not label_smoothing:
        return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def smoothed(y, logits):
        onehot = tf.one_hot(tf.cast(tf.reshape(y, [-1]), tf.int32), num_classes)
        return tf.keras.losses.categorical_crossentropy(onehot, logits, from_logits=True,
                                                        label_smoothing=label_smoothing)
    return smoothed


def _agree_on_start(world, run_dir: Path, mode: str, global_batch: int, passes: int,
                    resolved: dict) -> Optional[dict]:
    """Rank 0 finds the checkpoint to resume from (or none); every rank gets its answer."""
    from knl_train.dist import horovod as dist
    from knl_train.train import resume as resuming
    answer = None
    if world.is_root:
        try:
            answer = ("ok", resuming.find(run_dir / "checkpoints", mode, global_batch=global_batch,
                                          passes=passes, config=resolved))
        except UserError as e:
            answer = ("error", str(e))
    kind, value = dist.broadcast_object(answer, name="knl_train.resume")
    if kind == "error":
        raise UserError(value)
    return value


def _already_complete(world, run_dir: Path, start: dict, log) -> dict:
    log(f"the run in {run_dir} is already complete (checkpoint {start['name']}, step {start['step']}); "
        "nothing to train. Use --fresh to train it again, or raise epochs or steps to continue it.")
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {"complete": True, "step": start["step"]}
