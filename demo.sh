#!/usr/bin/env bash
# The demo on a fresh machine: set up .venv, build a tiny model locally (no downloads), and train it
# on the bundled data with the fastest backend available. A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ -n "${OVERNIGHT_DEMO_SKIP_INSTALL:-}" ]; then
  :  # the test suite runs the demo inside an environment CI already installed
elif [ "$(uname -s)" = "Darwin" ]; then
  .venv/bin/pip install -q -e ".[mlx,dev]"
else
  # torch==2.13.0 first: where a local CPU build is offered it is taken, never a CUDA download.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[mlx,cuda,dev]" "torch==2.13.0"
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f runs/tiny-model/config.json ] || .venv/bin/overnight tiny-model runs/tiny-model
.venv/bin/overnight train configs/tiny.yaml --fresh "$@"
echo
echo "progress and metrics: runs/demo/metrics.jsonl   status: .venv/bin/overnight status runs/demo"
echo "checkpoints: .venv/bin/overnight checkpoints runs/demo   predictions: runs/demo/predictions.jsonl"
