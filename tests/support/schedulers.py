"""For the scheduler backend tests (tests/unit/studies/schedulers): fake scheduler commands and
known-good job scripts.

The fakes are small executables written into a private bin/ that replay recorded or modelled
output (sbatch, squeue, sacct, qsub) or answer from the qstat JSON fixture (qstat), and log their
argv so tests can check the exact command lines. The qstat fixture is modelled on the documented
OpenPBS format (tests/fixtures/schedulers/README.md). ``SLURM_OK`` and ``PBS_OK`` are scripts
that pass the checkers; the checker tests break them one line at a time.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from tests.support import FIXTURES

QSTAT_JSON = FIXTURES / "schedulers" / "qstat_xf_json.json"

REPLAY = """\
#!{python}
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
name = os.path.basename(sys.argv[0])
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": [name] + sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
responses = json.load(open(os.path.join(here, name + ".json")))
counter = os.path.join(here, name + ".count")
n = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "w").write(str(n + 1))
r = responses[min(n, len(responses) - 1)]
time.sleep(r.get("sleep", 0))
sys.stdout.write(r.get("stdout", ""))
sys.stderr.write(r.get("stderr", ""))
sys.exit(r.get("rc", 0))
"""

# Prints the requested jobs of the fixture; unknown ids go to stderr with exit 153. With
# qstat.mode = "nothing", any unknown id suppresses the JSON (the worst case for batching).
FAKE_QSTAT = """\
#!{python}
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": ["qstat"] + sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
data = json.load(open({fixture!r}))
ids = [a for a in sys.argv[1:] if not a.startswith("-") and a != "json"]
mode_file = os.path.join(here, "qstat.mode")
mode = open(mode_file).read().strip() if os.path.exists(mode_file) else "partial"
jobs = {{i: data["Jobs"][i] for i in ids if i in data["Jobs"]}}
unknown = [i for i in ids if i not in data["Jobs"]]
for i in unknown:
    sys.stderr.write("qstat: Unknown Job Id " + i + "\\n")
if jobs and not (unknown and mode == "nothing"):
    out = {{k: data[k] for k in ("timestamp", "pbs_version", "pbs_server")}}
    out["Jobs"] = jobs
    sys.stdout.write(json.dumps(out, indent=4) + "\\n")
sys.exit(153 if unknown else 0)
"""


class Fakes:
    """A bin directory of fake commands and the log of their calls."""

    def __init__(self, root: Path):
        self.bin = root / "bin"
        self.bin.mkdir()
        self.env = {"PATH": str(self.bin)}

    def add(self, name, *responses):
        """A command replaying ``responses`` (stdout, stderr, rc, sleep); the last one repeats."""
        (self.bin / f"{name}.json").write_text(json.dumps(list(responses)))
        self._write(name, REPLAY.format(python=sys.executable))

    def add_qstat(self, mode="partial"):
        self._write("qstat", FAKE_QSTAT.format(python=sys.executable,
                                               fixture=str(QSTAT_JSON)))
        (self.bin / "qstat.mode").write_text(mode)

    def _write(self, name, text):
        path = self.bin / name
        path.write_text(text)
        path.chmod(0o755)

    def calls(self, name=None):
        log = self.bin / "calls.jsonl"
        if not log.exists():
            return []
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return [c["argv"] for c in calls if name is None or c["argv"][0] == name]


SLURM_OK = textwrap.dedent("""\
    #!/bin/bash
    #SBATCH --job-name=scal_n0002
    #SBATCH --nodes=2
    #SBATCH --ntasks-per-node=2
    #SBATCH --cpus-per-task=20
    #SBATCH --exclusive
    #SBATCH --time=01:00:00
    #SBATCH --comment=tok-1

    export OMP_NUM_THREADS=20
    exec srun --mpi=pmix --cpus-per-task=$SLURM_CPUS_PER_TASK \\
        --cpu-bind=cores python -c 'print(1)'
    """)


PBS_OK = textwrap.dedent("""\
    #!/bin/bash
    #PBS -N scal_n0002
    #PBS -l select=2:ncpus=40:mpiprocs=2:ompthreads=20
    #PBS -l place=scatter:excl
    #PBS -l walltime=01:00:00
    #PBS -q workq -A proj01
    #PBS -j oe

    cd "$PBS_O_WORKDIR"
    export OMP_NUM_THREADS=20
    mpiexec -n 4 --ppn 2 knl-train train --config train.yaml
    """)
