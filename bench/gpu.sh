#!/usr/bin/env bash
# The CUDA path measured in one command (bench/gpu.py says what each step measures):
#   bench/gpu.sh              on a fresh GPU machine with torch, transformers and peft: writes bench/results/<gpu>.json/.md
#   bench/gpu.sh --dry-run    the same steps on CPU at tiny sizes, into a temp folder (CI runs it)
# Wheels the machine lacks (bitsandbytes; liger-kernel for the model.loss_kernel=liger cuda tests; mlx[cuda] for the mlx step) are installed from WHEELS (default .whl/) when
# that folder holds any, without the network; overnight itself is installed beside them if python cannot import it.
# PYTHON picks the interpreter (default: .venv/bin/python where there is one, else python3).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/overnight-gpu-site}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        || echo "warning: the wheels in $WHEELS did not all install; the steps that need them will say so" >&2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import overnight" 2>/dev/null; then
    # --no-build-isolation: setuptools is already there, and nothing can be fetched on the GPU machine.
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . || exit 2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Each benchmark run trains in its own process (bench/run.py); a supervised child would hide the timers.
export OVERNIGHT_SUPERVISOR=off
exec "$PY" bench/gpu.py "$@"
