"""Study rendering (knl_train.studies.render) and ``knl-train study render / check``.

Job scripts per scheduler, golden renders, hostile names, the study directory (never half
written), user templates, the installed package, 2048-node studies and manifest.json.

Golden files live in tests/fixtures/studies/golden/<study>/<point>.<sbatch|pbs>, with the one
volatile token normalised. After an intended template change rewrite them, then review the diff:

    KNL_TRAIN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/studies/test_render.py -k golden
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from knl_train.errors import UserError
from knl_train import resources
from knl_train.studies import manifest as study_manifest, render, schedulers
from knl_train.studies import spec as study_spec
from knl_train.studies.schedulers import pbs, slurm
from tests.support import FIXTURES, ROOT, clean_env, ok, run_cli, write_study_spec as write_spec

STUDIES = ROOT / "jobs" / "studies"
TRAIN = ROOT / "jobs" / "train"
GOLDEN = FIXTURES / "studies" / "golden"
UPDATE_GOLDEN = os.environ.get("KNL_TRAIN_UPDATE_GOLDEN") == "1"
HOSTILE = 'a"; rm -rf ~; "'
TOKEN = re.compile(r"--comment=knl-train:\d{8}T\d{6}-[0-9a-f]{6}:(n\d{4,})")


# ---- helpers -----------------------------------------------------------------------------------
def rendered(path):
    study = study_spec.load(path)
    return study, render.render(study, command="knl-train")


def scripts(r: render.Rendered) -> dict:
    """{point id: script text}, in point order."""
    return {rel.split("/")[1]: text for rel, text in r.files.items() if rel.endswith((".sbatch", ".pbs"))}


def launcher_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if '"$KT" exec' in ln]
    assert len(lines) == 1, lines
    return lines[0]


def srun_options(text: str) -> dict:
    """srun's own options on the launcher line, as {--name: value}."""
    words = shlex.split(launcher_line(text))
    assert words[0] == "srun", words
    opts = slurm.srun_options(words[1:])
    assert opts, words
    return dict(o.split("=", 1) if "=" in o else (o, None) for o in opts)


def sbatch_lines(text: str):
    return [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]


def nominal_plan(preset_name: str, memory_mode: str = "cache", ranks_per_node: int = 0):
    """The tuning plan for a preset's nominal node, built here without the study code."""
    from knl_train.tuning import plan as tuning_plan, preset as presets, topology
    n = presets.load(preset_name).node
    topo = topology.synthetic(n.model_name, n.vendor, n.flags, n.sockets, n.cores_per_socket,
                              n.threads_per_core, memory_gb=n.memory_gb, mcdram_gb=n.mcdram_gb,
                              memory_mode=memory_mode)
    return tuning_plan.node_plan(preset_name, ranks_per_node, topology=topo)


def snapshot(path: Path) -> dict:
    """{relative path: bytes} of every file under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}



def clean_error(proc, *words):
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr.startswith("knl-train: error:") and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def custom_template(directory: Path, marker: str = "# my-site-template") -> Path:
    """The shipped slurm.sbatch.j2 (which includes the shipped _body.sh.j2) with a marker line."""
    directory.mkdir(parents=True, exist_ok=True)
    shipped = (resources.jobs_dir("templates") / "slurm.sbatch.j2").read_text()
    assert '{% include "_body.sh.j2" %}' in shipped
    first, rest = shipped.split("\n", 1)
    (directory / "slurm.sbatch.j2").write_text(f"{first}\n{marker}\n{rest}")
    return directory


# ---- Slurm: srun binding from the preset, directives ---------------------------------------------------
def test_skx_srun_binding_from_the_preset():
    _, r = rendered(STUDIES / "resnet50-skx-strong.yaml")
    plan = nominal_plan("skx-8160")
    assert (plan.ranks_per_node, plan.cpus_per_task) == (2, 48)
    from knl_train.tuning.launchers import cpu_masks
    masks = cpu_masks(plan)
    assert masks == "0xc00000000000ffffff,0xc00000000000ffffff000000"  # CPUs 0-23,70-71 / 24-47,94-95
    assert len(scripts(r)) == 7
    for pid, text in scripts(r).items():
        nodes = int(pid[1:])
        opts = srun_options(text)
        assert opts["--cpus-per-task"] == "48"
        assert opts["--cpu-bind"] == f"mask_cpu:{masks}"
        assert (opts["--nodes"], opts["--ntasks"], opts["--ntasks-per-node"]) == (str(nodes), str(2 * nodes), "2")
        assert opts["--mpi"] == "pmix"
        directives = sbatch_lines(text)
        assert not any("cpu-bind" in d or "cpu_bind" in d for d in directives)
        assert "#SBATCH --cpus-per-task=48" in directives and f"#SBATCH --nodes={nodes}" in directives
        assert "#SBATCH --array=0-2" in directives and "#SBATCH --exclusive" in directives
        assert not any(ln.startswith("#PBS") for ln in text.splitlines())
        assert slurm.Slurm().check(text) == []


@pytest.mark.parametrize("mode", ["cache", "flat"])
def test_cori_knl_constraint_and_numactl(tmp_path, mode):
    _, r = rendered(write_spec(tmp_path, site="cori-knl", memory_mode=mode))
    from knl_train.tuning.launchers import cpu_masks
    plan = nominal_plan("knl-7250", mode)
    for text in scripts(r).values():
        assert f"#SBATCH --constraint=knl,quad,{mode}" in sbatch_lines(text)
        opts = srun_options(text)
        assert opts["--cpus-per-task"] == str(plan.cpus_per_task) == "68"
        assert opts["--cpu-bind"] == f"mask_cpu:{cpu_masks(plan)}"
        assert opts["--mpi"] == "pmi2"
        line = launcher_line(text)
        if mode == "flat":
            assert re.search(r' numactl --preferred=1 "\$KT" exec -- ', line)
        else:
            assert "numactl" not in line
        assert slurm.Slurm().check(text) == []


def test_stampede2_partitions_and_pinning():
    from knl_train.tuning.launchers import pin_domains
    study, r = rendered(STUDIES / "resnet50-knl-weak.yaml")
    texts = scripts(r)
    assert len(texts) == 12
    for pid, text in texts.items():
        nodes = int(pid[1:])
        want = "development" if nodes <= 16 else "normal" if nodes <= 256 else "large"
        assert f"#SBATCH --partition={want}" in sbatch_lines(text), pid
        assert launcher_line(text).lstrip().startswith('ibrun "$KT" exec -- ')
        assert f"export I_MPI_PIN_DOMAIN={shlex.quote(pin_domains(nominal_plan('knl-7250', 'cache', 1)))}" in text
        assert "#SBATCH --exclusive" not in text


def test_stampede2_flat_queue(tmp_path):
    _, r = rendered(write_spec(tmp_path, site="stampede2-knl", memory_mode="flat", nodes=[1, 24]))
    for text in scripts(r).values():
        assert "#SBATCH --partition=flat-quadrant" in sbatch_lines(text)
        assert 'ibrun numactl --preferred=1 "$KT" exec' in launcher_line(text)
    with pytest.raises(UserError, match=r"32-node point.*development.*normal.*large.*flat-quadrant"):
        rendered(write_spec(tmp_path, site="stampede2-knl", memory_mode="flat", nodes=[1, 32]))


# ---- PBS ------------------------------------------------------------------------------------------------------
def test_pbs_scripts():
    _, r = rendered(STUDIES / "alexnet-bn-pbs-weak.yaml")
    texts = scripts(r)
    assert list(texts) == [f"n{2 ** k:04d}" for k in range(10)]
    for pid, text in texts.items():
        nodes = int(pid[1:])
        opts = pbs.pbs_options(text)
        names = [v for _, k, v in opts if k == "N"]
        assert len(names) == 1 and len(names[0]) <= 15 and names[0][0].isalpha()
        res = {key: value for _, key, value in pbs.resources(text)}
        (chunk,) = pbs.parse_select(res["select"])
        assert chunk["count"] == str(nodes)
        assert int(chunk["mpiprocs"]) == 2 and int(chunk["ompthreads"]) == 48
        assert int(chunk["ncpus"]) == int(chunk["mpiprocs"]) * int(chunk["ompthreads"])
        assert res["place"] == "scatter:excl" and res["walltime"] == "00:30:00"
        assert ("q", "workq") in [(k, v) for _, k, v in opts] and ("A", "MY-PROJECT") in [(k, v) for _, k, v in opts]
        lines = text.splitlines()
        cd = lines.index('cd "$PBS_O_WORKDIR" || exit 1')
        mpirun = lines.index(launcher_line(text))
        assert cd < mpirun
        words = shlex.split(launcher_line(text))
        assert words[:3] == ["mpirun", "-np", str(2 * nodes)]
        assert '--hostfile "$PBS_NODEFILE"' in launcher_line(text)
        assert not any(ln.startswith("#SBATCH") for ln in lines)
        assert pbs.Pbs().check(text) == []


@pytest.mark.parametrize("name", ["9-a-very-long-study-name", HOSTILE])
def test_pbs_job_name_for_awkward_names(tmp_path, name):
    _, r = rendered(write_spec(tmp_path, name=name, site="generic-pbs", nodes={"start": 1, "max": 2048}))
    for pid, text in scripts(r).items():
        (n_line,) = [ln for ln in text.splitlines() if ln.startswith("#PBS -N ")]
        job = n_line.split(" ", 2)[2]
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,14}", job) and job.endswith(f"_n{int(pid[1:])}")
        assert pbs.Pbs().check(text) == []


# ---- the checkers: render enforces them, `study check` agrees -------------------------------------------
def test_study_check_on_rendered_scripts(tmp_path):
    files = []
    for name in ("alexnet-bn-pbs-weak", "resnet50-skx-strong", "resnet50-knl-weak"):
        out = tmp_path / name
        ok(run_cli("study", "render", STUDIES / f"{name}.yaml", "--out", out))
        found = sorted(out.glob("points/*/job.*"))
        assert found
        for f in found:
            kind = "pbs" if f.suffix == ".pbs" else "slurm"
            assert schedulers.get(kind).check(f.read_text()) == [], f
        files += found
    assert len(files) == 10 + 7 + 12
    proc = ok(run_cli("study", "check", *files))
    lines = proc.stdout.splitlines()
    assert len(lines) == len(files)
    for f, line in zip(files, lines):
        assert line == f"{f}: ok ({'pbs' if f.suffix == '.pbs' else 'slurm'})"


def test_study_check_finds_hand_made_mistakes(tmp_path):
    out = tmp_path / "skx"
    ok(run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--out", out))
    text = (out / "points" / "n0001" / "job.sbatch").read_text()
    broken = tmp_path / "broken.sbatch"
    broken.write_text(text.replace(" --cpus-per-task=48 ", " ").replace(
        "#SBATCH --exclusive\n", "#SBATCH --exclusive\n#SBATCH --cpu-bind=cores\n"))
    proc = run_cli("study", "check", broken)
    assert proc.returncode == 1
    assert "[srun-cpus-per-task]" in proc.stdout and "[cpu-bind-in-sbatch]" in proc.stdout

    out = tmp_path / "pbs"
    ok(run_cli("study", "render", STUDIES / "alexnet-bn-pbs-weak.yaml", "--out", out))
    text = (out / "points" / "n0004" / "job.pbs").read_text()
    broken = tmp_path / "broken.pbs"
    broken.write_text(text.replace('cd "$PBS_O_WORKDIR" || exit 1\n', "").replace(
        "#PBS -j oe\n", "#PBS -j oe\n#SBATCH --nodes=4\n"))
    proc = run_cli("study", "check", broken)
    assert proc.returncode == 1
    assert "[cd-workdir]" in proc.stdout and "[no-sbatch]" in proc.stdout


def test_render_enforces_the_checker(tmp_path):
    tpl = custom_template(tmp_path / "tpl", marker="#SBATCH --cpu-bind=cores")
    out = tmp_path / "study"
    proc = run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--templates", tpl, "--out", out)
    clean_error(proc, "n0001", "[cpu-bind-in-sbatch]")
    assert not out.exists()


# ---- golden renders ----------------------------------------------------------------------------------
def normalise(text: str, token: str) -> str:
    m = TOKEN.search(text)
    assert m and m.group(0) == f"--comment={token}", (m and m.group(0), token)
    text = TOKEN.sub(r"--comment=knl-train:<uid>:\1", text)
    return text.replace(str(ROOT), "<checkout>")


@pytest.mark.parametrize("name, points", [("alexnet-bn-pbs-weak", ("n0001", "n0512")),
                                          ("resnet50-skx-strong", ("n0001", "n0064"))])
def test_golden(name, points):
    """Rendered scripts equal the goldens (KNL_TRAIN_UPDATE_GOLDEN=1 rewrites them)."""
    study = study_spec.load(STUDIES / f"{name}.yaml")
    r = render.render(study, command="knl-train")
    assert study.points[-1].id == points[-1]
    tokens = {p.id: p.token for p in r.manifest.points}
    ext = "pbs" if study.site.scheduler == "pbs" else "sbatch"
    for pid in points:
        text = r.files[f"points/{pid}/job.{ext}"]
        if ext == "pbs":
            assert "knl-train:" not in text.split("\n# knl-train study")[0]  # PBS carries no token
            got = text.replace(str(ROOT), "<checkout>")
        else:
            got = normalise(text, tokens[pid])
        golden = GOLDEN / name / f"{pid}.{ext}"
        if UPDATE_GOLDEN:
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(got)
        assert golden.is_file(), f"{golden} missing: run with KNL_TRAIN_UPDATE_GOLDEN=1"
        assert got == golden.read_text(), f"{golden} differs (KNL_TRAIN_UPDATE_GOLDEN=1 rewrites it)"


def test_renders_differ_only_in_the_token():
    """Two renders of one study differ only in the --comment token (nothing else volatile)."""
    path = STUDIES / "resnet50-skx-strong.yaml"
    a, b = (render.render(study_spec.load(path), command="knl-train") for _ in range(2))
    assert a.manifest.uid != b.manifest.uid
    for rel in a.files:
        if rel.endswith(".sbatch"):
            assert a.files[rel] != b.files[rel]
            assert TOKEN.sub("T", a.files[rel]) == TOKEN.sub("T", b.files[rel])
        else:
            assert a.files[rel] == b.files[rel]


# ---- hostile names and values --------------------------------------------------------------------------
def test_hostile_name_renders_harmlessly(tmp_path):
    out = tmp_path / "study"
    ok(run_cli("study", "render", write_spec(tmp_path, name=HOSTILE), "--out", out))
    quoted = shlex.quote(HOSTILE)
    texts = {p: p.read_text() for p in sorted(out.glob("points/*/job.sbatch"))}
    assert len(texts) == 2
    for path, text in texts.items():
        (name_line,) = [ln for ln in sbatch_lines(text) if ln.startswith("#SBATCH --job-name=")]
        assert re.fullmatch(r"#SBATCH --job-name=a_rm_rf_n[12]", name_line)
        hits = [ln for ln in text.splitlines() if "rm -rf" in ln or HOSTILE in ln]
        assert hits and all(ln.startswith("# ") and quoted in ln for ln in hits), hits
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr

    # Run n0001 for real with the launcher replaced by `true`, in a HOME with a canary in it.
    point = out / "points" / "n0001"
    lines = texts[point / "job.sbatch"].splitlines(keepends=True)
    replaced = ["    true || status=$?\n" if '"$KT" exec' in ln else ln for ln in lines]
    assert sum(a != b for a, b in zip(lines, replaced)) == 1
    copy = tmp_path / "job-without-launcher.sh"
    copy.write_text("".join(replaced))
    home = tmp_path / "home"
    home.mkdir()
    (home / "canary").write_text("alive")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "SLURM_SUBMIT_DIR": str(point),
           "SLURM_JOB_ID": "4242"}
    proc = subprocess.run(["bash", str(copy)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "knl-train study: point n0001, repeat 0, job 4242" in proc.stdout
    assert (home / "canary").read_text() == "alive"
    record = json.loads((point / "job-4242.json").read_text())
    assert (record["job_id"], record["state"], record["exit_code"], record["repeats"]) == ("4242", "finished", 0, "0")
    assert record["end"] is not None
    assert not list(point.glob("job-4242.json.*"))    # the atomic write left no temp file


def test_hostile_name_in_pbs_script(tmp_path):
    _, r = rendered(write_spec(tmp_path, name=HOSTILE, site="generic-pbs"))
    for text in scripts(r).values():
        assert re.search(r"^#PBS -N a_rm_rf_n[12]$", text, re.M)
        hits = [ln for ln in text.splitlines() if "rm -rf" in ln]
        assert hits and all(ln.startswith("# ") and shlex.quote(HOSTILE) in ln for ln in hits)
        proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("field, value", [("account", "x; rm -rf ~"), ("queue", "debug queue"),
                                          ("constraints", ['knl,"quad'])])
def test_unsafe_values_refused_before_writing(tmp_path, field, value):
    out = tmp_path / "study"
    proc = run_cli("study", "render", write_spec(tmp_path, **{field: value}), "--out", out)
    clean_error(proc, f"{field}:", "cannot carry safely")
    assert not out.exists()


def test_name_with_newline_refused(tmp_path):
    out = tmp_path / "study"
    proc = run_cli("study", "render", write_spec(tmp_path, name="a\n#SBATCH --uid=0"), "--out", out)
    clean_error(proc, "name must be 1-200 printable characters on one line")
    assert not out.exists()


# ---- the study directory: whole or not at all -------------------------------------------------------------
def test_existing_out_is_refused_and_unchanged(tmp_path):
    out = tmp_path / "study"
    ok(run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--out", out))
    before = snapshot(out)
    proc = run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--out", out)
    clean_error(proc, "already exists", "--force")
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["study"]


def test_force_replaces_a_study_without_jobs(tmp_path):
    out = tmp_path / "study"
    ok(run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--out", out))
    uid = json.loads((out / "manifest.json").read_text())["uid"]
    (out / "stale.txt").write_text("from before")
    ok(run_cli("study", "render", STUDIES / "alexnet-bn-pbs-weak.yaml", "--out", out, "--force"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["uid"] != uid and m["scheduler"] == "pbs" and len(m["points"]) == 10
    assert not (out / "stale.txt").exists() and not list(out.glob("points/*/job.sbatch"))
    assert sorted(os.listdir(tmp_path)) == ["study"]   # no .study.* left over


def test_force_refused_once_a_job_was_submitted(tmp_path):
    out = tmp_path / "study"
    ok(run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--out", out))
    m = json.loads((out / "manifest.json").read_text())
    m["points"][2]["job"] = {"id": "12345", "state": "pending"}
    (out / "manifest.json").write_text(json.dumps(m))
    before = snapshot(out)
    proc = run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--out", out, "--force")
    clean_error(proc, "1 submitted job(s)", "--force will not replace")
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["study"]


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_force_refuses_a_path_that_is_not_a_study(tmp_path, kind):
    spec_path = write_spec(tmp_path)
    out = tmp_path / "project"
    if kind == "directory":
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
    else:
        out.write_text("precious")
    before = snapshot(out)
    proc = run_cli("study", "render", spec_path, "--out", out, "--force")
    clean_error(proc)
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["project", "s.yaml"]


@pytest.mark.parametrize("body, words", [
    ("{% if %}\n", "line 3"),
    ("{{ no_such_variable }}\n", "'no_such_variable' is undefined"),
])
def test_template_errors_leave_no_study_directory(tmp_path, body, words):
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "slurm.sbatch.j2").write_text("#!/bin/bash\n#SBATCH --job-name=x\n" + body)
    parent = tmp_path / "work"
    parent.mkdir()
    out = parent / "study"
    proc = run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--templates", tpl, "--out", out)
    clean_error(proc, "slurm.sbatch.j2", words)
    assert os.listdir(parent) == []


@pytest.mark.parametrize("files", [
    {"_body.sh.j2": "{% if %}\n"},                                   # the shipped sbatch includes it
    {"slurm.sbatch.j2": '#!/bin/bash\n#SBATCH --job-name=x\n{% include "site-extra.sh.j2" %}\n'},
])
def test_errors_in_included_templates_are_clean(tmp_path, files):
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    for name, text in files.items():
        (tpl / name).write_text(text)
    parent = tmp_path / "work"
    parent.mkdir()
    proc = run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--templates", tpl,
                   "--out", parent / "study")
    assert os.listdir(parent) == []
    clean_error(proc)


def test_out_that_cannot_be_created_is_a_clean_error(tmp_path):
    (tmp_path / "afile").write_text("in the way")
    proc = run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--out", tmp_path / "afile" / "study")
    assert (tmp_path / "afile").read_text() == "in the way"
    clean_error(proc, "afile")


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    study, r = rendered(STUDIES / "resnet50-skx-strong.yaml")
    parent = tmp_path / "work"
    parent.mkdir()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(study_manifest, "write_json_atomic", boom)
    with pytest.raises(OSError):
        render.write(r, parent / "study")
    assert os.listdir(parent) == []
    # With --force over a study without jobs, the old one stays whole.
    monkeypatch.undo()
    render.write(r, parent / "study")
    before = snapshot(parent / "study")
    monkeypatch.setattr(study_manifest, "write_json_atomic", boom)
    with pytest.raises(OSError):
        render.write(rendered(STUDIES / "alexnet-bn-pbs-weak.yaml")[1], parent / "study", force=True)
    assert snapshot(parent / "study") == before and os.listdir(parent) == ["study"]


def test_dry_run_writes_nothing_and_prints_every_script(tmp_path):
    out = tmp_path / "study"
    proc = ok(run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--dry-run", "--out", out))
    assert os.listdir(tmp_path) == []
    headers = re.findall(r"^==> (\S+) <==\n(.*)$", proc.stdout, re.M)
    assert [h for h, _ in headers] == [f"points/n{2 ** k:04d}/job.sbatch" for k in range(7)]
    assert all(first == "#!/bin/bash" for _, first in headers)
    assert proc.stdout.count("#SBATCH --job-name=resnet50_skx_strong_n") == 7
    assert "7 point(s) for slurm (skx-2s); nothing written (--dry-run)" in proc.stdout


def test_render_needs_out_or_dry_run():
    clean_error(run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml"), "--out", "--dry-run")


# ---- user templates ----------------------------------------------------------------------------------------
def test_templates_option(tmp_path):
    tpl = custom_template(tmp_path / "tpl")
    proc = ok(run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--templates", tpl, "--dry-run"))
    parts = proc.stdout.split("==> ")[1:]
    assert len(parts) == 7
    for part in parts:
        assert part.count("\n# my-site-template\n") == 1
        assert "record started null" in part and "srun --nodes=" in part    # the shipped body


def test_templates_key_in_spec(tmp_path):
    custom_template(tmp_path / "tpl")
    _, r = rendered(write_spec(tmp_path, templates="tpl"))          # relative to the spec
    assert all("\n# my-site-template\n" in t and "record started null" in t for t in scripts(r).values())
    # Templates the directory does not have still come from the package.
    _, r = rendered(write_spec(tmp_path, templates="tpl", site="generic-pbs"))
    assert all("my-site-template" not in t and "#PBS -l select=" in t for t in scripts(r).values())
    with pytest.raises(UserError, match="templates directory .*nodir does not exist"):
        rendered(write_spec(tmp_path, templates="nodir"))


# ---- the installed package ----------------------------------------------------------------------------------
def test_installed_package_finds_its_templates(tmp_path):
    """A wheel, unzipped outside the checkout, renders from its own package data."""
    src = tmp_path / "src"      # a copy of the sources: the build leaves nothing in the checkout
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "knl_train", src / "knl_train", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "jobs", src / "jobs", ignore=ignore)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("knl_train-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    for needed in ("templates/slurm.sbatch.j2", "templates/pbs.pbs.j2", "templates/_body.sh.j2",
                   "sites/skx-2s.yaml", "train/resnet50-synthetic.yaml"):
        assert f"knl_train/jobs/{needed}" in names
    work = tmp_path / "work"
    work.mkdir()
    data = yaml.safe_load((STUDIES / "resnet50-skx-strong.yaml").read_text())
    data["train"]["config"] = str(site / "knl_train" / "jobs" / "train" / "resnet50-synthetic.yaml")
    (work / "s.yaml").write_text(yaml.safe_dump(data))
    env = clean_env()
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", "import knl_train; from knl_train import resources; "
                           "print(knl_train.__file__); print(resources.jobs_dir('templates'))"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    module, templates = proc.stdout.split()
    assert Path(module) == site / "knl_train" / "__init__.py"
    assert Path(templates) == site / "knl_train" / "jobs" / "templates" and Path(templates).is_dir()
    proc = subprocess.run([sys.executable, "-m", "knl_train.cli", "study", "render", "s.yaml", "--dry-run"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"^==> (\S+) <==", proc.stdout, re.M)[-1] == "points/n0064/job.sbatch"
    assert os.listdir(work) == ["s.yaml"]


# ---- scale ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["stampede2-knl", "skx-2s", "generic-pbs"])
def test_2048_node_scripts_stay_small(tmp_path, site):
    if site == "stampede2-knl":
        path = STUDIES / "resnet50-knl-weak.yaml"
    else:
        path = write_spec(tmp_path, site=site, nodes={"start": 1, "factor": 2, "max": 2048})
    _, r = rendered(path)
    texts = scripts(r)
    assert len(texts) == 12
    small, big = texts["n0001"], texts["n2048"]
    longest = {k: max(t.splitlines(), key=len) for k, t in (("small", small), ("big", big))}
    assert len(longest["big"]) - len(longest["small"]) <= 8
    assert re.sub(r"\d+", "0", launcher_line(big)) == re.sub(r"\d+", "0", launcher_line(small))
    assert abs(len(big) - len(small)) < 100
    for line in big.splitlines():
        assert not re.search(r"(^|\s)(-H|--host|-host|--nodelist|-w)(\s|=|$)", line), line
    if site == "generic-pbs":
        words = launcher_line(big).split()
        assert words[0] == "mpirun" and words[words.index("--hostfile") + 1] == '"$PBS_NODEFILE"'
        assert "#PBS -l select=2048:ncpus=96:mpiprocs=2:ompthreads=48" in big


# ---- manifest.json -------------------------------------------------------------------------------------------
def test_manifest_weak_pbs(tmp_path):
    out = tmp_path / "study"
    ok(run_cli("study", "render", STUDIES / "alexnet-bn-pbs-weak.yaml", "--out", out))
    m = study_manifest.Manifest.load(out).to_dict()
    assert m == json.loads((out / "manifest.json").read_text())   # reads back to the same JSON
    assert (m["scheduler"], m["site"], m["launcher"], m["scaling"]) == ("pbs", "generic-pbs", "mpirun", "weak")
    assert (m["warmup_steps"], m["images_per_epoch"], m["project_epochs"], m["repeats"]) == (5, 1281167, 90, 2)
    assert [p["nodes"] for p in m["points"]] == [2 ** k for k in range(10)]
    for p in m["points"]:
        n = p["nodes"]
        assert p["id"] == f"n{n:04d}" and p["ranks"] == 2 * n
        assert (p["per_rank_batch"], p["global_batch"]) == (128, 256 * n)
        assert (p["steps"], p["walltime"], p["queue"]) == (50, "00:30:00", "workq")
        assert p["script"] == f"points/{p['id']}/job.pbs" and (out / p["script"]).is_file()
        assert p["run_dirs"] == [f"points/{p['id']}/run-0", f"points/{p['id']}/run-1"]
        assert p["job"] == {"id": None, "state": "rendered"}
    assert (out / "train.yaml").is_file() and yaml.safe_load((out / "study.yaml").read_text())["name"] == m["study"]


def test_manifest_strong_slurm_array(tmp_path):
    out = tmp_path / "study"
    ok(run_cli("study", "render", STUDIES / "resnet50-skx-strong.yaml", "--out", out))
    m = study_manifest.Manifest.load(out).to_dict()
    assert m == json.loads((out / "manifest.json").read_text())
    assert (m["scheduler"], m["scaling"], m["array"], m["warmup_steps"]) == ("slurm", "strong", True, 5)
    assert (m["images_per_epoch"], m["project_epochs"]) == (1281167, 90)
    for p in m["points"]:
        assert p["global_batch"] == 1024 and p["per_rank_batch"] == 1024 // p["ranks"]
        assert (p["ranks"], p["steps"], p["walltime"]) == (2 * p["nodes"], 40, "00:40:00")
        assert (out / p["script"]).is_file() and p["script"].endswith("/job.sbatch")
        assert p["run_dirs"] == [f"points/{p['id']}/run-{r}" for r in range(3)]
        assert p["job"] == {"id": None, "state": "rendered"}
        assert f"--comment={p['token']}" in (out / p["script"]).read_text()
    train = yaml.safe_load((out / "train.yaml").read_text())
    assert (train["global_batch"], train["per_rank_batch"], train["steps"]) == (None, None, None)
