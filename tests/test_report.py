"""`overnight report` (src/commands/report.py): the PNG and the summary on real runs (torch, mlx, the reference backend),
on a run still training, after a kill and a resume, on lines from before the `end` record and the newer fields,
and the clear refusals: no run dir, nothing recorded, no matplotlib (exit 2, naming the extra)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overnight.commands.report import build_timeline, read_records
from overnight.runs.rundir import read_metrics

from conftest import DATA_DIR, ROOT, has
from test_cli import base_args, env
from test_trackers import kill_then_resume, trained_twice

PNG = b"\x89PNG\r\n\x1a\n"


def overnight(*args: str, extra_env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True,
                          env={**env(), **(extra_env or {})}, stdin=subprocess.DEVNULL, timeout=timeout, cwd=ROOT)


def report(run_dir: Path, *extra: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return overnight("report", str(run_dir), *extra, extra_env=extra_env, timeout=180)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 20_000, path
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))  # written beside and renamed


def summary_of(result: subprocess.CompletedProcess) -> dict[str, str]:
    return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in result.stdout.splitlines() if ":" in line}


def real_run(backend: str, model: Path, out: Path, steps: int, *extra: str) -> None:
    result = overnight("train", "--backend", backend, "--model", str(model), "--data", str(DATA_DIR),
                       "--output", str(out), "--max-steps", str(steps), "--batch-size", "2", "--lora-rank", "4",
                       "--quiet", "--set", "model.quantization.bits=0", "--set", "model.max_seq_length=96",
                       "--set", "lora.layers=1", "--set", "train.report_every=1", "--set", "train.warmup_steps=1",
                       "--set", "eval.every_steps=2", "--set", "eval.max_batches=1", "--set", "eval.predictions=0",
                       "--set", "checkpoint.every_steps=2", *extra)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


@pytest.mark.torch
@pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="torch backend not installed")
def test_report_on_a_real_torch_run(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    real_run("torch", tiny_model_dir, out, 6, "--set", "report.tensorboard=true")
    result = report(out)
    assert result.returncode == 0, result.stderr
    assert_png(out / "report.png")
    s = summary_of(result)
    assert s["run"] == f"{out} (backend torch)"
    assert s["steps"].startswith("6 of 6 (6 train lines, 3 evals")
    assert s["resumes"] == "0"
    assert s["stop"] == "completed at step 6: reached max_steps 6"
    end = [r for r in read_metrics(out) if r["event"] == "end"][-1]
    assert s["best"].startswith(f"step {end['best_step']} (recorded at the end of the run): score ")
    for part in ("val_loss", "gap", "ppl_ratio", "momentum"):
        assert part in s["best"]
    assert s["final adapter"] == f"{out / 'adapter'}, from step {end['adapter_from']} (the best checkpoint)"
    assert s["plot"] == str(out / "report.png")
    assert list((out / "tb").glob("events.out.tfevents.*"))


@pytest.mark.mlx
@pytest.mark.skipif(not has("mlx", "mlx_lm"), reason="mlx backend not installed")
def test_report_on_a_real_mlx_run(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    real_run("mlx", tiny_model_dir, out, 4)
    target = tmp_path / "elsewhere.png"
    result = report(out, "--output", str(target))
    assert result.returncode == 0, result.stderr
    assert_png(target)
    assert not (out / "report.png").exists()
    s = summary_of(result)
    assert s["run"] == f"{out} (backend mlx)"
    assert s["steps"].startswith("4 of 4") and s["stop"] == "completed at step 4: reached max_steps 4"


def test_report_after_a_kill_and_resume_follows_the_timeline_that_counts(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    # oom_above_rows: the reference backend runs out of memory on 4-row micro-batches, so the run splits them.
    result = kill_then_resume(tiny_model_dir, out, 12, 7, [], faults={"oom_above_rows": 2})
    assert result.returncode == 0, result.stderr
    twice = trained_twice(out)
    assert twice
    result = report(out)
    assert result.returncode == 0, result.stderr
    assert_png(out / "report.png")
    s = summary_of(result)
    resumed_from = [r["from_step"] for r in read_metrics(out) if r["event"] == "resume"]
    assert s["resumes"] == f"1 (from step {resumed_from[0]})"
    assert s["steps"].startswith("12 of 12 (12 train lines")  # each re-trained step counted once
    assert "over 2 processes" in s["wall time"]
    assert s["out of memory"].startswith("micro-batch split during step 1 (x2)")
    assert s["stop"] == "completed at step 12: reached max_steps 12"

    timeline = build_timeline(read_records(out / "metrics.jsonl")[0])
    last = {r["step"]: r for r in read_metrics(out) if r["event"] == "train"}
    assert sorted(timeline.train) == list(range(1, 13))
    assert all(timeline.train[step] == last[step] for step in twice)  # the resumed process's line wins


def test_a_resume_to_an_earlier_step_drops_the_abandoned_timeline():
    lines = [{"event": "train", "step": s, "loss": 1.0} for s in range(1, 9)]
    lines += [{"event": "eval", "step": 4, "val_loss": 2.0}, {"event": "eval", "step": 8, "val_loss": 1.5},
              {"event": "checkpoint", "step": 4}, {"event": "checkpoint", "step": 8},
              {"event": "end", "step": 8, "status": "completed", "reason": "done", "best_step": 8}]
    lines += [{"event": "resume", "step": 4, "from_step": 4}, {"event": "train", "step": 5, "loss": 0.5}]
    t = build_timeline(lines)
    assert sorted(t.train) == [1, 2, 3, 4, 5] and t.train[5]["loss"] == 0.5
    assert sorted(t.evals) == [4] and t.checkpoints == [4] and t.resumes == [4] and t.end is None


def test_report_on_a_run_that_is_still_training(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "overnight", *base_args(tiny_model_dir, out, 40)],
                               env=env(sleep_s=0.2), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not any(r.get("event") == "eval" for r in read_metrics(out)) and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as handle:  # as if cut mid-write
            handle.write('{"event": "train", "step": 99, "lo')
        result = report(out)
        assert process.poll() is None, "the run should still be training"
    finally:
        process.kill()
        process.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    assert_png(out / "report.png")
    s = summary_of(result)
    assert s["stop"].startswith("no end recorded: still running, or killed")
    assert s["final adapter"] == "none yet (the run has not ended)"
    assert "1 line(s) of metrics.jsonl could not be read" in s["note"]


OLD_FORMAT = [  # the fields of the first versions: no time, no loss_avg/tokens_per_sec/memory, no score, no end
    {"event": "train", "step": 10, "loss": 3.1, "lr": 1e-4, "tokens": 800, "grad_norm": 1.2},
    {"event": "train", "step": 20, "loss": 2.8, "lr": 1e-4, "tokens": 790, "grad_norm": 0.9},
    {"event": "eval", "step": 20, "val_loss": 2.9, "val_ppl": 18.2},
    {"event": "checkpoint", "step": 20, "path": "checkpoints/step-00000020"},
    {"event": "train", "step": 30, "loss": "nan", "lr": 1e-4, "tokens": 805, "grad_norm": "inf"},
    {"event": "stop", "step": 30, "reason": "non_finite"},
]


def test_report_on_a_run_from_before_this_feature(tmp_path):
    out = tmp_path / "old-run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in OLD_FORMAT))
    result = report(out)
    assert result.returncode == 0, result.stderr
    assert_png(out / "report.png")
    s = summary_of(result)
    assert s["steps"] == "30 (3 train lines, 1 evals, 1 checkpoints)"
    assert s["stop"] == "stopped early at step 30: non_finite"
    assert s["best"].startswith("step 20 (the lowest val_loss (this run recorded no score)): val_loss 2.9000")
    assert s["final adapter"] == "none yet (the run has not ended)"
    assert "wall time" not in s  # no time recorded, no elapsed_s: nothing is made up


@pytest.mark.parametrize("make", ["missing", "empty-dir", "empty-file", "garbage", "a-file"])
def test_nothing_to_report_is_a_clear_error(tmp_path, make):
    run = tmp_path / "run"
    if make != "missing":
        run.mkdir()
    if make == "empty-file":
        (run / "metrics.jsonl").write_text("")
    if make == "garbage":
        (run / "metrics.jsonl").write_text('{"event": "tra\nnot json\n[1, 2]\n')
    if make == "a-file":
        run.rmdir()
        run.write_text("not a folder")
    result = report(run)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "report.png").exists() if run.is_dir() else True


def test_an_output_folder_that_does_not_exist_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in OLD_FORMAT))
    result = report(out, "--output", str(tmp_path / "no" / "such" / "report.png"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_without_matplotlib_the_summary_prints_and_the_plot_names_the_extra(tmp_path):
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("No module named matplotlib (test shim)")\n')
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in OLD_FORMAT))
    result = report(out, extra_env={"PYTHONPATH": os.pathsep.join([str(shim.parent), env()["PYTHONPATH"]])})
    assert result.returncode == 2
    assert "pip install 'overnight[report]'" in result.stderr and "Traceback" not in result.stderr
    assert "stop: stopped early at step 30" in result.stdout
    assert not (out / "report.png").exists()


# -- a short run: real durations, and no empty panels --------------------------------------------------------------

def test_a_short_run_reports_seconds_and_says_why_a_panel_is_empty(tmp_path, tiny_model_dir):
    """6 steps with the default report_every (10) and no validation file: the summary gives the run's real
    seconds, not "training steps 0:00:00", the train lines end at step 6, and the val-loss panel says why it is
    empty instead of drawing empty axes."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes((DATA_DIR / "train.jsonl").read_bytes())
    out = tmp_path / "run"
    trained = overnight(*base_args(tiny_model_dir, out, 6, "--set", "train.report_every=10", "--data", str(data)))
    assert trained.returncode == 0, trained.stderr
    result = report(out)
    assert result.returncode == 0, result.stderr
    assert_png(out / "report.png")
    s = summary_of(result)
    assert s["steps"].startswith("6 of 6 (2 train lines, 0 evals")
    wall, training = s["wall time"].split("; training steps ")
    assert wall.endswith(" s") and training.endswith(" s") and float(training[:-2]) > 0, s["wall time"]
    assert "0:00:00" not in s["wall time"]
    assert "empty panel, val loss: no eval recorded: the run had no validation file (val.jsonl)" in result.stdout
    assert result.stdout.count("empty panel") == 1


def short_timeline(train_steps, **fields) -> list[dict]:
    lines = [{"event": "start", "step": 0, "time": 1000.0}]
    lines += [{"event": "train", "step": s, "time": 1000.5 + s, "loss": 2.0 - s / 10, "elapsed_s": 0.4 * s, **fields}
              for s in train_steps]
    return lines


def test_durations_under_a_minute_are_seconds_and_name_the_step_they_reach(tmp_path):
    from overnight.commands.report import summary

    s = dict(line.split(": ", 1) for line in summary(tmp_path, build_timeline(short_timeline([1, 4]))))
    assert s["wall time"] == "4.50 s; training steps 1.60 s"
    lines = short_timeline([1]) + [{"event": "checkpoint", "step": 4, "time": 1004.5}]  # an older run's grid
    s = dict(line.split(": ", 1) for line in summary(tmp_path, build_timeline(lines)))
    assert s["wall time"] == "4.50 s; training steps 0.40 s (to step 1)"
    long = short_timeline([1]) + [{"event": "train", "step": 2, "time": 5000.0, "loss": 1.0, "elapsed_s": 3725.0}]
    s = dict(line.split(": ", 1) for line in summary(tmp_path, build_timeline(long)))
    assert s["wall time"] == "1:06:40; training steps 1:02:05"


@pytest.mark.skipif(not has("matplotlib"), reason="matplotlib is not installed (the report extra)")
def test_a_panel_without_data_is_left_empty_with_the_reason_and_a_single_point_shows():
    from overnight.commands.report import figure

    fig, empty = figure(build_timeline(short_timeline([1], lr=1e-4)), "t", eval_every=250)
    assert empty == [
        "val loss: no eval recorded yet (every 250 steps and at the end), or the run has no validation file",
        "grad norm: not in this run's train lines (written by an older version)",
        "memory (MB): not in this run's train lines (written by an older version)",
        "tokens/s: not in this run's train lines (written by an older version)"]
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert not axes["val loss"].axison and "no eval recorded yet" in axes["val loss"].texts[0].get_text()
    assert axes["learning rate"].axison
    (line,) = axes["learning rate"].get_lines()[:1]
    assert line.get_marker() == "o" and list(line.get_xdata()) == [1]  # one point, drawn as a dot


@pytest.mark.skipif(not has("matplotlib"), reason="matplotlib is not installed (the report extra)")
def test_a_grpo_run_gets_a_reward_panel_and_a_reward_line(tmp_path):
    """grpo's train loss is its objective, ~0 by construction: the first panel draws the reward instead (the step's
    mean, the moving average the loop tracked as -loss_avg, each reward when there are several, the evals' greedy
    val_reward), and the summary says how the reward moved."""
    from overnight.commands.report import figure, summary

    lines = [{"event": "start", "step": 0, "time": 1000.0}]
    lines += [{"event": "train", "step": s, "time": 1000.0 + s, "loss": 0.001, "loss_avg": -0.05 * s,
               "reward": 0.1 * s, "rewards/correct/mean": 0.1 * s, "rewards/short/mean": 0.5, "lr": 1e-4}
              for s in range(1, 11)]
    lines += [{"event": "eval", "step": s, "time": 1000.0 + s, "val_loss": -0.1 * s, "val_reward": 0.1 * s}
              for s in (5, 10)]
    timeline = build_timeline(lines)
    fig, _ = figure(timeline, "t")
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert "train loss" not in axes
    drawn = {line.get_label(): line for line in axes["reward"].get_lines()}
    assert set(drawn) >= {"reward", "moving average (50 steps)", "correct", "short", "val_reward (greedy)"}
    assert list(drawn["reward"].get_ydata()) == pytest.approx([0.1 * s for s in range(1, 11)])
    assert list(drawn["moving average (50 steps)"].get_ydata()) == pytest.approx([0.05 * s for s in range(1, 11)])
    assert list(drawn["val_reward (greedy)"].get_xdata()) == [5, 10]
    s = dict(line.split(": ", 1) for line in summary(tmp_path, timeline))
    assert s["reward"] == ("0.3000 (mean of the first 5 train lines) -> 0.8000 (the last 5, to step 10); "
                           "val_reward 0.5000 -> 1.0000 over 2 evals")
    # the best eval is said by its reward too (val_loss alone read -1.0000 for the best greedy reward 1.0)
    assert s["best"].endswith("val_reward 1.0000, val_loss -1.0000 (= -val_reward)"), s["best"]
    sft = dict(line.split(": ", 1) for line in summary(tmp_path, build_timeline(short_timeline([1, 2]))))
    assert "reward" not in sft and "train loss" in {ax.get_title() for ax in figure(
        build_timeline(short_timeline([1, 2])), "t")[0].axes}


@pytest.mark.skipif(not has("matplotlib"), reason="matplotlib is not installed (the report extra)")
def test_a_reward_model_run_shows_its_pairwise_accuracy(tmp_path):
    """--method reward evals record val_accuracy beside val_loss: the summary says how it moved and gives it on the
    best line, and the val panel draws it; an sft run's report has neither."""
    from overnight.commands.report import figure, summary

    lines = short_timeline([1, 2, 3, 4])
    lines += [{"event": "eval", "step": s, "time": 1000.5 + s, "val_loss": 0.7 - 0.1 * s, "score": 0.7 - 0.1 * s,
               "val_accuracy": acc} for s, acc in ((2, 0.5), (3, 0.9375), (4, 0.875))]
    lines += [{"event": "end", "step": 4, "time": 1005.0, "status": "completed", "reason": "max_steps",
               "best_step": 4, "adapter_from": 4}]
    timeline = build_timeline(lines)
    s = dict(line.split(": ", 1) for line in summary(tmp_path, timeline))
    assert s["val_accuracy"] == "0.5000 (step 2) -> 0.8750 (step 4) over 3 evals; highest 0.9375 at step 3"
    assert "val_loss 0.3000, val_accuracy 0.8750" in s["best"]
    axes = {ax.get_title(): ax for ax in figure(timeline, "t")[0].axes}
    drawn = {line.get_label(): line for line in axes["val loss & pairwise accuracy"].get_lines()}
    assert list(drawn["val_accuracy"].get_xdata()) == [2, 3, 4]
    assert list(drawn["val_accuracy"].get_ydata()) == [0.5, 0.9375, 0.875]
    sft = build_timeline(short_timeline([1, 2]) + [{"event": "eval", "step": 2, "time": 1003.0, "val_loss": 1.0}])
    assert not any(line.startswith("val_accuracy") for line in summary(tmp_path, sft))
    assert "val loss" in {ax.get_title() for ax in figure(sft, "t")[0].axes}
