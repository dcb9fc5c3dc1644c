"""Scaling and convergence studies: a YAML spec, job scripts rendered per point, submission,
tracking, reports.

A study directory (``knl-train study render SPEC --out DIR``)::

    DIR/manifest.json            what was rendered, and each point's job (written atomically)
    DIR/study.yaml               the spec as loaded
    DIR/train.yaml               the resolved training config (batch, steps, run_dir set per point)
    DIR/points/<id>/job.sbatch   or job.pbs, job.sh: one script per point (id: n0001, n0002, ...;
                                 a convergence study: lars-b004096-lr2-r0, ...)
    DIR/points/<id>/run-<r>/     repeat r's run directory: summary.json, metrics.jsonl
    DIR/points/<id>/job-<key>.json   the job's own record (sentinel): start, end, exit code
    DIR/results.json             study collect
    DIR/report/scaling.{csv,md,png}  study report (a scaling study)
    DIR/report/convergence.{csv,md,png}, convergence-curves.png   (a convergence study)

The stages, each a module: ``spec.load(path) -> Study``; ``render.render(study) -> Rendered``
and ``render.write(rendered, out)``; ``jobs.submit``, ``jobs.status``, ``jobs.wait``;
``report.collect(dir)`` and ``report.report(dir)`` (a convergence study's:
``accuracy.collect``, ``accuracy.table`` and ``accuracy_report.report``, charts in
``accuracy_charts.py``). They hand each other a ``Study``, then the
study directory's :class:`Manifest` (``manifest.py``); ``projection.py`` projects a point's
time for a full training from its runs' time accounts; ``walltime.py`` parses times, ``sites.py``
reads site profiles and ``schedulers/`` holds one backend per batch scheduler (``local``: this
node, with its queue in ``localqueue.py`` and its runner in ``localrunner.py``). Nothing here
imports TensorFlow.
"""

from knl_train.studies import jobs, manifest, render, report, schedulers, sites, spec, walltime
from knl_train.studies.jobs import PointStatus, Submission
from knl_train.studies.manifest import JobRecord, Manifest, PointRecord
from knl_train.studies.render import Rendered
from knl_train.studies.spec import Point, Study, StudySpec

__all__ = ["jobs", "manifest", "render", "report", "schedulers", "sites", "spec", "walltime",
           "JobRecord", "Manifest", "Point", "PointRecord", "PointStatus", "Rendered", "Study",
           "StudySpec", "Submission"]
