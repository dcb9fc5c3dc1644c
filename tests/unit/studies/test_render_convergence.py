"""Rendering a convergence study (knl_train.studies.render, ``kind: convergence``) for Slurm and
PBS: one script per point whose ``--set`` words are the point's overrides, its header, one run per
point, the training config each point loads, and manifest.json (with the convergence fields, and
without them for scaling studies). Nothing here needs a scheduler or trains.

The base spec is tests.support.write_convergence_spec (see test_spec_convergence.py)."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

from knl_train.studies import render, schedulers
from knl_train.studies import spec as study_spec
from knl_train.studies.manifest import Manifest
from knl_train.train import config as train_config
from tests.support import ROOT, ok, run_cli, write_convergence_spec as write_spec, write_study_spec

SITES = {"generic-slurm": ("slurm", "job.sbatch"), "generic-pbs": ("pbs", "job.pbs")}
CONVERGENCE_STUDY_KEYS = {"kind", "target_top1", "reference_batch", "epochs"}
CONVERGENCE_POINT_KEYS = {"optimizer", "lr", "repeat", "accumulation"}
# What a scaling study's manifest.json held before convergence studies (it must not change).
SCALING_STUDY_KEYS = ("version", "study", "uid", "scheduler", "site", "launcher", "preset", "preset_ref",
                      "scaling", "repeats", "array", "chain", "warmup_steps", "images_per_epoch",
                      "project_epochs", "memory_mode", "spec_path", "created", "knl_train", "notes", "points")
SCALING_POINT_KEYS = ("id", "nodes", "ranks_per_node", "ranks", "cores_per_rank", "cpus_per_task",
                      "global_batch", "per_rank_batch", "steps", "epochs", "walltime", "queue", "constraints",
                      "job_name", "script", "run_dirs", "token", "job")


def rendered(path):
    study = study_spec.load(path)
    return study, render.render(study, command="knl-train")


def scripts(r: render.Rendered) -> dict:
    """{point id: script text}, in point order."""
    return {rel.split("/")[1]: text for rel, text in r.files.items() if rel.endswith((".sbatch", ".pbs"))}


def set_words(text: str) -> list:
    """The values of the training command's ``--set`` options, as the shell passes them."""
    lines = [ln for ln in text.splitlines() if '"$KT" train' in ln]
    assert len(lines) == 1, lines
    words = shlex.split(lines[0])
    return [words[i + 1] for i, w in enumerate(words) if w == "--set"]


def header(text: str) -> list:
    return [ln for ln in text.splitlines() if ln.startswith("# convergence:") or " scaling: " in ln]



# ---- scripts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("site", sorted(SITES))
def test_one_script_per_point(tmp_path, site):
    study, r = rendered(write_spec(tmp_path, site=site))
    scheduler, name = SITES[site]
    assert list(scripts(r)) == [p.id for p in study.points] and len(study.points) == 12
    assert sorted(r.files) == sorted(["train.yaml", "study.yaml", *(f"points/{p.id}/{name}" for p in study.points)])
    backend = schedulers.get(scheduler)
    for text in scripts(r).values():
        assert backend.check(text) == []
        assert text.startswith("#!/bin/bash\n")


@pytest.mark.parametrize("site", sorted(SITES))
def test_set_words_are_the_point_overrides(tmp_path, site):
    study, r = rendered(write_spec(tmp_path, site=site, repeats=2))
    texts = scripts(r)
    for p in study.points:
        words = set_words(texts[p.id])
        assert words == [*p.overrides, "run_dir=$PWD/run-$REPEAT"], p.id
    words = set_words(texts["lars-b004096-lr4-r1"])
    assert words == ["optimizer.name=lars", "global_batch=4096", "horovod.backward_passes_per_step=32",
                     "epochs=4", "schedule.reference_batch=256", "schedule.peak_lr=4.0", "seed=1235",
                     "run_dir=$PWD/run-$REPEAT"]


def test_set_words_survive_the_shell(tmp_path):
    """A list value and a value with a space reach the trainer as one word each."""
    study, r = rendered(write_spec(tmp_path, optimizers={"lars": {
        "set": {"optimizer.name": "lars", "optimizer.exclude_from_weight_decay": ["bn", "bias"]}, "lr": [2]}}))
    for p in study.points:
        words = set_words(scripts(r)[p.id])
        assert words[:2] == ["optimizer.name=lars", "optimizer.exclude_from_weight_decay=[bn, bias]"]
    assert "--set 'optimizer.exclude_from_weight_decay=[bn, bias]'" in scripts(r)[study.points[0].id]


def test_log_every_only_when_the_spec_sets_it(tmp_path):
    """A convergence point logs as its training config says (demo.yaml: 10) unless the spec says."""
    study, r = rendered(write_spec(tmp_path))
    assert all(not any(w.startswith("log_every=") for w in set_words(t)) for t in scripts(r).values())
    assert yaml.safe_load(r.files["train.yaml"])["log_every"] == 10
    study, r = rendered(write_spec(tmp_path, log_every=5))
    for p in study.points:
        assert set_words(scripts(r)[p.id]) == [*p.overrides, "log_every=5", "run_dir=$PWD/run-$REPEAT"]


@pytest.mark.parametrize("site", sorted(SITES))
def test_header_names_optimizer_lr_batch_accumulation(tmp_path, site):
    study, r = rendered(write_spec(tmp_path, site=site, repeats=2))
    texts = scripts(r)
    assert header(texts["lars-b001024-lr4-r1"]) == [
        "# convergence: optimizer lars, peak LR 4.0 at the reference batch, global batch 1024 "
        "(64 per rank x 2 ranks x 8 accumulated); 4 epochs; repeat 1"]
    assert header(texts["sgd-goyal-b000256-lr0.1-r0"]) == [
        "# convergence: optimizer sgd-goyal, peak LR 0.1 at the reference batch, global batch 256 "
        "(64 per rank x 2 ranks x 2 accumulated); 4 epochs; repeat 0"]
    for text in texts.values():
        assert "None scaling" not in text and "scaling: global batch" not in text
        assert "# knl-train study cv: point " in text


@pytest.mark.parametrize("site", sorted(SITES))
def test_one_run_per_point(tmp_path, site):
    """Repeats are points of their own: each script runs once, as run-0."""
    study, r = rendered(write_spec(tmp_path, site=site, repeats=3))
    assert len(study.points) == 36
    for text in scripts(r).values():
        assert re.findall(r"^REPEATS=.*$", text, re.M) == ["REPEATS=0"]
        assert "#SBATCH --array" not in text and "#PBS -J" not in text
    assert all(p.run_dirs == (f"points/{p.id}/run-0",) for p in r.manifest.points)


def test_scaling_scripts_keep_their_header(tmp_path):
    study, r = rendered(write_study_spec(tmp_path))
    for text in scripts(r).values():
        assert "# convergence:" not in text
        assert re.search(r"^# weak scaling: global batch \d+ \(\d+ per rank\); 20 steps per repeat; 1 repeat\(s\)$",
                         text, re.M)
        assert set_words(text)[:3] == [f"per_rank_batch={study.points[0].per_rank_batch}", "steps=20", "log_every=1"]


# ---- every point's training config ---------------------------------------------------------------
@pytest.mark.parametrize("site", sorted(SITES))
def test_every_point_config_loads_with_its_batches(tmp_path, site):
    """train.yaml with the script's --set words is the config each point trains: its global batch
    is G, its micro-batch 64, its updates accumulate G / 128 micro-batches."""
    out = tmp_path / "study"
    study, r = rendered(write_spec(tmp_path, site=site, repeats=2, reference_batch=512))
    render.write(r, out)
    base = yaml.safe_load((out / "train.yaml").read_text())
    assert (base["global_batch"], base["per_rank_batch"], base["steps"]) == (None, None, None)
    for p in study.points:
        words = set_words((out / "points" / p.id / SITES[site][1]).read_text())
        words[-1] = f"run_dir={out / p.directory / 'run-0'}"
        cfg = train_config.load(str(out / "train.yaml"), words)
        assert cfg.batch_sizes(p.ranks) == (p.global_batch, 64)
        assert cfg.horovod.backward_passes_per_step == p.global_batch // 128 == p.accumulation
        assert (cfg.epochs, cfg.steps) == (4, None)
        assert (cfg.schedule.peak_lr, cfg.schedule.reference_batch) == (p.lr, 512)
        assert cfg.optimizer.name == {"lars": "lars", "sgd-goyal": "sgd"}[p.optimizer]
        assert cfg.schedule.scaling == {"lars": "none", "sgd-goyal": "linear"}[p.optimizer]
        assert cfg.seed == 1234 + p.repeat
        assert cfg.run_dir == str(out / p.directory / "run-0")


# ---- manifest.json ---------------------------------------------------------------------------------
@pytest.mark.parametrize("site", sorted(SITES))
def test_manifest_round_trips(tmp_path, site):
    out = tmp_path / "study"
    study, r = rendered(write_spec(tmp_path, site=site, repeats=2))
    render.write(r, out)
    data = json.loads((out / "manifest.json").read_text())
    m = Manifest.load(out)
    assert m.to_dict() == data and m == r.manifest
    assert (m.kind, m.scaling, m.target_top1, m.epochs, m.reference_batch) == ("convergence", None, 0.8, 4, 256)
    assert (m.scheduler, m.site, m.repeats, m.array) == (SITES[site][0], site, 2, False)
    assert (data["kind"], data["scaling"], data["target_top1"]) == ("convergence", None, 0.8)
    assert len(m.points) == 24
    for rec, p in zip(m.points, study.points):
        assert (rec.id, rec.optimizer, rec.lr, rec.repeat, rec.accumulation) == (
            p.id, p.optimizer, p.lr, p.repeat, p.global_batch // 128)
        assert (rec.global_batch, rec.per_rank_batch, rec.epochs, rec.steps) == (p.global_batch, 64, 4, None)
        assert rec.run_dirs == (f"points/{p.id}/run-0",)
        assert rec.script == f"points/{p.id}/{SITES[site][1]}" and (out / rec.script).is_file()
        assert rec.job_name == p.job_name and rec.job.state == "rendered"
        if site == "generic-slurm":
            assert f"#SBATCH --comment={rec.token}\n" in (out / rec.script).read_text()
    first = data["points"][0]
    assert (first["optimizer"], first["lr"], first["repeat"], first["accumulation"]) == ("sgd-goyal", 0.1, 0, 2)
    assert isinstance(first["lr"], float)
    last = data["points"][-1]
    assert (last["id"], last["lr"], last["repeat"], last["accumulation"]) == ("lars-b004096-lr4-r1", 4.0, 1, 32)


def test_manifest_reference_batch_from_the_spec_and_no_target(tmp_path):
    out = tmp_path / "study"
    render.write(rendered(write_spec(tmp_path, reference_batch=1024, drop=("target_top1",)))[1], out)
    data = json.loads((out / "manifest.json").read_text())
    assert data["reference_batch"] == 1024 and "target_top1" not in data
    m = Manifest.load(out)
    assert (m.reference_batch, m.target_top1, m.kind) == (1024, None, "convergence")


def test_scaling_manifest_has_no_convergence_keys(tmp_path):
    """A scaling study's manifest.json has exactly the keys it had before convergence studies."""
    out = tmp_path / "study"
    render.write(rendered(write_study_spec(tmp_path))[1], out)
    data = json.loads((out / "manifest.json").read_text())
    assert sorted(data) == sorted(SCALING_STUDY_KEYS)
    assert not CONVERGENCE_STUDY_KEYS & set(data) and data["scaling"] == "weak"
    for p in data["points"]:
        assert sorted(p) == sorted(SCALING_POINT_KEYS)
        assert not CONVERGENCE_POINT_KEYS & set(p)
    m = Manifest.load(out)
    assert m.kind == "scaling" and m.to_dict() == data
    assert all((p.optimizer, p.lr, p.repeat, p.accumulation) == (None,) * 4 for p in m.points)


def test_study_yaml_keeps_the_convergence_fields(tmp_path):
    """study.yaml, the spec as rendered, loads back as the same spec."""
    out = tmp_path / "study"
    study, r = rendered(write_spec(tmp_path))
    render.write(r, out)
    again = study_spec.load(out / "study.yaml")
    assert again.spec.optimizers == study.spec.optimizers and again.spec.kind == "convergence"
    assert [p.id for p in again.points] == [p.id for p in study.points]


# ---- through the CLI -------------------------------------------------------------------------------
def test_cli_dry_run_prints_every_script(tmp_path):
    path = write_spec(tmp_path, site="generic-pbs")
    proc = ok(run_cli("study", "render", path, "--dry-run"))
    study = study_spec.load(path)
    headers = re.findall(r"^==> (\S+) <==\n(.*)$", proc.stdout, re.M)
    assert [h for h, _ in headers] == [f"points/{p.id}/job.pbs" for p in study.points]
    assert all(first == "#!/bin/bash" for _, first in headers)
    assert proc.stdout.count("\n# convergence: optimizer ") == 12
    assert proc.stdout.rstrip().endswith("# 12 point(s) for pbs (generic-pbs); nothing written (--dry-run)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_cli_render_writes_the_study(tmp_path):
    out = tmp_path / "study"
    proc = ok(run_cli("study", "render", write_spec(tmp_path), "--out", out))
    assert proc.stdout.strip() == (
        f"wrote 12 slurm script(s) for generic-slurm to {out} (2 optimizer(s) x 3 global batches x their LRs "
        f"x 1 repeat(s) on 1 node(s), 2 ranks/node, preset generic); next: knl-train study submit {out}")
    assert Manifest.load(out).kind == "convergence"


@pytest.mark.parametrize("fields, drop, words", [
    ({"global_batches": [256, 320]}, (), "global_batches: 320 cannot be made of"),
    ({"optimizers": {"a/b": {"lr": [1]}}}, (), "optimizers: label 'a/b'"),
    ({"optimizers": {"lars": {"set": "optimizer.name=lars", "lr": [1]}}}, (), "optimizers.lars: set must be a mapping"),
    ({"optimizers": {"lars": {"set": {"epochs": 3}, "lr": [1]}}}, (), "optimizers.lars.set: epochs is set per point"),
    ({"train": {"config": str(ROOT / "jobs" / "train" / "demo.yaml"), "set": {"global_batch": 512}}}, (),
     "train.set: global_batch is set per point"),
    ({"target_top1": 80}, (), "target_top1 is a fraction of 1"),
    ({"nodes": [1, 2]}, (), "nodes: a convergence study runs on one node count"),
    ({}, ("epochs",), "'epochs' is required"),
])
def test_cli_bad_spec_is_one_clean_line(tmp_path, fields, drop, words):
    out = tmp_path / "study"
    proc = run_cli("study", "render", write_spec(tmp_path, drop, **fields), "--out", out)
    assert proc.returncode == 2, f"{proc.stdout}\n{proc.stderr}"
    assert proc.stderr.startswith("knl-train: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert words in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


# ---- the shipped miniature -------------------------------------------------------------------------
def test_shipped_large_batch_study_renders_for_this_node():
    """jobs/studies/large-batch-mini.yaml (the benchmark's study): 2 optimizers x 5 batches x 3 LRs,
    16 x B0 at the top with 16 accumulated micro-batches, each script launching through
    knl-train launch on 2 ranks."""
    study, r = rendered(ROOT / "jobs" / "studies" / "large-batch-mini.yaml")
    assert study.site.scheduler == "local" and len(study.points) == 30
    assert sorted({(p.global_batch, p.accumulation) for p in study.points}) == \
        [(16, 1), (32, 2), (64, 4), (128, 8), (256, 16)]
    by_opt = {p.optimizer: set() for p in study.points}
    for p in study.points:
        by_opt[p.optimizer].add(p.lr)
    assert by_opt == {"sgd-goyal": {0.1, 0.2, 0.4}, "lars": {2.0, 4.0, 8.0}}
    text = r.files[f"points/{study.points[-1].id}/job.sh"]
    assert '"$KT" launch -np 2 ' in text and "--set schedule.scaling=sqrt" in text
    assert "--set horovod.backward_passes_per_step=16" in text and "--set schedule.reference_batch=16" in text


def test_script_names_are_the_backends():
    # render keeps a literal list, so importing the studies does not import every backend.
    assert sorted(render.SCRIPTS) == sorted(f"/{schedulers.get(n).script_name}" for n in schedulers.BACKENDS)
