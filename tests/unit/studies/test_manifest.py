"""The study manifest (knl_train.studies.manifest): Manifest, PointRecord and JobRecord read back
to the JSON they were read from; load checks what every study command relies on; the lock."""

from __future__ import annotations

import json

import pytest

from knl_train.errors import UserError
from knl_train.studies import manifest
from knl_train.studies.manifest import JobRecord, Manifest, PointRecord


def point(pid: str = "n0001", **fields) -> dict:
    return {"id": pid, "nodes": 1, "ranks": 2, "global_batch": 64,
            "run_dirs": [f"points/{pid}/run-0"], **fields}


def data(**fields) -> dict:
    return {"version": 1, "study": "s", "scaling": "weak", "images_per_epoch": 1000,
            "project_epochs": 90, "warmup_steps": 1, "points": [point()], **fields}


def write(tmp_path, content) -> None:
    (tmp_path / manifest.NAME).write_text(content if isinstance(content, str) else json.dumps(content))


def load_error(tmp_path, content) -> str:
    write(tmp_path, content)
    with pytest.raises(UserError) as e:
        Manifest.load(tmp_path)
    return str(e.value)


# ---- JobRecord -------------------------------------------------------------------------------------
def test_a_new_job_is_rendered_and_unsubmitted():
    assert JobRecord.new().to_dict() == {"id": None, "state": "rendered"}


def test_updated_keeps_the_fields_set_even_to_none_in_order():
    job = JobRecord.new().updated(state="submitting", error=None)
    assert list(job.to_dict().items()) == [("id", None), ("state", "submitting"), ("error", None)]
    job = job.updated(id="12", state="submitted", submitted="t", after=None)
    assert list(job.to_dict()) == ["id", "state", "error", "submitted", "after"]
    assert "adopted" not in job.to_dict() and job.adopted is None


@pytest.mark.parametrize("written", [{}, {"id": "7", "state": None},
                                     {"state": "submit-failed", "error": "x", "id": None},
                                     {"id": "1", "state": "failed", "exit_code": 2, "checked": "t",
                                      "adopted": True, "submitted": "s"}])
def test_job_reads_back_to_what_was_written(written):
    assert JobRecord.from_dict(written).to_dict() == written


# ---- load and save ---------------------------------------------------------------------------------
def test_a_minimal_manifest_loads_with_defaults_and_keeps_absent_jobs_absent(tmp_path):
    write(tmp_path, data(points=[point(), point("n0002", job={"id": "5", "state": "running"})]))
    m = Manifest.load(tmp_path)
    assert (m.scheduler, m.repeats, m.array, m.chain, m.notes) == (None, None, False, False, ())
    first, second = m.points
    assert first.job is None and first.run_dirs == ("points/n0001/run-0",) and first.token is None
    assert second.job == JobRecord.from_dict({"id": "5", "state": "running"})
    assert "job" not in first.to_dict() and second.to_dict()["job"] == {"id": "5", "state": "running"}


def test_save_writes_what_load_read(tmp_path):
    full = data(uid="u", scheduler="slurm", site="x", launcher="srun", preset="p", preset_ref="p",
                repeats=1, array=False, chain=True, memory_mode=None, spec_path="/s.yaml",
                created="c", knl_train="0.1.0", notes=["a note"],
                points=[point(ranks_per_node=2, cores_per_rank=4, cpus_per_task=8, per_rank_batch=32,
                              steps=10, epochs=None, walltime="00:30:00", queue=None,
                              constraints=["knl"], job_name="s_n1", script="points/n0001/job.sbatch",
                              token="knl-train:u:n0001", job={"id": None, "state": "rendered"})])
    write(tmp_path, full)
    before = (tmp_path / manifest.NAME).read_text()
    m = Manifest.load(tmp_path)
    assert m.to_dict() == full
    m.save(tmp_path)
    assert json.loads((tmp_path / manifest.NAME).read_text()) == json.loads(before)
    assert not list(tmp_path.glob(f".{manifest.NAME}.*"))   # atomic: no temporary file left


def test_with_job_makes_a_new_manifest(tmp_path):
    write(tmp_path, data(points=[point(), point("n0002")]))
    m = Manifest.load(tmp_path)
    job = JobRecord.new().updated(id="9", state="submitted")
    changed = m.with_job("n0002", job)
    assert changed.point("n0002").job == job and changed.point("n0001").job is None
    assert m.point("n0002").job is None


def test_new_is_this_version_and_dated():
    p = PointRecord(id="n0001", nodes=1, ranks=1, global_batch=8, run_dirs=("r",), job=JobRecord.new())
    m = Manifest.new(study="s", scaling="strong", warmup_steps=0, images_per_epoch=10, project_epochs=1,
                     points=(p,))
    assert m.version == manifest.VERSION and m.created
    assert m.to_dict()["points"][0]["run_dirs"] == ["r"]


@pytest.mark.parametrize("content, words", [
    ("{not json", "is damaged"),
    ([1, 2], "is not a JSON object"),
    (data(version=2), "has version 2; this knl-train reads version 1"),
    ({k: v for k, v in data().items() if k != "warmup_steps"}, "has no 'warmup_steps'"),
    (data(images_per_epoch=0), "invalid 'images_per_epoch': 0"),
    (data(warmup_steps=1.5), "invalid 'warmup_steps': 1.5"),
    (data(points={}), "invalid 'points'"),
    (data(scaling="sideways"), "scaling is 'sideways', not 'weak' or 'strong'"),
    (data(points=[{"id": "n0001", "nodes": 1}]), "point n0001 has no 'ranks'"),
    (data(points=["n0001"]), "a point is not a JSON object"),
    (data(points=[point(run_dirs="run-0")]), "point n0001: 'run_dirs' is \"run-0\", not a list of strings"),
    (data(points=[point(job="queued")]), "point n0001: invalid 'job'"),
    # Fields of the wrong type: one line naming the field, not a traceback later.
    (data(points=[point(nodes="4")]), "point n0001: 'nodes' is \"4\", not an integer"),
    (data(points=[point(nodes=True)]), "point n0001: 'nodes' is true, not an integer"),
    (data(points=[point(id=7)]), "a point's 'id' is 7, not a string"),
    (data(points=[point(run_dirs=["run-0", 1])]), "'run_dirs' is [\"run-0\", 1], not a list of strings"),
    (data(points=[point(job={"id": 12, "state": "submitted"})]),
     "point n0001: job 'id' is 12, not a string or null"),
    (data(points=[point(job={"id": "12", "exit_code": "0"})]), "job 'exit_code' is \"0\", not an integer or null"),
    (data(points=[point(job={"id": "12", "retries": 1.5})]), "job 'retries' is 1.5, not an integer or null"),
    (data(array="yes"), "'array' is \"yes\", not true or false"),
    (data(study=["a"]), "'study' is [\"a\"], not a string"),
    (data(notes="a note"), "'notes' is \"a note\", not a list of strings"),
])
def test_load_names_what_is_wrong(tmp_path, content, words):
    msg = load_error(tmp_path, content)
    assert str(tmp_path / manifest.NAME) in msg and words in msg
    assert "\n" not in msg


def test_retried_keeps_the_count_and_the_earlier_ids():
    job = JobRecord.new().updated(id="41", state="failed", exit_code=1)
    again = job.retried()
    assert (again.id, again.state, again.retries, again.earlier) == (None, "rendered", 1, ("41",))
    third = again.updated(id="42", state="timeout").retried()
    assert (third.retries, third.earlier) == (2, ("41", "42"))
    back = JobRecord.from_dict(json.loads(json.dumps(third.to_dict())))
    assert back == third and back.to_dict() == {"id": None, "state": "rendered", "retries": 2,
                                                "earlier": ["41", "42"]}


def test_no_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(UserError, match="is not a study directory; create one with `knl-train study render"):
        Manifest.load(tmp_path / "nowhere")


# ---- the lock --------------------------------------------------------------------------------------
def test_locked_is_exclusive_and_released(tmp_path):
    with manifest.locked(tmp_path):
        with pytest.raises(UserError, match="another knl-train study command is changing"):
            with manifest.locked(tmp_path):
                pass
    with manifest.locked(tmp_path):
        pass
