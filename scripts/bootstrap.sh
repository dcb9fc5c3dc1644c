#!/usr/bin/env bash
# Idempotent bootstrap of the knl-train environment into .venv/ (make env).
#
# Order matters: MPI first (Horovod links against it), then TensorFlow, then Horovod built
# from source against that exact TF (its ABI check refuses any other), then this package.
# The Horovod wheel is cached per (Horovod, TF, Python, MPI) outside the checkout, so a
# fresh clone on the same machine installs it in seconds instead of rebuilding.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${KNL_TRAIN_VENV:-$ROOT/.venv}
CACHE=${KNL_TRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/knl-train}
STAMP=$VENV/.knl-env-stamp
# Path of the fused LARS op once built (empty/absent: not built; LARS runs its pure-TF path).
KERNEL_STAMP=$VENV/.knl-kernel-stamp
KERNEL_SRC=$ROOT/knl_train/optim/kernels
HOROVOD_VERSION=0.28.1
# Extras installed into the development environment (see setup.cfg).
EXTRAS=${KNL_TRAIN_EXTRAS:-test,plot}

say() { printf '[make env] %s\n' "$*"; }
die() { printf '[make env] error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" = 0 ]; }
have() { command -v "$1" >/dev/null 2>&1; }

fingerprint() {
    # Anything that changes what gets installed invalidates the stamp.
    { cat "$ROOT/setup.cfg" "$ROOT/scripts/bootstrap.sh" "$KERNEL_SRC/lars_fused.cc" \
          "$KERNEL_SRC/build.py"; echo "$EXTRAS";
      command -v mpicc || true; command -v mpirun || true; } | sha256sum | cut -d' ' -f1
}

# ---- fast path: nothing to do ------------------------------------------------------------
up_to_date() {
    # A fused LARS op that was built and has since been deleted counts as work to do.
    [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ] && have mpirun && have mpicc \
        && [ "$(cat "$STAMP")" = "$(fingerprint)" ] \
        && { [ ! -s "$KERNEL_STAMP" ] || [ -f "$(cat "$KERNEL_STAMP")" ]; }
}
if [ "${1:-}" = "--check" ]; then
    # Report only: exit 0 when up to date, 1 when 'make env' has work to do.
    if up_to_date; then say "environment is up to date ($VENV)"; exit 0; fi
    say "environment needs 'make env' ($VENV)"; exit 1
fi
# ---- Slurm for the scheduler tests (tests/support/slurm_cluster.py) -----------------------
# Runs even on the fast path (Slurm is not part of the stamp), so it must cost nothing once
# Slurm is there. Only root with apt installs it; elsewhere the Slurm tests are skipped.
have_slurm() {
    local t
    for t in slurmctld slurmd sbatch; do
        # /usr/sbin is often not on a non-root PATH, and the daemons live there.
        have "$t" || [ -x "/usr/sbin/$t" ] || return 1
    done
}
ensure_slurm() {
    have_slurm && return 0
    is_root && have apt-get || return 0
    local rcd=/usr/sbin/policy-rc.d pkgs=(slurmctld slurmd slurm-client) ok=0
    say "installing Slurm with apt for the scheduler tests: ${pkgs[*]}"
    # Unconfigured daemons would fail to start on a systemd host; 101 = "not allowed".
    if [ ! -e "$rcd" ]; then
        trap "rm -f '$rcd'" EXIT
        printf '#!/bin/sh\nexit 101\n' > "$rcd"
        chmod +x "$rcd"
    else
        rcd=""
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Try the cached package lists first; update only if they do not know the packages.
    if apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 \
             && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1; }; then
        ok=1
    fi
    if [ -n "$rcd" ]; then rm -f "$rcd"; trap - EXIT; fi
    [ "$ok" = 1 ] || printf '[make env] warning: could not install Slurm with apt (offline?); the Slurm tests will be skipped\n' >&2
    return 0
}
ensure_slurm

if up_to_date; then
    say "environment is up to date ($VENV)"
    exit 0
fi

# ---- system packages: MPI and a compiler ---------------------------------------------------
APT_PKGS=()
if ! have mpicc || ! have mpirun; then
    APT_PKGS+=(openmpi-bin libopenmpi-dev numactl hwloc)
fi
have g++ || APT_PKGS+=(g++)
have make || APT_PKGS+=(make)
have git || APT_PKGS+=(git)
if [ "${#APT_PKGS[@]}" -gt 0 ]; then
    if is_root && have apt-get; then
        say "installing with apt: ${APT_PKGS[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${APT_PKGS[@]}" >/dev/null
    elif ! have mpicc || ! have mpirun; then
        die "no MPI found (mpicc and mpirun must be on PATH).
  On a cluster:        module load openmpi   (or your site's MPI module), then re-run 'make env'.
  On Debian/Ubuntu:    sudo apt-get install openmpi-bin libopenmpi-dev numactl hwloc
  Then re-run 'make env'."
    else
        die "missing build tools: ${APT_PKGS[*]}. Install them (e.g. sudo apt-get install ${APT_PKGS[*]}) and re-run 'make env'."
    fi
fi

# ---- Python 3.9-3.11 -----------------------------------------------------------------------
pick_python() {
    local c
    for c in ${PYTHON:-} python3.11 python3.10 python3.9 python3; do
        [ -n "$c" ] && have "$c" || continue
        if "$c" -c 'import sys; sys.exit(0 if (3, 9) <= sys.version_info[:2] <= (3, 11) else 1)'; then
            echo "$c"; return 0
        fi
    done
    return 1
}
if [ ! -x "$VENV/bin/python" ]; then
    PY=$(pick_python) || die "need Python 3.9, 3.10 or 3.11 (found: $(python3 --version 2>&1 || echo none)).
  TensorFlow 2.15 publishes no wheels for other versions. Install python3.11
  (e.g. 'apt-get install python3.11 python3.11-venv python3.11-dev' or pyenv) and re-run,
  or point PYTHON=/path/to/python3.11 at one."
    if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
        if is_root && have apt-get; then
            apt-get install -y -qq --no-install-recommends python3-venv python3-dev >/dev/null
        else
            die "$PY cannot create virtual environments: install python3-venv and python3-dev."
        fi
    fi
    say "creating $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
"$VPY" -c 'import sys; sys.exit(0 if (3, 9) <= sys.version_info[:2] <= (3, 11) else 1)' \
    || die "$VENV uses $("$VPY" --version); TF 2.15 needs 3.9-3.11. Remove $VENV and re-run."
HDR=$("$VPY" -c 'import sysconfig, os; print(os.path.join(sysconfig.get_paths()["include"], "Python.h"))')
if [ ! -f "$HDR" ]; then
    if is_root && have apt-get; then
        apt-get install -y -qq --no-install-recommends python3-dev >/dev/null
    else
        die "Python headers missing ($HDR): install python3-dev (Horovod compiles against them)."
    fi
fi

# TF 2.15 prints CUDA-factory "errors" and notices on every import on a CPU-only host.
export TF_CPP_MIN_LOG_LEVEL=3
PIP=("$VPY" -m pip --disable-pip-version-check -q)

# ---- the pinned stack, read from setup.cfg so the pins live in one place -------------------
mapfile -t REQS < <("$VPY" - "$ROOT/setup.cfg" <<'PYEOF'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
for line in cfg["options"]["install_requires"].splitlines():
    line = line.strip()
    if line and not line.startswith("#") and not line.startswith("horovod"):
        print(line)
PYEOF
)
say "installing the pinned stack (tensorflow, mpi4py, ...)"
"${PIP[@]}" install "setuptools>=65" wheel "cmake>=3.13,<4" "${REQS[@]}"

# ---- Horovod, built against this TF and MPI, cached as a wheel ------------------------------
TF_VERSION=$("$VPY" -c 'import importlib.metadata as m; print(m.version("tensorflow"))')
PY_TAG=$("$VPY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
MPI_ID=$( { mpicc -showme:version 2>/dev/null || mpicc --version 2>/dev/null | head -1; command -v mpicc; } | sha256sum | cut -c1-12)
KEY=horovod-$HOROVOD_VERSION-tf$TF_VERSION-$PY_TAG-mpi$MPI_ID
WHEELDIR=$CACHE/wheels/$KEY

hvd_ok() {
    "$VPY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as m, sys
if m.version("horovod") != "0.28.1":
    sys.exit(1)
import horovod.tensorflow as hvd
sys.exit(0 if (hvd.mpi_built() and hvd.gloo_built()) else 1)
PYEOF
}

if ! hvd_ok; then
    if ! ls "$WHEELDIR"/horovod-*.whl >/dev/null 2>&1; then
        say "building Horovod $HOROVOD_VERSION against TF $TF_VERSION with MPI and Gloo (about 5 minutes on 2 cores)"
        mkdir -p "$CACHE/wheels"
        TMPW=$(mktemp -d "$CACHE/wheels/.build-XXXXXX")
        trap 'rm -rf "$TMPW"' EXIT
        HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
        CMAKE_POLICY_VERSION_MINIMUM=3.5 \
        MAKEFLAGS="-j$(nproc)" \
        PATH="$VENV/bin:$PATH" \
            "${PIP[@]}" wheel --no-deps --no-build-isolation --no-cache-dir \
            -w "$TMPW" "horovod==$HOROVOD_VERSION" > "$TMPW/build.log" 2>&1 \
            || { tail -40 "$TMPW/build.log" >&2; die "Horovod build failed (log above)."; }
        rm -rf "$WHEELDIR"
        mkdir -p "$WHEELDIR"
        mv "$TMPW"/horovod-*.whl "$WHEELDIR"/
    else
        say "reusing cached Horovod wheel ($WHEELDIR)"
    fi
    "${PIP[@]}" install --force-reinstall --no-deps "$WHEELDIR"/horovod-*.whl
    "${PIP[@]}" install cloudpickle psutil pyyaml packaging cffi
fi

# ---- ITEX, beside the venv so that runs opt in (KNL_TRAIN_ITEX=1; knl_train/runtime/itex.py) ----
# Pins come from setup.cfg's [itex] extra: the ITEX package goes to the side directory with its
# CPU library (same version + ".0", the CPU build suffix); its other pins go into the venv.
ITEX_DIR=$VENV/opt/itex/site-packages
mapfile -t ITEX_REQS < <("$VPY" - "$ROOT/setup.cfg" <<'PYEOF'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
for line in cfg["options.extras_require"]["itex"].splitlines():
    line = line.strip()
    if line and not line.startswith("#"):
        print(line)
PYEOF
)
ITEX_VERSION=""
ITEX_DEPS=()
for req in "${ITEX_REQS[@]}"; do
    case "$req" in
        intel-extension-for-tensorflow*) ITEX_VERSION=${req##*==} ;;
        *) ITEX_DEPS+=("$req") ;;
    esac
done
if [ -n "$ITEX_VERSION" ] && [ "${KNL_TRAIN_SKIP_ITEX:-0}" != 1 ]; then
    if ! ls -d "$ITEX_DIR/intel_extension_for_tensorflow-$ITEX_VERSION.dist-info" >/dev/null 2>&1; then
        say "installing ITEX $ITEX_VERSION (CPU) into $ITEX_DIR (off unless KNL_TRAIN_ITEX=1)"
        "${PIP[@]}" install "${ITEX_DEPS[@]}"
        rm -rf "$ITEX_DIR.tmp"
        "${PIP[@]}" install --no-deps --target "$ITEX_DIR.tmp" \
            "intel-extension-for-tensorflow==$ITEX_VERSION" \
            "intel-extension-for-tensorflow-lib==$ITEX_VERSION.0"
        rm -rf "$ITEX_DIR"
        mv "$ITEX_DIR.tmp" "$ITEX_DIR"
    fi
fi

# ---- this package ----------------------------------------------------------------------------
say "installing knl-train (editable) with extras [$EXTRAS]"
"${PIP[@]}" install --no-build-isolation -e "$ROOT[$EXTRAS]"

# ---- verify: Horovod must have TF, MPI and Gloo, or every later failure is a mystery ---------
"$VPY" - <<'PYEOF' || die "Horovod is not usable (see above). Remove $CACHE/wheels and .venv, then re-run 'make env'."
import horovod.tensorflow as hvd
missing = [n for n, ok in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if not ok]
if missing:
    raise SystemExit(f"Horovod was built without {', '.join(missing)}")
print("[make env] Horovod OK: TensorFlow, MPI and Gloo controllers built")
PYEOF

# ---- the fused LARS op (knl_train/optim/kernels), compiled against this TF -----------------
# Optional: without it LARS runs its pure-TF path (same formulas, slower optimizer step).
# build.py returns at once when the library for this TF exists and is current.
rm -f "$KERNEL_STAMP"
if ! "$VPY" -m knl_train.optim.kernels.build --stamp "$KERNEL_STAMP"; then
    printf '[make env] warning: the fused LARS kernel did not build (see above); LARS will use its slower pure-TF path\n' >&2
fi

fingerprint > "$STAMP"
say "done: $VENV"
