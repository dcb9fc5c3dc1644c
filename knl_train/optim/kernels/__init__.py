"""The fused LARS ops (``lars_fused.cc``), compiled by ``make env``, and when to use them.

The library holds two ops with one implementation of the formulas: ``KnlLarsApply`` updates
one variable, ``KnlLarsApplyMulti`` all of a step's variables of one dtype (LARS's usual
path, one op per step) and gives each variable the same bits.

``KNL_TRAIN_LARS_KERNEL`` chooses the path LARS takes:

``auto`` (default)  the fused ops if they are built for this TensorFlow, else the pure-TF
                    path, saying so once per process on stderr;
``fused``           the fused ops, or a :class:`~knl_train.errors.UserError` saying why not;
``tf``              the pure-TF path.

In every mode, float16 variables (no kernel) and XLA-compiled steps (no custom ops) take the
pure-TF path.

The op lives outside the source tree, per environment and TensorFlow version
(:func:`library_path`), with a JSON sidecar recording the source hash and the instruction set
it was compiled for. A library built from another version of ``lars_fused.cc``, or for an
instruction set this CPU lacks, counts as not built: loading it could change the numerics
silently or crash the process.

Both paths compute the same formulas (see ``knl_train/optim/lars.py``); the fused one is
bit-deterministic for given inputs but not bit-identical to the pure-TF one, so every rank of
a job must take the same path (same environment, same setting).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import tensorflow as tf

import knl_train.log
from knl_train.errors import UserError
from knl_train.runtime.rankenv import RankEnv

log = knl_train.log.get(__name__)

ENV_VAR = RankEnv.var("lars_kernel")
MODES = ("auto", "fused", "tf")
DIR_ENV_VAR = RankEnv.var("kernel_dir")
SOURCE = Path(__file__).with_name("lars_fused.cc")
# Variable dtypes the op is registered for; others (float16) always take the pure-TF path.
FUSED_DTYPES = (tf.float32, tf.float64, tf.bfloat16)

_lock = threading.Lock()
_cache: dict = {}  # library path -> (module or None, reason it is unusable or None)
_told: set = set()  # reasons already printed by the auto fallback


def mode(environ=None) -> str:
    """The requested path, validated."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()
    if value and value not in MODES:
        raise UserError(f"{ENV_VAR}={value!r}: use one of {', '.join(MODES)}")
    return value or "auto"


def kernel_dir() -> Path:
    """Where ``make env`` puts compiled kernels: per environment unless overridden."""
    override = os.environ.get(DIR_ENV_VAR)
    return Path(override) if override else Path(sys.prefix) / "opt" / "knl-train" / "kernels"


def library_path(tf_version: Optional[str] = None) -> Path:
    """The op library for this TensorFlow (its C++ ABI changes between versions)."""
    return kernel_dir() / f"lars_fused-tf{tf_version or tf.__version__}.so"


def sidecar_path(library: Path) -> Path:
    return library.with_suffix(".json")


def source_digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def cpu_flags() -> Optional[set]:
    """This CPU's feature flags (Linux), or None when they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _why_unusable(library: Path) -> Optional[str]:
    """None if ``library`` is current and runnable here, else the reason (a sentence)."""
    if not library.is_file():
        return f"{library} is not built"
    try:
        info = json.loads(sidecar_path(library).read_text())
    except (OSError, ValueError):
        return f"{library} has no readable build record {sidecar_path(library).name}"
    if info.get("source_sha256") != source_digest():
        return f"{library} was built from another version of {SOURCE.name} (stale)"
    needed = set(info.get("cpu_flags_required", ()))
    have = cpu_flags()
    if needed and have is not None and not needed <= have:
        return (f"{library} needs CPU features {', '.join(sorted(needed - have))} "
                "that this CPU lacks")
    return None


def _load(library: Path):
    """(module, None) or (None, reason); cached per library path."""
    with _lock:
        if library not in _cache:
            reason = _why_unusable(library)
            module = None
            if reason is None:
                try:
                    module = tf.load_op_library(str(library))
                except (tf.errors.OpError, OSError) as e:  # e.g. built against another TF
                    reason = f"{library} failed to load: {e}"
            _cache[library] = (module, reason)
        return _cache[library]


def lars_op(dtype=None):
    """The op module for variables of ``dtype`` (any supported dtype if None), or None when
    the pure-TF path is to be used. Raises UserError if ``fused`` was requested but the op is
    unusable."""
    chosen = mode()
    if chosen == "tf":
        return None
    if dtype is not None and tf.as_dtype(dtype).base_dtype not in FUSED_DTYPES:
        return None
    module, reason = _load(library_path())
    if module is not None:
        return module
    if chosen == "fused":
        raise UserError(f"{ENV_VAR}=fused but {reason}. Run 'make env' to build it "
                        f"(python -m knl_train.optim.kernels.build), or set {ENV_VAR}=auto.")
    with _lock:
        first = reason not in _told
        _told.add(reason)
    # One line per job, not one per rank (2048 ranks would print 2048 copies): the log says it
    # from rank 0 only.
    if first:
        log.info(f"fused LARS kernel unavailable: {reason}; using the pure-TF LARS path (slower "
                 "optimizer step). Run 'make env' to build it (or python -m "
                 "knl_train.optim.kernels.build).")
    return None


def status() -> dict:
    """What a run would use, for logs and benchmark records; never raises or prints."""
    library = library_path()
    try:
        chosen = mode()
    except UserError as e:
        return {"mode": None, "error": str(e), "library": str(library)}
    module, reason = (None, "pure-TF path requested") if chosen == "tf" else _load(library)
    return {"mode": chosen, "fused": module is not None, "library": str(library),
            "reason": reason}


def reset() -> None:
    """Forget loaded-library checks and printed messages (tests; after a rebuild)."""
    with _lock:
        _cache.clear()
        _told.clear()


__all__ = ["ENV_VAR", "MODES", "FUSED_DTYPES", "SOURCE", "cpu_flags", "kernel_dir",
           "lars_op", "library_path", "mode", "reset", "source_digest", "status"]
