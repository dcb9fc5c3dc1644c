"""The pinned software stack: what is installed, and the guards against what silently breaks."""

from __future__ import annotations

import importlib.metadata as md
import platform
import shutil
import subprocess

from knl_train.errors import UserError
from knl_train.runtime import itex


def _dist_version(name: str):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def mpi_library_version() -> str:
    """The MPI library's own version string, without initialising MPI."""
    try:
        import mpi4py
        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = False
        from mpi4py import MPI
        return MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - report what we can; mpirun may still answer
        mpirun = shutil.which("mpirun")
        if not mpirun:
            return "not found"
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "unknown"


def keras_version() -> str:
    """The Keras behind ``tf.keras`` (Keras 2.15 with TF 2.15; Keras 3 from TF 2.16)."""
    import tensorflow as tf
    version = getattr(tf.keras, "__version__", None) or getattr(tf.keras, "version", lambda: None)()
    if version is None:
        import keras
        version = keras.__version__
    return version


def versions() -> dict:
    """Versions of everything a run's numbers depend on (for `knl-train version` and summaries)."""
    import tensorflow as tf
    info = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras_version(),
        "horovod": _dist_version("horovod"),
        "horovod_controllers": [],
        "horovod_tensor_operations": [],
        "itex": itex.site_version() or itex.side_version(),
        "itex_active": itex.active(),
        "mpi": mpi_library_version(),
        "knl_train": _dist_version("knl-train"),
    }
    try:
        import horovod.tensorflow as hvd
        info["horovod_controllers"] = [n for n, ok in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if ok]
        info["horovod_tensor_operations"] = [n for n, ok in (
            ("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built()), ("NCCL", hvd.nccl_built()),
            ("oneCCL", hvd.ccl_built()), ("DDL", hvd.ddl_built())) if ok]
    except ImportError as e:
        info["horovod"] = f"unusable: {e}"
    return info


def check_keras() -> None:
    """Refuse Keras 3: Horovod's Keras integration silently stops averaging gradients there."""
    version = keras_version()
    if int(version.split(".")[0]) >= 3:
        raise UserError(
            f"tf.keras is Keras {version}; knl-train needs Keras 2 (TensorFlow 2.15). "
            "Under Keras 3 Horovod's DistributedOptimizer is bypassed and ranks silently stop "
            "averaging gradients. Run 'make env' to get the pinned stack.")
