"""What DoRA costs against LoRA, per backend, on the same small model and data (the README's DoRA table; a one-off
measurement, not run by CI):

    python bench/dora_cost.py OUT_DIR torch,mlx dora,lora,dora,lora

Each (backend, lora/dora) pair is one `overnight train` subprocess on the default path (4-bit base, dropout 0.05,
targets q,k,v,o of every block), batch 4, 16 steps; the step time is the median of steps 4..16's elapsed_s
deltas (no eval, no checkpoint in between) and the fastest of them (this machine is shared: the fastest is the
least disturbed), memory the run's largest memory_mb (torch: RSS on CPU; mlx: max of
active and RSS)."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from overnight.models.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
model = out / "model"
if not model.exists():
    build_tiny_model(model, seed=0, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512)
results = []
print("threads", os.cpu_count())
for backend in sys.argv[2].split(","):
    for dora in [x == "dora" for x in sys.argv[3].split(",")]:
        run = out / f"{backend}-{'dora' if dora else 'lora'}-{len(results)}"
        args = [sys.executable, "-m", "overnight", "train", "--backend", backend, "--model", str(model),
                "--data", str(ROOT / "data"), "--output", str(run), "--max-steps", "16", "--batch-size", "4",
                "--quiet", "--fresh", "--set", "lora.layers=-1", "--set", "model.max_seq_length=256",
                "--set", "eval.every_steps=1000", "--set", "checkpoint.every_steps=1000",
                "--set", "train.report_every=1", "--set", f"lora.use_dora={'true' if dora else 'false'}"]
        done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert done.returncode == 0, done.stderr[-2000:]
        rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["event"] == "train"]
        start = next(r for r in rows if r["event"] == "start")
        times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(train[2:], train[3:])]
        results.append({"backend": backend, "dora": dora, "step_s": statistics.median(times),
                        "fastest_step_s": min(times), "memory_mb": max(r["memory_mb"] for r in train), "trainable": start["trainable_params"],
                        "loss_16": train[-1]["loss"]})
        print(json.dumps(results[-1]), flush=True)
(out / "results.json").write_text(json.dumps(results, indent=1))
