"""Smoke test of the benchmark harness (bench/run.py): tiny model, 3 steps a side, one round, so the harness
cannot rot silently. The benchmark itself never runs in CI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, has

pytestmark = [pytest.mark.skipif(not has("torch", "transformers", "peft", "mlx", "mlx_lm"),
                                 reason="needs both backends"), pytest.mark.torch, pytest.mark.mlx]


def test_bench_writes_json_and_markdown_with_ratios(tiny_model_dir, tmp_path):
    out = tmp_path / "result"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--model", str(tiny_model_dir), "--steps", "3",
           "--warmup", "1", "--rounds", "1", "--bits", "0", "--seq", "64", "--batch-size", "2", "--rank", "4",
           "--alpha", "8", "--layers", "2", "--targets", "q_proj,v_proj", "--out", str(out),
           "--overnight-set", "eval.max_batches=1", "--overnight-set", "eval.predictions=1",
           "--overnight-set", "eval.max_new_tokens=2",
           # the grpo pair at its smallest shape
           "--backends", "torch,mlx,grpo", "--grpo-batch", "2", "--grpo-group", "2", "--new-tokens", "4",
           "--reps", "1", "--grpo-steps", "2", "--eval-prompts", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert {"cpu", "cores", "versions"} <= set(data["machine"])
    assert [s["backend"] for s in data["settings"]] == ["torch", "mlx", "grpo"]
    for setting in data["settings"][:2]:
        for key in ("speedup_steps_per_s", "peak_rss_ratio", "same_data_first_loss_rel_diff"):
            assert setting[key] > 0 or key == "same_data_first_loss_rel_diff", (key, setting[key])
        # Same model, same batches: the first step's loss (LoRA B = 0, the base model's) agrees across trainers.
        assert setting["same_data_first_loss_rel_diff"] < 1e-3
        ours = setting["sides"]["overnight"]
        assert 0 <= ours["overhead_measured"] < 1 and 0 <= ours["overhead_default_cadence"] < 1
        # The evaluation the config asks for is reported beside the overhead, never hidden: the two add up.
        assert 0 < ours["eval_share_default_cadence"] < 1
        assert ours["outside_step_default_cadence"] == pytest.approx(
            ours["overhead_default_cadence"] + ours["eval_share_default_cadence"])
        assert all(side["steps_per_s"] > 0 and side["peak_rss_mb"] > 0 for side in setting["sides"].values())
    # The grpo pair: overnight's sampler, the sampler it replaced (the same tokens) and transformers' generate each
    # draw every row's tokens; the real grpo run reports its step (one sampling call) and its eval.
    grpo = data["settings"][2]
    assert grpo["same_tokens_as_before"] is True and grpo["speedup_vs_reference"] > 0
    assert all(side["tokens_per_s"] > 0 for side in grpo["sides"].values())
    step = grpo["step"]
    assert step["step_s"] > 0 and step["sample_calls_per_step"] == 1 and step["eval_prompts"] == 2
    assert step["sampled_tokens_per_step"] > 0 and len(step["eval_s"]) == 1
    table = out.with_suffix(".md").read_text()
    assert "| torch | none | overnight |" in table and "HF Trainer + PEFT" in table and "mlx_lm.lora" in table
    assert "| none | overnight |" in table and "| none | transformers generate |" in table
    assert "bench/run.py --model" in table  # the command that produced it

    # --render re-derives the figures from the measured parts alone and gives the same table.
    rendered = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--render", str(out.with_suffix(".json"))],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert out.with_suffix(".md").read_text() == table

    # The compute dtype each trainer ran in is recorded and said (it was printed as "fp32 compute" whatever ran),
    # and a CUDA run's table carries the device's peak memory and the ratio of it, not only the host's RSS.
    assert {side["compute_dtype"] for side in data["settings"][0]["sides"].values()} == {"float32"}
    assert grpo["sides"]["overnight"]["compute_dtype"] == "float32"
    assert "float32 compute;" in table
    bench_run = _bench("run")
    on_gpu = json.loads(json.dumps(data))
    torch_pair = on_gpu["settings"][0]
    for side, mb in (("overnight", 1000.0), ("hf", 2000.0)):
        torch_pair["sides"][side].update(compute_dtype="bfloat16", peak_gpu_mb=mb)
    torch_pair["peak_gpu_ratio"] = 0.5
    on_gpu["settings"] = [torch_pair]
    gpu_table = bench_run.markdown(on_gpu)
    assert "bfloat16 compute;" in gpu_table and "| peak GPU MB |" in gpu_table and "GPU memory ratio" in gpu_table
    ours = next(line for line in gpu_table.splitlines() if line.startswith("| torch | none | overnight |"))
    assert "| 1000 |" in ours and "| 0.50 |" in ours
    header = next(line for line in gpu_table.splitlines() if line.startswith("| backend"))
    assert header.count("|") == ours.count("|") == gpu_table.splitlines()[gpu_table.splitlines().index(header) + 1].count("|")


def _bench(name: str):
    """A module of bench/ (scripts, not a package; gpu.py imports no ML framework at the top)."""
    import importlib

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _bench_flops():
    return _bench("flops")


def test_flop_ceiling_counts_the_head_and_the_backward_depth():
    per_token = _bench_flops().per_token
    config = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "vocab_size": 49152}
    # Every position a target and LoRA on every block: overnight does exactly the reference's matmuls.
    assert per_token(config, -1, 1.0)["ceiling_vs_reference"] == pytest.approx(1.0)
    assert per_token(config, -1, 1.0)["ceiling_vs_reference_4bit"] == pytest.approx(1.0)
    partial = per_token(config, 16, 0.198)
    # SmolLM2-135M, the bench's data: the head at 20% of positions is the whole exact saving.
    assert partial["ceiling_vs_reference"] == pytest.approx(1.261, abs=1e-3)
    assert partial["ceiling_vs_reference_4bit"] == pytest.approx(1.546, abs=1e-3)


def test_gpu_script_dry_run_writes_every_step_with_numbers(tmp_path):
    """bench/gpu.sh --dry-run: the GPU script's every step on CPU at tiny sizes (one short pair, the
    deterministic-off side, the cuda tests and the GPU resume test collected), so the script cannot rot before a GPU
    machine runs it."""
    out = tmp_path / "gpu"
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, timeout=420, cwd=ROOT,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    steps = data["steps"]
    # What the open issues need most first: a short GPU session reaches those before the rest.
    assert list(steps) == ["cuda_tests", "resume", "build", "llama8b_2x64", "llama8b_2x64_det_off", "grpo",
                           "llama8b_2x64_liger", "smollm2", "mlx_tests"]
    assert all(s["ok"] for s in steps.values()), {k: s.get("error") for k, s in steps.items()}
    assert steps["cuda_tests"]["collected"] >= 3 and steps["resume"]["collected"] == 1
    pair = steps["llama8b_2x64"]
    assert pair["same_data_first_loss_rel_diff"] < 1e-3 and pair["speedup_tokens_per_s"] > 0
    assert all(side["tokens_per_s"] > 0 and side["achieved_tflops"] > 0 for side in pair["sides"].values())
    assert steps["llama8b_2x64_det_off"]["tokens_per_s"] > 0
    grpo = steps["grpo"]
    assert grpo["same_tokens_as_before"] and all(v > 0 for v in grpo["sampler_tokens_per_s"].values()), grpo
    assert data["env"]["matmul_tflops_measured"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| llama8b_2x64 | 2 x 64 | overnight |" in table and "4 x the linear layers' parameters" in table
    # bench/run.py's own results are inside these two files: a device call brings back at most 8 files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json", "gpu.md"]
    assert pair["run"]["settings"][0]["backend"] == "torch" and grpo["run"]["settings"][0]["backend"] == "grpo"
    assert "## llama8b_2x64: bench/run.py's own table" in table and "| 4-bit | transformers generate |" in table


def _bench_gpu():
    return _bench("gpu")


def test_gpu_script_records_a_step_that_does_not_fit_before_the_deadline_as_not_run():
    """A step runs only if its budget fits in the time left, so the device call's own limit never cuts one off; a
    failed step and a skipped one are recorded, and a later step that still fits runs."""
    gpu = _bench_gpu()
    now, ran, records = [0.0], [], []

    def step(name, takes, fail=False):
        def fn(budget):
            ran.append((name, budget))
            now[0] += takes
            if fail:
                raise RuntimeError("boom")
            return {"figure": takes}
        return name, fn

    steps = [step("a", 30), step("b", 50, fail=True), step("c", 10), step("d", 5)]
    gpu.run_steps(steps, {"a": 40, "b": 60, "c": 30, "d": 10}, 100.0, lambda n, s: records.append((n, dict(s))),
                  clock=lambda: now[0])
    assert ran == [("a", 40), ("b", 60), ("d", 10)]
    assert [n for n, _ in records] == ["a", "b", "c", "d"]
    a, b, c, d = (s for _, s in records)
    assert a == {"figure": 30, "ok": True, "budget_s": 40, "seconds": 30.0}
    assert b["ok"] is False and "RuntimeError: boom" in b["error"] and b["seconds"] == 50.0
    assert c["ok"] is None and c["not_run"] == "time" and "20 s left" in c["note"] and c["budget_s"] == 30
    assert d["ok"] is True and d["seconds"] == 5.0


def test_gpu_script_links_overnight_from_this_tree_where_python_lacks_it(tmp_path):
    """On a GPU machine python cannot import overnight: gpu.sh links this tree's packages into its site folder, so
    the tests' tiny model is built from the tree's data/ as in CI (a copied package, as pip installs it, found no
    data/ beside it and built the model from a fallback corpus: another vocabulary, other numbers)."""
    python = tmp_path / "python"  # this interpreter, except that it reports overnight not importable
    python.write_text(f'#!/bin/bash\n[ "$1 $2" = "-c import overnight" ] && exit 1\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    site, wheels = tmp_path / "site", tmp_path / "wheels"
    wheels.mkdir()
    env = {**os.environ, "PYTHON": str(python), "SITE": str(site), "WHEELS": str(wheels)}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--only", "mlx_tests", "--out",
                           str(tmp_path / "gpu")], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    probe = ("import overnight, overnight.backends.torch_backend as t, overnight.models.tiny as m; "
             "print(overnight.__file__, t.__file__, m.BUNDLED_DATA, m.BUNDLED_DATA.is_dir())")
    seen = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path)
    package, backend, data, found = seen.stdout.split()
    assert package == str(site / "overnight" / "__init__.py") and backend.startswith(str(site / "overnight"))
    assert data == str(ROOT / "data") and found == "True"


def test_gpu_script_pytest_step_names_failures_and_stops_at_its_budget(tmp_path):
    """A pytest step that fails says which tests (gpu.py printed a failed step's `error`, which such a step lacked:
    a KeyError that ended the whole run); one that runs past its budget is stopped with the processes it started,
    and the tests that finished before are still named."""
    gpu = _bench_gpu()
    pid_file = tmp_path / "child.pid"
    (tmp_path / "test_sample.py").write_text(
        "import subprocess, sys, time\n"
        "def test_passes():\n    pass\n"
        "def test_fails():\n    assert False\n"
        "def test_hangs():\n"
        f"    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"    open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "    time.sleep(60)\n")
    failed = gpu.pytest_step([str(tmp_path / "test_sample.py"), "-k", "not hangs"], 60, tmp_path / "a.xml")
    assert failed["ok"] is False and failed["passed"] == 1 and failed["failed"] == 1
    assert "failed: " in failed["error"] and "test_sample.py::test_fails" in failed["error"]
    assert {test.split("::")[1]: outcome for test, outcome in failed["tests"].items()} == {
        "test_passes": "PASSED", "test_fails": "FAILED"}

    t0 = time.monotonic()
    stopped = gpu.pytest_step([str(tmp_path / "test_sample.py")], 5, tmp_path / "b.xml")
    assert time.monotonic() - t0 < 30
    assert stopped["ok"] is False and "did not finish within the step's budget (5 s)" in stopped["error"]
    assert stopped["passed"] == 1 and stopped["failed"] == 1
    child = int(pid_file.read_text())
    state = Path(f"/proc/{child}/status")
    deadline = time.monotonic() + 10
    while state.exists() and "zombie" not in state.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not state.exists() or "zombie" in state.read_text()  # killed with pytest (reaped or not by pid 1)


def test_gpu_script_full_run_order_and_budgets_fit_one_device_call(tmp_path):
    """The full run's steps in the order the open issues need them, each with a budget, and the steps up to grpo
    inside the default deadline even if each takes its whole budget (after ~30 s of wheel installs and env), which
    itself leaves 50 s of a 600 s device call."""
    import argparse

    gpu = _bench_gpu()
    full = dict(gpu.FULL)
    names = [n for n, _ in gpu.planned_steps(argparse.Namespace(dry_run=False, smollm2=None), full, tmp_path, {})]
    assert names == gpu.step_names(full) == [
        "cuda_tests", "resume", "build", "llama8b_8x2048", "llama8b_8x2048_det_off", "grpo", "llama8b_8x2048_liger",
        "smollm2", "llama8b_16x1024", "mlx_tests"]
    assert set(full["budget"]) == set(names)
    assert 30 + sum(full["budget"][n] for n in names[:names.index("grpo") + 1]) <= full["deadline_s"] <= 600 - 50


def test_gpu_script_deadline_only_and_merge(tmp_path):
    """The whole chain a short GPU session uses: a run whose deadline is spent records every step as not run and
    prints the next call; --only runs the named steps; --merge puts both runs together in step order, and refuses
    runs from different devices."""
    def gpu_sh(*args):
        return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), *args], capture_output=True, text=True,
                              timeout=300, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})

    first = gpu_sh("--dry-run", "--deadline-s", "0", "--out", str(tmp_path / "first"))
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    names = ["cuda_tests", "resume", "build", "llama8b_2x64", "llama8b_2x64_det_off", "grpo", "llama8b_2x64_liger",
             "smollm2", "mlx_tests"]
    steps = json.loads((tmp_path / "first.json").read_text())["steps"]
    assert list(steps) == names and all(s["ok"] is None and s["not_run"] == "time" for s in steps.values())
    assert f"bench/gpu.sh --only {','.join(names)} --deadline-s" in first.stdout
    assert "| cuda_tests | not run | 0.0 | not run: time (0 s left" in (tmp_path / "first.md").read_text()

    second = gpu_sh("--dry-run", "--only", "mlx_tests", "--out", str(tmp_path / "second"))
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert list(json.loads((tmp_path / "second.json").read_text())["steps"]) == ["mlx_tests"]

    merge = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--merge", str(tmp_path / "first.json"),
             str(tmp_path / "second.json"), "--out", str(tmp_path / "merged")]
    merged = subprocess.run(merge, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert merged.returncode == 0, merged.stderr[-2000:]
    data = json.loads((tmp_path / "merged.json").read_text())
    assert list(data["steps"]) == names and data["steps"]["mlx_tests"]["ok"] is True
    assert all(data["steps"][n]["ok"] is None for n in names[:-1]) and len(data["runs"]) == 2

    other = json.loads((tmp_path / "second.json").read_text())
    other["env"]["device"] = "NVIDIA H200"
    (tmp_path / "second.json").write_text(json.dumps(other))
    refused = subprocess.run(merge, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2 and "different devices" in refused.stderr

    unknown = gpu_sh("--dry-run", "--only", "llama8b_8x2048", "--out", str(tmp_path / "x"))
    assert unknown.returncode == 2 and "no step named llama8b_8x2048" in unknown.stderr
    assert "cuda_tests,resume,build" in unknown.stderr


def test_mfu_counts_four_times_the_linear_parameters_plus_attention():
    mfu_flops_per_token = _bench_flops().mfu_flops_per_token
    llama8b = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256}
    # Llama-3.1-8B: 8.03B parameters, of which 7.50B in linear layers (the 0.53B embedding is a lookup).
    assert mfu_flops_per_token(llama8b, 0) == pytest.approx(4 * 7.504e9, rel=1e-3)
    assert mfu_flops_per_token(llama8b, 2048) - mfu_flops_per_token(llama8b, 0) == 12 * 32 * 4096 * 2048
