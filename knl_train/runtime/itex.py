"""Intel Extension for TensorFlow (ITEX) on demand.

TF loads every plugin found in a ``site-packages/tensorflow-plugins`` directory on ``sys.path``
at import time, so an ITEX installed into the environment's site-packages would be active in
every run with no way to turn it off. ``make env`` therefore installs it beside the
environment, in ``<venv>/opt/itex/site-packages``, and a run opts in with ``KNL_TRAIN_ITEX=1``
(presets and the autotuner compare both). A site that installs ``knl-train[itex]`` into
site-packages instead gets ITEX always on; ``versions()`` reports which case applies.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from pathlib import Path
from typing import Optional

from knl_train.errors import UserError
from knl_train.runtime.rankenv import RankEnv

ENV_VAR = RankEnv.var("itex")
DIST = "intel-extension-for-tensorflow"


def side_dir() -> Path:
    return Path(sys.prefix) / "opt" / "itex" / "site-packages"


def side_version() -> Optional[str]:
    """Version of the ITEX installed beside the environment, if any."""
    for dist in md.distributions(path=[str(side_dir())]):
        if dist.metadata["Name"] == DIST:
            return dist.version
    return None


def site_version() -> Optional[str]:
    """Version of an ITEX installed into site-packages (always loaded), if any."""
    paths = [p for p in sys.path if Path(p or ".").resolve() != side_dir().resolve()]
    for dist in md.distributions(path=paths):
        if dist.metadata["Name"] == DIST:
            return dist.version
    return None


def requested(environ=None) -> bool:
    return bool(RankEnv.from_environ(environ, ("itex",)).itex)


def enable() -> None:
    """Put the side-installed ITEX on sys.path; must run before TensorFlow is imported."""
    if "tensorflow" in sys.modules:
        raise UserError(f"{ENV_VAR}=1 must be set before TensorFlow is imported")
    path = side_dir()
    if side_version() is None:
        raise UserError(f"{ENV_VAR}=1 but ITEX is not installed in {path}; run 'make env'")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    # Child processes (tf.data workers, subprocesses) see the same TF plugins.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))


def active() -> bool:
    """Whether ITEX is importable in this process (after TF import: whether it was loaded)."""
    return site_version() is not None or str(side_dir()) in sys.path
