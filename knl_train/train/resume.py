"""Where a run starts: afresh, or from the newest checkpoint in its run directory (rank 0 decides)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from knl_train import log as knl_log, records
from knl_train.errors import UserError
from knl_train.atomic import write_text_atomic
from knl_train.train.checkpoint import newest_good

log = knl_log.get(__name__)

MODES = ("auto", "resume", "fresh")


def find(checkpoints: Path, mode: str, *, global_batch: int, passes: int,
         config: dict) -> Optional[dict]:
    """The checkpoint state to resume from, or None to start afresh.

    ``auto``: resume when there is a checkpoint; ``resume``: there must be one; ``fresh``:
    ignore any (the new run's checkpoints supersede them). The newest checkpoint that reads
    back whole is taken, each newer one skipped with a warning; if there are checkpoints but
    none is good, only ``fresh`` starts. ``config`` is this run's resolved
    config; the state's ``notes`` name the fields that differ from the checkpoint's.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "fresh":
        return None
    choice = newest_good(checkpoints)
    state = choice.state
    if state is None and choice.skipped:
        # Starting afresh here would delete the old run's checkpoints and metrics.
        raise UserError(
            f"no usable checkpoint in {checkpoints}: "
            + "; ".join(f"{name}: {why}" for name, why in choice.skipped)
            + ". Nothing was changed. Rerun with --fresh to start over (keeping nothing), "
            "or restore a good checkpoint there to resume from it.")
    for name, why in choice.skipped:
        log.warning(f"skipped checkpoint {checkpoints / name}: {why}")
    if state is None:
        if mode == "resume":
            raise UserError(f"--resume: there is no checkpoint in {checkpoints}; "
                            "run without --resume to start the run")
        return None
    saved = state.pop("config", {})
    _same_model(checkpoints, state, saved, config)
    if (state.get("global_batch"), state.get("passes", 1)) != (global_batch, passes):
        raise UserError(
            f"the checkpoint {checkpoints / state['name']} was written with global batch "
            f"{state.get('global_batch')} ({state.get('passes', 1)} micro-batches per update); this run has "
            f"{global_batch} ({passes}). Resume with the same global batch (set global_batch), "
            "or start afresh with --fresh or a new run_dir.")
    changed = changed_fields(saved, config)
    if changed:
        state["notes"] = [f"note: the config differs from the checkpoint's in {', '.join(changed)}"]
    return state


def _same_model(checkpoints: Path, state: dict, saved: dict, config: dict) -> None:
    """``UserError`` if the checkpoint's config names another model, or another ``num_classes``
    (where both set it), than this run's: its variables would not fit, and the restore would
    fail deep in TensorFlow. Other shape changes are caught by ``CheckpointManager.restore``."""
    def classes(cfg: dict):
        return cfg.get("data", {}).get("num_classes") if isinstance(cfg.get("data"), dict) else None

    def of(cfg: dict) -> str:
        return f"{cfg.get('model')}" + (f" ({classes(cfg)} classes)" if classes(cfg) else "")
    if not isinstance(saved, dict) or "model" not in saved:
        return  # a checkpoint without its config: the restore checks the shapes
    if saved.get("model") != config.get("model") or \
            None not in (classes(saved), classes(config)) and classes(saved) != classes(config):
        raise UserError(
            f"run_dir {checkpoints.parent} holds checkpoints of model {of(saved)} (newest "
            f"{state['name']}, step {state['step']}); this config trains model {of(config)}: use "
            "another run_dir, or --fresh to discard them")


def changed_fields(old: dict, new: dict, prefix: str = "") -> List[str]:
    """Dotted names of the config fields that differ between two resolved configs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records past ``step``: the resumed run writes them again.

    A last line that is not JSON and lacks its newline was cut off by an interrupted write: it
    is dropped with a note. Any other bad line is an error naming it."""
    if not path.exists():
        return

    def dropped(n: int) -> None:
        log.warning(f"dropped the cut-off last line {n} of {path} (an interrupted write)")
    try:
        kept = [line.rstrip("\n") for _, line, record in
                records.json_lines(path, cut_short_ok=True, on_cut_short=dropped)
                if record.get("step", 0) <= step]
    except ValueError as e:
        raise UserError(f"{e}; fix or remove that line, or rerun with --fresh to start over") from None
    write_text_atomic(path, "".join(line + "\n" for line in kept))
