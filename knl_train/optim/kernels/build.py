"""Compile the fused LARS op against the installed TensorFlow (``make env`` runs this).

    python -m knl_train.optim.kernels.build [--force] [--isa avx2|native|generic] [--check]
                                            [--stamp FILE]

Output: ``kernel_dir()/lars_fused-tf<version>.so`` plus its build record ``.json`` (source
hash, flags, required CPU features), both written under temporary names and renamed into
place, so a concurrent reader never sees a half-written library. Nothing is rebuilt when the
library exists, is not older than ``lars_fused.cc`` and was built from the same source by the
same version of this script. ``--stamp FILE`` writes the library's path to FILE once it is
built or up to date (``make env`` checks that file to notice a deleted library).

Instruction set. On x86-64 the default is AVX2 (``-mavx2 -mfma``: Haswell and later, Knights
Landing, Zen), which every node of a current cluster has; the loader refuses the library on
a CPU without these features, falling back to the pure-TF path instead of dying on SIGILL.
The build turns floating-point contraction off and the kernel fixes its summation order, so
the instruction set changes speed, not results: ``--isa native`` (AVX-512 on Skylake-X, KNL)
and ``--isa generic`` (SSE2) produce the same bits (checked for every variant and dtype when
this was written). ``native`` builds are for nodes of the building node's type only.
Elsewhere than x86-64 the compiler's default is used.

Exit status: 0 built or up to date, 1 on failure (the message says why; LARS then uses the
pure-TF path), 2 on bad usage. ``--check`` only reports: 0 up to date, 1 (re)build needed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import tensorflow as tf

from knl_train.optim import kernels
from knl_train.runtime.rankenv import RankEnv

# (compiler flags, CPU features the loader requires) per --isa choice on x86-64.
X86_ISA = {
    "avx2": (["-mavx2", "-mfma"], ["avx2", "fma"]),
    "native": (["-march=native"], None),  # None: the features of the building CPU
    "generic": ([], []),
}
# Contraction off: no fused multiply-add the source does not spell out, so every ISA rounds
# alike (see lars_fused.cc, "Determinism"). No -ffast-math for the same reason.
BASE_FLAGS = ["-O3", "-DNDEBUG", "-fPIC", "-shared", "-fvisibility=hidden", "-ffp-contract=off"]


def say(msg: str) -> None:
    print(f"[kernels] {msg}", flush=True)


def fail(msg: str) -> NoReturn:
    print(f"[kernels] error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def isa_flags(isa: str):
    """(flags, required CPU features) for this machine and choice."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return [] if isa != "native" else ["-mcpu=native"], []
    flags, required = X86_ISA[isa]
    if required is None:  # native: whatever this CPU has that the kernel may use
        have = kernels.cpu_flags() or set()
        required = sorted(have & {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                  "avx512dq", "avx512_bf16", "f16c", "bmi2"})
    return flags, required


def builder_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def up_to_date(library: Path) -> bool:
    sidecar = kernels.sidecar_path(library)
    if not (library.is_file() and sidecar.is_file()):
        return False
    if library.stat().st_mtime < kernels.SOURCE.stat().st_mtime:
        return False
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    return (record.get("source_sha256") == kernels.source_digest()
            and record.get("builder_sha256") == builder_digest())


def build(library: Path, isa: str, cxx: str) -> None:
    compiler = shutil.which(cxx)
    if compiler is None:
        fail(f"no C++ compiler {cxx!r} on PATH (install g++, or set CXX)")
    flags, required = isa_flags(isa)
    tf_lib_dir = Path(tf.sysconfig.get_lib())
    command = [compiler, *BASE_FLAGS, *flags, str(kernels.SOURCE), "-o", "{out}",
               *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags(),
               # Fail at build time, not at load time, on a symbol TF does not export.
               "-Wl,--no-undefined", f"-Wl,-rpath,{tf_lib_dir}"]
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=library.parent, prefix=f".{library.stem}-", suffix=".so")
    os.close(fd)
    tmp_json = tmp[:-3] + ".json"
    argv = [tmp if a == "{out}" else a for a in command]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
            fail(f"compiling {kernels.SOURCE.name} failed ({proc.returncode}):\n"
                 f"  {shlex.join(argv)}\n{tail}")
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True)
        record = {
            "tf_version": tf.__version__,
            "source": str(kernels.SOURCE),
            "source_sha256": kernels.source_digest(),
            "builder_sha256": builder_digest(),
            "compiler": version.stdout.splitlines()[0] if version.stdout else compiler,
            "command": [a for a in command if a != "{out}"],
            "isa": isa,
            "cpu_flags_required": required,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        Path(tmp_json).write_text(json.dumps(record, indent=1) + "\n")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide it from the other users of the venv
        # The library first, then its record: in between, a reader sees a record that does
        # not match and falls back, rather than an old library under a new record.
        os.replace(tmp, library)
        os.replace(tmp_json, kernels.sidecar_path(library))
    finally:
        for path in (tmp, tmp_json):
            if os.path.exists(path):
                os.unlink(path)
    say(f"built {library} ({isa}, {time.monotonic() - t0:.0f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m knl_train.optim.kernels.build",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--check", action="store_true",
                        help="only report: exit 0 if up to date, 1 if a build is needed")
    parser.add_argument("--isa", choices=sorted(X86_ISA), default=os.environ.get(
        RankEnv.var("kernel_isa"), "avx2"), help="instruction set on x86-64 (default avx2)")
    parser.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    parser.add_argument("--stamp", type=Path,
                        help="on success, write the library's path to this file")
    args = parser.parse_args(argv)
    if not kernels.SOURCE.is_file():
        fail(f"kernel source {kernels.SOURCE} is missing from this installation")
    library = kernels.library_path()
    if args.check:
        current = up_to_date(library)
        say(f"{library} is {'up to date' if current else 'missing or stale'}")
        return 0 if current else 1
    if args.force or not up_to_date(library):
        build(library, args.isa, args.cxx)
        kernels.reset()
        module, reason = kernels._load(library)
        if module is None:
            fail(f"the library was built but cannot be used: {reason}")
    else:
        say(f"{library} is up to date")
    if args.stamp is not None:
        args.stamp.write_text(f"{library}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
