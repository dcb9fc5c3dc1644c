"""Rendering scaling studies: how long a 1 -> 2048-node study takes to render (issue 7: "instantaneous").

    .venv/bin/python benchmarks/bench_render.py

Renders the shipped studies (jobs/studies/*.yaml: Stampede2 KNL 1-2048 nodes, Xeon 8160 strong
scaling, PBS Pro 1-512 nodes) and a 2048-point study (every node count 1..2048) in-process: spec
loading and validation, planning, templates, directive checks, and the write of the study
directory. Also records the longest script line for the smallest and the largest point: no line
may grow with the node count. Median of 5 runs each. Results: benchmarks/results/render.{json,md}.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import host, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REPEATS = 5


def measure(spec_path: Path) -> dict:
    from knl_train.studies import render, spec
    times, rendered = [], None
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            study = spec.load(spec_path)
            rendered = render.render(study, command="knl-train")
            render.write(rendered, Path(tmp) / "study")
            times.append(time.perf_counter() - t0)
    scripts = [t for k, t in rendered.files.items() if k.endswith((".sbatch", ".pbs"))]
    longest = [max(len(line) for line in s.splitlines()) for s in (scripts[0], scripts[-1])]
    pts = rendered.manifest.points
    return {"spec": spec_path.name, "points": len(pts), "nodes": f"{pts[0].nodes}-{pts[-1].nodes}",
            "scheduler": rendered.manifest.scheduler, "seconds_median": statistics.median(times),
            "seconds_min": min(times), "longest_line_first": longest[0], "longest_line_last": longest[1]}


def main() -> int:
    rows = [measure(p) for p in sorted((ROOT / "jobs" / "studies").glob("*.yaml"))]
    with tempfile.TemporaryDirectory() as tmp:
        every = Path(tmp) / "every-node-count.yaml"
        text = (ROOT / "jobs" / "studies" / "resnet50-knl-weak.yaml").read_text()
        text = text.replace("nodes: {start: 1, factor: 2, max: 2048}", f"nodes: {list(range(1, 2049))}")
        text = text.replace("config: ../train/", f"config: {ROOT / 'jobs' / 'train'}/")
        every.write_text(text)
        rows.append(measure(every))
    lines = ["| study | scheduler | points | nodes | render + write (s, median of 5) | longest line, first / last point |",
             "|---|---|---:|---|---:|---|"]
    lines += [f"| {r['spec']} | {r['scheduler']} | {r['points']} | {r['nodes']} | {r['seconds_median']:.3f} | "
              f"{r['longest_line_first']} / {r['longest_line_last']} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    write_results(RESULTS / "render.json", RESULTS / "render.md", {"host": host(), "rows": rows},
                  "# Rendering scaling studies\n\nCommand: `.venv/bin/python benchmarks/bench_render.py`\n\n"
                  + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
