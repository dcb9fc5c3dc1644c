"""How ranks record their ending for knl-train launch (knl_train/runtime/outcome.py), and how a
rank ends after a user error, seen from the command line on fake ranks (no MPI)."""

from __future__ import annotations

import json
import subprocess

from knl_train.runtime import outcome
from knl_train.runtime.rankenv import RankEnv
from tests.support import KNL_TRAIN, clean_env


def _env(tmp_path, rank, size=2, **more):
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(size),
            RankEnv.var("outcome"): str(tmp_path), **more}


def test_a_record_round_trips_and_names_its_rank(tmp_path):
    assert outcome.record("error", _env(tmp_path, 1), message="bad label", said=True)
    assert outcome.record("stopped", _env(tmp_path, 0), signal="SIGTERM", step=40, checkpoint="c")
    assert outcome.read(tmp_path) == [
        {"rank": 0, "kind": "stopped", "signal": "SIGTERM", "step": 40, "checkpoint": "c"},
        {"rank": 1, "kind": "error", "message": "bad label", "said": True}]
    assert [r["rank"] for r in outcome.peer_errors(_env(tmp_path, 0))] == [1]
    assert outcome.peer_errors(_env(tmp_path, 1)) == []


def test_without_launch_there_is_nothing_to_record_to(tmp_path):
    assert not outcome.record("error", {"OMPI_COMM_WORLD_RANK": "1"}, message="m")
    assert outcome.peer_errors({}) == []
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_directory_is_no_record(tmp_path):
    (tmp_path / "a-file").write_text("")
    assert not outcome.record("error", _env(tmp_path / "a-file" / "dir", 1), message="m")


def test_unreadable_records_are_left_out(tmp_path):
    (tmp_path / "rank-00000.json").write_text("{cut")
    (tmp_path / "rank-00001.json").write_text(json.dumps({"rank": 1, "kind": "error"}))
    assert outcome.read(tmp_path) == [{"rank": 1, "kind": "error"}]


def test_stop_message_names_signal_step_and_checkpoint():
    assert outcome.stop_message("SIGTERM", 40, "/r/checkpoints/step-00000040") == (
        "stopped by SIGTERM at step 40: checkpoint /r/checkpoints/step-00000040 written; rerun "
        "the same command to resume from it")


def test_peer_shut_down_knows_horovods_message():
    assert outcome.peer_shut_down(RuntimeError("... Horovod has been shut down. This was caused"))
    assert not outcome.peer_shut_down(RuntimeError("out of memory"))


# ---- the command line on a fake rank: an unknown preset is an error every rank shares --------------
def _cli(tmp_path, env, *args):
    return subprocess.run([KNL_TRAIN, *args], capture_output=True, text=True, timeout=120,
                          env={**clean_env(), **env})


def test_a_shared_error_is_said_by_rank_zero_put_on_record_and_the_rank_leaves_with_0(tmp_path):
    p = _cli(tmp_path, _env(tmp_path, 0), "env", "--preset", "nosuch")
    assert p.returncode == 0, p.stderr
    assert p.stderr.startswith("knl-train: error: unknown preset 'nosuch'") and p.stderr.count("\n") == 1
    assert outcome.read(tmp_path)[0]["said"] is True


def test_other_ranks_keep_a_shared_error_to_the_record(tmp_path):
    p = _cli(tmp_path, _env(tmp_path, 1), "env", "--preset", "nosuch")
    assert (p.returncode, p.stderr) == (0, "")
    [r] = outcome.read(tmp_path)
    assert r["rank"] == 1 and r["said"] is False and "unknown preset 'nosuch'" in r["message"]


def test_an_error_of_one_rank_names_it_even_rank_zero(tmp_path):
    p = _cli(tmp_path, _env(tmp_path, 0), "exec", "--")  # exec's errors are each rank's own
    assert p.stderr == "knl-train: error (rank 0): nothing to run: knl-train exec -- COMMAND ...\n"
    # Before Horovod started, the other ranks would wait for this one: it leaves non-zero, so
    # that the launcher ends them, though its error is on record.
    assert p.returncode == 2 and outcome.read(tmp_path)[0]["said"] is True


def test_without_launch_a_rank_exits_2(tmp_path):
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    p = _cli(tmp_path, env, "exec", "--")
    assert (p.returncode, p.stderr) == (2, "knl-train: error (rank 1): nothing to run: knl-train "
                                           "exec -- COMMAND ...\n")
    p = _cli(tmp_path, env, "env", "--preset", "nosuch")
    assert (p.returncode, p.stderr) == (2, "")
