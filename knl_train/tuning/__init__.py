"""CPU tuning, a library: a node's topology, threading presets, per-rank plans, launcher lines.

``topology`` reads a node (``snapshot`` records one to plan elsewhere), ``preset`` holds the
cited presets, ``plan`` lays a preset onto a node, ``launchers`` turns a plan into a launcher's
line (one class per launcher, by name), ``launch`` is ``knl-train launch`` and ``show`` is
``knl-train env``. Nothing here imports TensorFlow or Horovod: the autotuner, which runs
training, is ``knl_train.autotune``.
"""

from knl_train.tuning import launch, launchers, plan, preset, show, snapshot, topology
from knl_train.tuning.launch import LaunchPlan
from knl_train.tuning.launchers import Launcher, Request
from knl_train.tuning.plan import NodePlan, RankPlan, node_plan, preset_ref
from knl_train.tuning.preset import Preset, Settings, nominal_topology
from knl_train.tuning.topology import Topology

__all__ = ["launch", "launchers", "plan", "preset", "show", "snapshot", "topology", "LaunchPlan",
           "Launcher", "Request", "NodePlan", "RankPlan", "node_plan", "preset_ref", "Preset",
           "Settings", "nominal_topology", "Topology"]
