"""``knl-train env`` output (knl_train/tuning/show.py): one rank's exports, each launcher's line
and the JSON plan, for a recorded KNL node."""

from __future__ import annotations

import json
import shlex

import pytest

from knl_train.errors import UserError
from knl_train.tuning import preset, show, snapshot
from knl_train.tuning.plan import plan
from tests.support import FIXTURES

SNAPSHOTS = FIXTURES / "topology"


def snap(name):
    return snapshot.load(SNAPSHOTS / f"{name}.json")


def knl4():
    return plan(preset.load("knl-7250"), snap("knl-7250-quad-flat"), 4)


def test_sh_exports_one_ranks_settings():
    text = show.text(knl4(), "sh", preset_ref="knl-7250", rank=1)
    assert "# local rank 1 of 4 per node: CPUs 17-33,85-101,169,237" in text
    assert "export KMP_AFFINITY='granularity=fine,proclist=[17-32,85-100],explicit'" in text
    assert "export OMP_NUM_THREADS=32" in text and "export HOROVOD_THREAD_AFFINITY=16,33,50,67" in text
    assert "# memory: run the command under: numactl --preferred=1" in text


def test_mpirun_line_maps_ppr_with_pe_and_passes_only_the_preset():
    line = show.text(knl4(), "mpirun", preset_ref="knl-7250", nodes=8, command=["knl-train", "train"])
    args = shlex.split(line)
    assert args[:7] == ["mpirun", "-np", "32", "--map-by", "ppr:4:node:PE=17", "--bind-to", "core"]
    assert "KNL_TRAIN_PRESET=knl-7250" in args and "KNL_TRAIN_RANKS_PER_NODE=4" in args
    assert "KNL_TRAIN_CORES_PER_RANK=17" in args
    # The same Open MPI settings as knl-train launch: yield while waiting, a SIGTERM grace.
    assert "mpi_yield_when_idle" in args and "odls_base_sigkill_timeout" in args
    assert args[-5:] == ["knl-train", "exec", "--", "knl-train", "train"]


def test_srun_line_sets_cpus_per_task_and_binds_each_rank_to_its_mask():
    args = shlex.split(show.text(knl4(), "srun", preset_ref="knl-7250", nodes=2))
    assert "--ntasks-per-node=4" in args and "--ntasks=8" in args
    assert "--cpus-per-task=68" in args  # 17 cores x 4 hardware threads
    (bind,) = [a for a in args if a.startswith("--cpu-bind=")]
    masks = bind.split(":", 1)[1].split(",")
    assert len(masks) == 4
    assert int(masks[0], 16) == sum(1 << c for c in knl4().ranks[0].cpus)
    assert ("--export=ALL,KNL_TRAIN_PRESET=knl-7250,KNL_TRAIN_RANKS_PER_NODE=4,"
            "KNL_TRAIN_CORES_PER_RANK=17") in args


def test_aprun_line_lists_each_ranks_cpus():
    args = shlex.split(show.text(knl4(), "aprun", preset_ref="knl-7250", nodes=2))
    # 32 compute threads (16 cores x 2, ALCF's -j 2) and the spare core's 4 hardware threads.
    assert args[:9] == ["aprun", "-n", "8", "-N", "4", "-d", "36", "-j", "2"]
    cc = args[args.index("-cc") + 1].split(":")
    assert cc[0] == "0-16,68-84,152,220" and len(cc) == 4
    assert "KNL_TRAIN_PRESET=knl-7250" in args


def test_intel_mpi_line_pins_domains_by_mask():
    args = shlex.split(show.text(knl4(), "impi", preset_ref="knl-7250", nodes=2))
    assert args[:5] == ["mpiexec.hydra", "-n", "8", "-ppn", "4"]
    domains = args[args.index("I_MPI_PIN_DOMAIN") + 1]
    masks = [int(m, 16) for m in domains.strip("[]").split(",")]
    assert masks == [sum(1 << c for c in rank.cpus) for rank in knl4().ranks]


def test_json_has_every_rank():
    data = json.loads(show.text(knl4(), "json", preset_ref="knl-7250"))
    assert [r["local_rank"] for r in data["ranks"]] == [0, 1, 2, 3]
    assert data["ranks"][2]["env"]["TF_NUM_INTRAOP_THREADS"] == "32"
    assert data["numactl"] == ["numactl", "--preferred=1"]


def test_a_local_rank_outside_the_plan_is_an_error():
    with pytest.raises(UserError, match="--local-rank 4 is out of range.*0-3"):
        show.text(knl4(), "sh", preset_ref="knl-7250", rank=4)
