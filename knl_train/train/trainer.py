"""Data-parallel training with Horovod: one process per rank, launched by mpirun or horovodrun.

``run`` follows Horovod's Keras example: init, threads, data, schedule, model and optimizer,
broadcast, callbacks, the fit loop, then the summary. The pieces live in ``train.setup``
(shared with the autotuner's trial and the trainer benchmark), ``train.control`` (position,
agreement, checkpoints) and ``train.monitor`` (metrics and evaluation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence, Tuple

import horovod.tensorflow.keras as hvd
import yaml

from knl_train import log as knl_log
from knl_train import records, yamlconfig
from knl_train.atomic import write_json_atomic, write_text_atomic
from knl_train.data.pipeline import user_errors
from knl_train.dist import horovod as dist
from knl_train.dist import watchdog as watching
from knl_train.optim.monitor import TrustRatioMonitor
from knl_train.runtime import itex, versions
from knl_train.train import rundir, setup
from knl_train.train.checkpoint import CheckpointManager
from knl_train.train.clock import Timeline
from knl_train.train.config import TrainConfig
from knl_train.train.control import Position, RunControl, agree_on_start
from knl_train.train.monitor import TrainingMonitor
from knl_train.train.signals import StopRequest, announce_stop

log = knl_log.get(__name__)


def run(cfg: TrainConfig, resume: str = "auto") -> dict:
    """Train per ``cfg`` on every rank; rank 0 writes the run directory. Returns the summary.

    ``resume``: ``auto`` (from the run directory's newest checkpoint, if any), ``resume``
    (there must be one) or ``fresh``.
    """
    timeline = Timeline()
    timeline.mark("imports")  # Python, TensorFlow, Horovod, the config
    cfg = setup.with_data_threads(cfg)
    # Horovod: its tunables go in the environment first, since init reads them.
    horovod_settings = setup.horovod_environment(cfg)
    world = dist.init()
    intra, inter = setup.configure_threads(cfg, world)
    setup.configure_keras(cfg)
    timeline.mark("horovod")
    data, size = setup.data_and_sizes(cfg, world.size, setup.shared_listing(cfg, world))
    timeline.mark("data")
    # Rank 0 owns the run directory for the whole run, before anything in it is written or cut
    # back; a second training stops here, on every rank, naming the owner. (After the data: a
    # bad data path is reported without leaving a run directory behind.)
    dist.decided_by_root(world, lambda: rundir.acquire(cfg.run_dir).path, name="knl_train.rundir")

    run_dir = Path(cfg.run_dir)
    resolved = yamlconfig.plain(yamlconfig.to_dict(cfg))
    # Horovod: rank 0 finds the checkpoint to resume from; every rank follows its answer.
    start = agree_on_start(world, run_dir, resume, size.global_batch, size.passes, resolved)
    if start and start["step"] >= size.total_updates:
        return _already_complete(run_dir, start)
    if world.is_root:
        _prepare_run_dir(run_dir, resolved, data.classes, start)

    schedule = setup.build_schedule(cfg, updates_per_epoch=size.updates_per_epoch,
                                    total_updates=size.total_updates,
                                    global_batch=size.global_batch, passes=size.passes)
    model, optimizer = setup.build_model_and_optimizer(cfg, schedule, len(data.classes))
    manager = _checkpoints(cfg, world, run_dir, model, optimizer, start)
    # Horovod: identical weights, slots and step counter on every rank: rank 0's.
    dist.broadcast_from_root(model.variables + optimizer.variables())
    _announce(cfg, world, intra, model, data, size, schedule, run_dir, start)
    timeline.mark("model")

    control, monitor = _control_and_monitor(cfg, world, size, data, schedule, optimizer, manager,
                                            run_dir, resolved, start, timeline)
    position, stop = control.pos, control.stop_request
    # Horovod: the epoch metrics are averaged over ranks first, so the other callbacks see the mean.
    callbacks = [hvd.callbacks.MetricAverageCallback(), control, monitor]
    if world.is_root and hasattr(optimizer, "trust_ratios"):  # LARS, LAMB
        callbacks.append(TrustRatioMonitor(every=cfg.log_every, log_dir=str(run_dir / "tensorboard"),
                                           jsonl_path=str(run_dir / records.METRICS),
                                           step_fn=lambda: position.update))

    # The stall watchdog watches from the first step to the end of fit (control arms it).
    with stop, user_errors(), control.watchdog:  # bad records become UserErrors
        _fit(model, data, world, size, position, callbacks, control.watchdog)
    if position.stopped:
        announce_stop(stop.name, position.update, control.last_checkpoint, is_root=world.is_root)
        return {"stopped": True, "step": position.update, "checkpoint": control.last_checkpoint}

    summary = _summarize(cfg, world, size, monitor.history, num_classes=len(data.classes),
                         resumed_from=start["step"] if start else None, horovod=horovod_settings,
                         threads=(intra, inter), timeline=timeline, checkpoints=control.saves)
    if world.is_root:
        records.write_summary(run_dir / records.SUMMARY, summary)
        log.info(f"done: top1 {summary.top1:.3f} (chance {1 / len(data.classes):.3f}), "
                 f"{summary.images_per_sec:.0f} img/s on {world.size} ranks, "
                 f"{summary.wall_seconds:.1f} s; run directory {run_dir}", extra=knl_log.PROGRESS)
    return summary.to_dict()


def _fit(model, data, world, size: setup.RunSizes, position: Position, callbacks,
         watchdog: watching.Progress) -> None:
    """One ``fit`` from where the run stands to its end, on one input stream across epochs.

    A run resumed inside an epoch first finishes that epoch with a ``fit`` of its own, since a
    Keras epoch has a fixed number of steps; every later epoch is whole (the last ends early
    when ``steps`` says so: ``RunControl`` stops it)."""
    per_epoch = position.micro_per_epoch
    epoch, skip = position.epoch, position.batch
    todo = size.total_updates * size.passes - (epoch * per_epoch + skip)  # micro-batches left
    if skip:
        n = min(per_epoch - skip, todo)
        model.fit(watchdog.counted(data.train(world.rank, world.size, size.per_rank, epoch, skip,
                                              n, per_epoch)),
                  epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=n, callbacks=callbacks,
                  verbose=0)
        epoch, todo = epoch + 1, todo - n
        if position.stopped or todo <= 0:
            return
    # The iterator lives through all epochs (steps_per_epoch and a stream of unknown length),
    # so no epoch boundary rebuilds or refills the input pipeline.
    model.fit(watchdog.counted(data.train(world.rank, world.size, size.per_rank, epoch, 0, todo,
                                          per_epoch)),
              epochs=size.epochs, initial_epoch=epoch, steps_per_epoch=per_epoch,
              callbacks=callbacks, verbose=0)


def _checkpoints(cfg: TrainConfig, world, run_dir: Path, model, optimizer,
                 start: Optional[dict]) -> Optional[CheckpointManager]:
    """Rank 0's checkpoint manager, with the checkpoint to resume from restored (None elsewhere)."""
    manager = (CheckpointManager(run_dir / "checkpoints", model, optimizer, keep=cfg.checkpoint.keep)
               if world.is_root else None)
    if start:  # a checkpoint that does not fit the model stops every rank with rank 0's line
        dist.decided_by_root(world, lambda: manager.restore(run_dir / "checkpoints" / start["name"]),
                             name="knl_train.restore")
    return manager


def _control_and_monitor(cfg: TrainConfig, world, size: setup.RunSizes, data,
                         schedule: setup.Schedule, optimizer, manager, run_dir: Path,
                         resolved: dict, start: Optional[dict],
                         timeline: Timeline) -> Tuple[RunControl, TrainingMonitor]:
    """The run's two callbacks, sharing its position (which starts where ``start`` says)."""
    position = Position(updates_per_epoch=size.updates_per_epoch, passes=size.passes,
                        total_updates=size.total_updates,
                        epoch=start["epoch"] if start else 0, batch=start["batch"] if start else 0)
    watchdog = (watching.Watchdog(run_dir, rank=world.rank, size=world.size,
                                  stall_seconds=cfg.guard.stall_seconds,
                                  startup_seconds=timeline.elapsed())
                if cfg.guard.stall_seconds and world.size > 1 else watching.NO_WATCH)
    control = RunControl(world=world, position=position, guard_every=cfg.guard.every, manager=manager,
                         checkpoint_every_epochs=cfg.checkpoint.every_epochs,
                         checkpoint_every_minutes=cfg.checkpoint.every_minutes,
                         stop_request=StopRequest(), timeline=timeline,
                         lr_at=lambda step: float(schedule.at_update(step)),
                         state_extra={"global_batch": size.global_batch, "passes": size.passes,
                                      "world_size": world.size, "config_hash": cfg.hash(),
                                      "config": resolved},
                         last_checkpoint=str(run_dir / "checkpoints" / start["name"]) if start else None,
                         watchdog=watchdog,
                         allreduce_wait=dist.allreduce_wait_clock(optimizer))
    monitor = TrainingMonitor(world=world, position=position, global_batch=size.global_batch,
                              epochs=size.epochs, eval_every=cfg.eval.every_epochs,
                              eval_dataset_fn=lambda: data.eval(
                                  world.rank, world.size, size.per_rank,
                                  cache=setup.eval_cache(cfg, data.num_val, world)),
                              num_classes=len(data.classes),
                              metrics_path=str(run_dir / records.METRICS),
                              log_dir=str(run_dir / "tensorboard"), log_every=cfg.log_every,
                              lr_fn=lambda: setup.current_lr(optimizer), skips=data.skips,
                              timeline=timeline, stragglers=control.epoch_stragglers,
                              watchdog=watchdog)
    return control, monitor


def _prepare_run_dir(run_dir: Path, resolved: dict, classes: Sequence[str], start: Optional[dict]):
    """Rank 0: the resolved config, the class index, and no metrics for a run that starts afresh
    (a resumed run's were cut back to its checkpoint when the ranks agreed on it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    write_json_atomic(run_dir / "class_index.json", {w: i for i, w in enumerate(classes)})
    if not start:
        (run_dir / records.METRICS).unlink(missing_ok=True)


def _announce(cfg: TrainConfig, world, intra: int, model, data, size: setup.RunSizes,
              schedule: setup.Schedule, run_dir: Path, start: Optional[dict]) -> None:
    """The run's header line, and where it resumes from (rank 0 prints)."""
    passes, opt = size.passes, cfg.optimizer
    log.info(f"{world.size} ranks ({world.controller}), {intra} compute threads/rank, "
             f"ITEX {'on' if itex.active() else 'off'}, "
             f"model {cfg.model} ({model.count_params():,} params, {cfg.precision}), "
             f"{len(data.classes)} classes, {data.num_train} train / {data.num_val} val images "
             f"({cfg.data.format}), global batch {size.global_batch} "
             f"({size.per_rank}/rank" + (f" x {passes} accumulated" if passes > 1 else "") + "), "
             f"{size.updates_per_epoch} steps/epoch, {size.total_updates} steps, "
             f"{opt.name}{f' ({opt.variant})' if opt.name == 'lars' else ''}, "
             f"{cfg.schedule.kind} schedule, peak lr {schedule.peak_lr:g}, "
             f"warmup {schedule.warmup_steps} steps" + (f", recipe {cfg.recipe}" if cfg.recipe else ""),
             extra=knl_log.STDOUT)
    if start:
        log.info(f"resuming from {run_dir / 'checkpoints' / start['name']}: step {start['step']}, "
                 f"epoch {start['epoch'] + 1}, batch {start['batch']}", extra=knl_log.STDOUT)
        for note in start.get("notes", []):
            log.info(note, extra=knl_log.STDOUT)


def _summarize(cfg: TrainConfig, world, size: setup.RunSizes, history, *, num_classes: int,
               resumed_from: Optional[int], horovod: dict, threads: Tuple[int, int],
               timeline: Timeline, checkpoints: int) -> records.RunSummary:
    """The run's summary: accuracy of the last evaluation, throughput over the epochs after the
    first (tracing and warm-up excluded), where the wall clock went, and the run's shape."""
    last = history[-1]
    steady = history[1:] or history
    seconds = sum(r.epoch_seconds for r in steady)
    images = sum(r.images_per_sec * r.epoch_seconds for r in steady)
    evaluated = [r for r in history if r.val_top1 is not None]
    val = evaluated[-1] if evaluated else None
    trained = size.global_batch * (last.step - (resumed_from or 0))
    account = timeline.account(trained, images / seconds)
    if world.is_root:
        log.info(account.text(), extra=knl_log.PROGRESS)
    return records.RunSummary(
        top1=val and val.val_top1, top5=val and val.val_top5, val_loss=val and val.val_loss,
        train_loss=last.loss, train_top1=last.top1,
        images_per_sec=images / seconds, images_per_sec_per_rank=images / seconds / world.size,
        world_size=world.size, controller=world.controller,
        global_batch=size.global_batch, per_rank_batch=size.per_rank,
        backward_passes_per_step=size.passes, epochs=size.epochs, steps=size.total_updates,
        num_classes=num_classes, resumed_from_step=resumed_from,
        model=cfg.model, optimizer=cfg.optimizer.name, precision=cfg.precision,
        horovod=horovod, intra_op_threads=threads[0], inter_op_threads=threads[1],
        config_hash=cfg.hash(), versions=versions.versions() if world.is_root else {},
        **dataclasses.asdict(account),
        epochs_trained=trained / (size.global_batch * size.updates_per_epoch),
        evaluations=len(evaluated), checkpoints=checkpoints)


def _already_complete(run_dir: Path, start: dict) -> dict:
    log.info(f"the run in {run_dir} is already complete (checkpoint {start['name']}, step {start['step']}); "
             "nothing to train. Use --fresh to train it again, or raise epochs or steps to continue it.",
             extra=knl_log.STDOUT)
    try:
        return records.read_summary(run_dir / records.SUMMARY).to_dict()
    except (OSError, ValueError):
        return {"complete": True, "step": start["step"]}
