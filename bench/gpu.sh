#!/usr/bin/env bash
# The CUDA path measured in one command (bench/gpu.py says what each step measures):
#   bench/gpu.sh              on a fresh GPU machine with torch, transformers and peft: writes bench/results/<gpu>.json/.md
#   bench/gpu.sh --dry-run    the same steps on CPU at tiny sizes, into a temp folder (CI runs it)
#   a GPU session's exact calls: bench/README.md, "GPU session recipe"
# Wheels the machine lacks (bitsandbytes; liger-kernel for the model.loss_kernel=liger cuda tests; mlx[cuda] for the mlx step) are installed from WHEELS (default .whl/) when
# that folder holds any, without the network; overnight itself is linked in beside them if python cannot import it.
# PYTHON picks the interpreter (default: .venv/bin/python where there is one, else python3).
# --deadline-s counts from here: the wheel installs below take part of the device call's time.
export OVERNIGHT_GPU_STARTED="${OVERNIGHT_GPU_STARTED:-$(date +%s)}"
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/overnight-gpu-site}"
# Asked before SITE joins the path: a copy installed there by an earlier call on the same machine may be older than
# this tree, so it is replaced each time.
"$PY" -c "import overnight" 2>/dev/null && OWN=1 || OWN=0
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        || echo "warning: the wheels in $WHEELS did not all install; the steps that need them will say so" >&2
fi
if [ "$OWN" = 0 ]; then
    # overnight as links into this tree, as an editable install has it: a copied package would build the tests' tiny
    # model from its fallback corpus (src/models/tiny.py finds data/ beside src/), another vocabulary than CI's.
    rm -rf "$SITE/overnight" "$SITE"/overnight-*.dist-info && mkdir -p "$SITE/overnight" || exit 2
    for entry in "$PWD"/src/*; do ln -s "$entry" "$SITE/overnight/"; done
    ln -s "$PWD/backends" "$SITE/overnight/backends"
fi
[ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Each benchmark run trains in its own process (bench/run.py); a supervised child would hide the timers.
export OVERNIGHT_SUPERVISOR=off
exec "$PY" bench/gpu.py "$@"
