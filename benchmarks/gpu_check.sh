#!/usr/bin/env bash
# `make gpu-check`: the prepared GPU check (python -m benchmarks.gpu_check), here or on a bare GPU machine.
#
# With .venv (or VENV=path), its python runs the check; without a GPU that is a dry run of every part with
# tiny shapes. A bare GPU machine has no .venv but a python3 with torch: there the wheels of .gpu-wheels
# (made here by `make gpu-wheels`: uptrain, and datasets, dill and multiprocess, which that machine lacks)
# are installed first into a folder of their own on PYTHONPATH, leaving its own packages as they are. With
# neither (a fresh clone run directly, not through make), it says in one line what to run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
venv=${VENV:-.venv}
if [[ -x "$venv/bin/python" ]]; then
    exec "$venv/bin/python" -m benchmarks.gpu_check "$@"
fi
python=${PYTHON:-python3}
if ! "$python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" >/dev/null 2>&1; then
    echo "gpu-check: no $venv here and $python has no torch: run make gpu-check (it creates $venv first) or make setup, or set VENV or PYTHON to one with torch" >&2
    exit 2
fi
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
    site=${GPU_SITE:-/tmp/uptrain-gpu-site}
    if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .gpu-wheels/*.whl; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu-check: the wheels of .gpu-wheels did not install; going on with the installed packages" >&2
    fi
else
    echo "gpu-check: no .gpu-wheels here; going on with the installed packages (make gpu-wheels makes them)" >&2
fi
exec "$python" -m benchmarks.gpu_check "$@"
