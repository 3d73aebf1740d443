"""The resume policy: what --fresh moves, the prompt, and the refusals (exit 3) that protect a night of work."""
from __future__ import annotations

import json

import pytest

from overnight.runs.resume import archive_run
from overnight.runs.rundir import OWNED_NAMES, read_metrics

from conftest import DATA_DIR, has
from test_cli import base_args, on_terminal, overnight
from test_lock import tree


def test_archive_moves_only_what_the_run_owns(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000005").mkdir(parents=True)
    (run / "adapter").mkdir()
    (run / "tb").mkdir()
    (run / "wandb").mkdir()
    for name in ("config.yaml", "metrics.jsonl", "heartbeat.json", "predictions.jsonl", "completions.jsonl",
                 "adapter.tmp-1a2b", "report.png", "notes.txt", ".lock"):
        (run / name).write_text(name)
    (run / "mydata").mkdir()
    (run / "mydata" / "keep.jsonl").write_text("{}")
    (run / "archive-20200101-000000").mkdir()
    archive = archive_run(run)
    assert sorted(p.name for p in archive.iterdir()) == sorted(
        ["adapter", "adapter.tmp-1a2b", "checkpoints", "completions.jsonl", "config.yaml", "heartbeat.json",
         "metrics.jsonl", "predictions.jsonl", "report.png", "tb", "wandb"])
    left = sorted(p.name for p in run.iterdir())
    assert left == sorted([".lock", "archive-20200101-000000", archive.name, "mydata", "notes.txt"])
    assert archive_run(run) is None  # nothing of a run left: nothing to archive
    assert set(OWNED_NAMES) <= {p.name for p in archive.iterdir()}


def test_fresh_leaves_the_users_files_where_they_are(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 5)).returncode == 0
    (out / "notes.txt").write_text("my notes about this run\n")
    (out / "eval-set").mkdir()
    (out / "eval-set" / "questions.jsonl").write_text('{"q": 1}\n')
    mine = {k: v for k, v in tree(out).items() if k.startswith(("notes.txt", "eval-set/"))}
    fresh = overnight(*base_args(tiny_model_dir, out, 5), "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    (archive,) = out.glob("archive-*")
    assert {k: v for k, v in tree(out).items() if k.startswith(("notes.txt", "eval-set/"))} == mine
    assert not (archive / "notes.txt").exists() and not (archive / "eval-set").exists()
    assert (archive / "checkpoints" / "step-00000005" / "COMMIT").is_file() and (archive / "adapter").is_dir()
    assert (out / ".lock").is_file()


def test_a_run_that_died_before_its_first_checkpoint_is_archived_without_the_users_files(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')
    (out / "heartbeat.json").write_text('{"pid": 1, "step": 0, "state": "running"}')
    (out / "notes.txt").write_text("mine\n")
    result = overnight(*base_args(tiny_model_dir, out, 5))
    assert result.returncode == 0, result.stderr
    (archive,) = out.glob("archive-*")
    assert sorted(p.name for p in archive.iterdir()) == ["heartbeat.json", "metrics.jsonl"]
    assert (out / "notes.txt").read_text() == "mine\n"


def test_ctrl_d_at_the_prompt_is_no_answer(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 5)).returncode == 0
    before = tree(out)
    code, text = on_terminal(base_args(tiny_model_dir, out, 8), b"\x04")
    assert "Resume from step 5? [Y/n]" in text
    assert code == 3, text
    assert "no answer" in text and "--auto-resume" in text and "--fresh" in text and "Traceback" not in text
    assert tree(out) == before


def test_every_checkpoint_invalid_is_refused_not_restarted(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 12)).returncode == 0
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    for folder in (out / "checkpoints").glob("step-*"):
        (folder / "COMMIT").unlink()
    refused = overnight(*base_args(tiny_model_dir, out, 12), "--auto-resume")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert str(out / "checkpoints" / "quarantine") in refused.stderr and "--fresh" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted(p.name[:13] for p in (out / "checkpoints" / "quarantine").iterdir()) == steps
    assert not [r for r in read_metrics(out) if r["event"] == "start"][1:], "a new run was started"
    # Asked again (the invalid ones are now in quarantine), and on a terminal: still refused, never asked.
    assert overnight(*base_args(tiny_model_dir, out, 12), "--auto-resume").returncode == 3
    code, text = on_terminal(base_args(tiny_model_dir, out, 12), b"y\n")
    assert code == 3 and "[Y/n]" not in text and "quarantine" in text, text
    fresh = overnight(*base_args(tiny_model_dir, out, 5), "--fresh")
    assert fresh.returncode == 0, fresh.stderr


def test_resuming_past_max_steps_says_there_is_nothing_to_train(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 12)).returncode == 0
    before = tree(out)
    result = overnight(*base_args(tiny_model_dir, out, 6), "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert "already at step 12, beyond train.max_steps 6; nothing to train" in result.stdout
    assert "--max-steps" in result.stdout and "finished" not in result.stdout
    assert tree(out) == before  # adapter/, metrics, heartbeat: as they were


@pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="needs the torch backend installed")
def test_resuming_with_another_backend_is_refused_before_the_model_loads(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 5)).returncode == 0
    before = tree(out)
    args = base_args(tiny_model_dir, out, 8, "--auto-resume")
    args[args.index("--backend") + 1] = "torch"
    result = overnight(*args)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "'numpy-reference' backend" in result.stderr and "'torch'" in result.stderr
    assert "--allow-backend-change" in result.stderr and "--backend numpy-reference" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "trainable params" not in result.stdout  # refused before backend.setup loaded the model
    assert tree(out) == before

    # With the flag, a checkpoint that holds no portable copy (this backend writes none) is refused too.
    result = overnight(*args, "--allow-backend-change")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "cannot move from 'numpy-reference' to 'torch'" in result.stderr and "portable" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert tree(out) == before


def test_a_run_that_stopped_early_is_not_trained_on_by_a_plain_auto_resume(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    plateau = ("--set", "early_stopping.warmup_steps=2", "--set", "early_stopping.check_every_steps=2",
               "--set", "early_stopping.patience=1", "--set", "early_stopping.min_delta=100")
    first = overnight(*base_args(tiny_model_dir, out, 30), *plateau)
    assert first.returncode == 0 and "stopping early" in first.stdout, first.stdout + first.stderr
    stop_step = next(r["step"] for r in read_metrics(out) if r["event"] == "stop")
    before = tree(out)
    again = overnight(*base_args(tiny_model_dir, out, 30), *plateau, "--auto-resume")
    assert again.returncode == 0, again.stderr
    assert f"already stopped early at step {stop_step}" in again.stdout and "--resume-from" in again.stdout
    assert {k: v for k, v in tree(out).items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    # Naming the checkpoint is asking to train on: that goes on (and stops again at its next plateau check).
    onward = overnight(*base_args(tiny_model_dir, out, 30), *plateau, "--resume-from", str(stop_step),
                       "--set", "early_stopping.patience=1000")
    assert onward.returncode == 0, onward.stderr
    assert max(r["step"] for r in read_metrics(out) if r["event"] == "train") == 30


def test_allow_config_change_that_cannot_continue_the_data_order_is_refused_with_nothing_written(tmp_path,
                                                                                                  tiny_model_dir):
    """Rows added to the training file: the saved place in the data order cannot be continued, so even with
    --allow-config-change the resume is refused (exit 3) before anything is written, saying what would work;
    it used to record a resume and leave the run "failed"."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        (data / name).write_bytes((DATA_DIR / name).read_bytes())
    out = tmp_path / "run"

    def args(*extra: str) -> list[str]:
        a = base_args(tiny_model_dir, out, 10, "--auto-resume", "--allow-config-change", *extra)
        a[a.index("--data") + 1] = str(data)
        return a

    first = base_args(tiny_model_dir, out, 5)
    first[first.index("--data") + 1] = str(data)
    assert overnight(*first).returncode == 0
    before = tree(out)
    with open(data / "train.jsonl", "ab") as rows:
        rows.write(b"".join((DATA_DIR / "train.jsonl").read_bytes().splitlines(keepends=True)[:3]))
    refused = overnight(*args())
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
    assert "400 training rows" in refused.stderr and "now has 403" in refused.stderr, refused.stderr
    assert "put back the training file" in refused.stderr and "--fresh" in refused.stderr
    assert "trainable params" not in refused.stdout  # decided before the model was loaded
    assert tree(out) == before  # no resume event, no failed state, config.yaml as it was
    assert "completed at step 5" in overnight("status", str(out)).stdout

    (data / "train.jsonl").write_bytes((DATA_DIR / "train.jsonl").read_bytes())
    refused = overnight(*args("--batch-size", "8"))
    assert refused.returncode == 3 and "train.batch_size=4 (now 8)" in refused.stderr, refused.stderr
    assert "set train.batch_size=4 again" in refused.stderr
    assert tree(out) == before


def test_check_source_position_refuses_what_the_source_cannot_continue(tmp_path, tiny_model_dir):
    """The source's own check (grpo adds fields of its own), run before the resume is recorded."""
    from overnight.config import Config
    from overnight.data import TrainStream, load_tokenizer
    from overnight.errors import ResumeRefused
    from overnight.runs.resume import check_source_position

    cfg = Config()
    cfg.train.batch_size = 4
    stream = TrainStream(DATA_DIR / "train.jsonl", load_tokenizer(tiny_model_dir), cfg)
    saved = stream.state()
    check_source_position(stream, saved, 5, tmp_path)  # its own position: fine
    with pytest.raises(ResumeRefused, match=r"step 5 cannot continue: .*seed 7 -> 42.*Nothing was changed"):
        check_source_position(stream, saved | {"seed": 7}, 5, tmp_path)
    stream.close()


def test_a_lowered_keep_last_frees_the_space_before_the_first_save(tmp_path, tiny_model_dir):
    """Resumed with checkpoint.keep_last lowered to 1: the old checkpoints are gone before the first new save starts
    (killed inside it here), keeping the one resumed from; they used to go only after that save, which a disk they
    filled would refuse."""
    from overnight.runs.checkpoint import CheckpointManager
    from test_lifecycle import run_with_fault

    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 12, "--set", "checkpoint.keep_last=5")).returncode == 0
    manager = CheckpointManager(out, log=lambda m: None)
    assert [i.step for i in manager.list()] == [4, 5, 8, 10, 12]
    best = json.loads((manager.path_for(12) / "trainer_state.json").read_text())["best"]["best_step"]
    proc = run_with_fault(base_args(tiny_model_dir, out, 16, "--set", "checkpoint.keep_last=1", "--auto-resume"),
                          "after_backend_files:1")  # SIGKILLed inside the first save
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -9, stdout + stderr
    assert [i.step for i in manager.list()] == sorted({12, best})
    assert "checkpoint.keep_last=1: removed step" in stdout
