"""Scaling studies: a YAML spec, job scripts rendered per point, submission, tracking, reports.

A study directory (``knl-train study render SPEC --out DIR``)::

    DIR/manifest.json            what was rendered, and each point's job (written atomically)
    DIR/study.yaml               the spec as loaded
    DIR/train.yaml               the resolved training config (batch, steps, run_dir set per point)
    DIR/points/<id>/job.sbatch   or job.pbs: one script per point (id: n0001, n0002, ...)
    DIR/points/<id>/run-<r>/     repeat r's run directory: summary.json, metrics.jsonl
    DIR/points/<id>/job-<key>.json   the job's own record (sentinel): start, end, exit code
    DIR/results.json             study collect
    DIR/report/scaling.{csv,md,png}  study report
"""
