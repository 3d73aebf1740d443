import pytest

from overnight.train.progress import Progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_line_format_and_eta_excludes_eval_and_save_time():
    clock = FakeClock()
    progress = Progress(total_steps=100, clock=clock, enabled=False)
    for step in range(1, 46):
        progress.step_started()
        clock.now += 2.0  # a step takes 2 s
        progress.step_finished()
        clock.now += 100.0  # eval/save time between steps must not count
        line = progress.update(step, 3.2, 3.4, steps_since_ckpt=15, memory_mb=14051.0)
    # 55 steps left at 2 s each
    assert line == ("Training: 45% | loss=3.2 | loss_avg=3.4 | eta=0:02 | ckpt=-15 | "
                    "memory_mb=14051 | mem_delta=+0")
    assert abs(progress.eta_hours() - 55 * 2.0 / 3600) < 1e-12


def test_eta_uses_the_last_50_step_times():
    clock = FakeClock()
    progress = Progress(total_steps=1000, clock=clock, enabled=False)
    for step in range(1, 101):
        progress.step_started()
        clock.now += 10.0 if step <= 50 else 36.0
        progress.step_finished()
        progress.update(step, 1.0, 1.0, 0, 100.0)
    assert abs(progress.eta_hours() - 900 * 36.0 / 3600) < 1e-9  # = 9.0 h


def test_mem_delta_warns_above_half_growth():
    progress = Progress(total_steps=100, enabled=False)
    for step in range(1, 11):
        line = progress.update(step, 1.0, 1.0, 0, 1000.0)
    assert line.endswith("mem_delta=+0")
    assert progress.update(11, 1.0, 1.0, 0, 1400.0).endswith("mem_delta=+400")
    assert progress.update(12, 1.0, 1.0, 0, 1600.0).endswith("mem_delta=+600 ⚠")


def test_near_memory_limit_warns_once():
    warnings = []
    progress = Progress(total_steps=10, enabled=False, warn=warnings.append)
    progress.update(1, 1.0, 1.0, 0, 950.0, limit_mb=1000.0)
    progress.update(2, 1.0, 1.0, 0, 960.0, limit_mb=1000.0)
    assert len(warnings) == 1 and "working set" in warnings[0]


def test_tqdm_renders_the_same_line(capsys):
    import io

    out = io.StringIO()
    progress = Progress(total_steps=100, out=out, terminal=True, columns=lambda: 200)
    progress.update(45, 3.2, 3.4, steps_since_ckpt=150, memory_mb=14051.0)
    progress.close()
    assert "Training: 45% | loss=3.2 | loss_avg=3.4 | eta=? | ckpt=-150 | memory_mb=14051 | mem_delta=+0" in out.getvalue()


def test_eta_is_hours_and_minutes_rounded_up():
    from overnight.train.progress import format_eta

    assert format_eta(3 / 60) == "0:03"
    assert format_eta(12 + 40 / 60) == "12:40"
    assert format_eta(20 / 3600) == "0:01"  # 20 s left is not "done"
    assert format_eta(0.0) == "0:00"
    assert format_eta(float("nan")) == "?"


def run_steps(progress, clock, steps, step_s=1.0, memory=lambda step: 14051.0, start=1):
    lines = []
    for step in range(start, start + steps):
        progress.step_started()
        clock.now += step_s
        progress.step_finished()
        lines.append(progress.update(step, 3.2144, 3.4121, step % 250, memory(step)))
    return lines


@pytest.mark.parametrize("leak", [False, True])
def test_terminal_line_fits_80_columns_keeping_loss_eta_and_memory_health(leak):
    import io
    import re

    clock, out = FakeClock(), io.StringIO()
    progress = Progress(total_steps=10000, clock=clock, out=out, terminal=True, columns=lambda: 80)
    run_steps(progress, clock, 450, step_s=9.0, memory=lambda step: 14051.0 * (2 if leak and step > 20 else 1))
    progress.close()
    shown = out.getvalue().split("\r")[-2].strip()  # the last redraw before close's newline
    assert len(shown) <= 79, shown
    assert "loss=3.214" in shown and re.search(r"eta=\d+:\d\d", shown) and "mem" in shown
    assert ("⚠" in shown) == leak
    assert ("+14051" in shown) == leak


def test_fit_drops_fields_in_order_but_never_the_leak_mark():
    from overnight.train.progress import fit

    fields = {"loss": "3.214", "loss_avg": "3.412", "eta": "12:40", "ckpt": "-150", "memory_mb": "14051",
              "mem_delta": "+9000 ⚠"}
    wide = fit(fields, "45%", 200)
    assert wide == ("Training: 45% | loss=3.214 | loss_avg=3.412 | eta=12:40 | ckpt=-150 | memory_mb=14051 | "
                    "mem_delta=+9000 ⚠")
    for width in range(10, 120):
        line = fit(fields, "45%", width)
        assert len(line) <= width and line.endswith("⚠"), (width, line)
        if width >= 40:
            assert "loss=3.214" in line and "eta=12:40" in line


def test_plain_lines_when_not_a_terminal_every_10_percent_or_60_s_plus_first_and_end():
    import io
    import re

    clock, out = FakeClock(), io.StringIO()
    progress = Progress(total_steps=200, clock=clock, out=out, terminal=False, wall_clock=lambda: "06:12:03")
    run_steps(progress, clock, 199, step_s=1.0)
    run_steps(progress, clock, 1, step_s=100.0, start=200)  # the last step
    progress.close()
    text = out.getvalue()
    assert "\r" not in text
    steps = [int(re.search(r"step=(\d+)/200", line).group(1)) for line in text.splitlines()]
    assert steps == [1, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200]
    first = text.splitlines()[0]
    assert first == ("06:12:03 Training: 0% | step=1/200 | loss=3.214 | loss_avg=3.412 | eta=0:04 | ckpt=-1 | "
                     "memory_mb=14051 | mem_delta=+0")

    clock, out = FakeClock(), io.StringIO()
    slow = Progress(total_steps=1000, clock=clock, out=out, terminal=False)
    run_steps(slow, clock, 12, step_s=25.0)  # 10% is 100 steps, but a minute passes first
    assert [int(re.search(r"step=(\d+)/", line).group(1)) for line in out.getvalue().splitlines()] == [1, 4, 7, 10]
    slow.close()  # a run that ends early still shows where it ended
    assert "step=12/1000" in out.getvalue().splitlines()[-1]


def test_plain_output_that_fails_never_stops_training():
    class Broken:
        def write(self, _):
            raise OSError(28, "No space left on device")

        def flush(self):
            raise OSError(28, "No space left on device")

    progress = Progress(total_steps=10, out=Broken(), terminal=False)
    progress.update(1, 1.0, 1.0, 0, 100.0)
    progress.close()


def test_memory_warning_is_written_above_the_bar_not_through_it(monkeypatch):
    import io

    written = []
    monkeypatch.setattr(Progress, "write", lambda self, message: written.append(message))
    progress = Progress(total_steps=10, out=io.StringIO(), terminal=True, columns=lambda: 80)
    progress.update(1, 1.0, 1.0, 0, 950.0, limit_mb=1000.0)
    progress.close()
    assert len(written) == 1 and "working set" in written[0]


def test_a_supervised_child_redraws_when_the_supervisors_stderr_is_a_terminal(monkeypatch, capsys):
    """Under the supervisor the child's stderr is a pipe copied to the user's terminal; the supervisor says so, and
    the progress line redraws in place instead of printing a line per update."""
    import sys

    from overnight.train import progress

    monkeypatch.delenv(progress.STDERR_IS_TERMINAL_ENV, raising=False)
    assert not progress._is_terminal(sys.stderr)  # pytest's captured stderr is no terminal
    monkeypatch.setenv(progress.STDERR_IS_TERMINAL_ENV, "1")
    assert progress._is_terminal(sys.stderr)
    assert not progress._is_terminal(sys.stdout)  # only the stream the supervisor copies
    monkeypatch.setenv(progress.STDERR_IS_TERMINAL_ENV, "0")
    assert not progress._is_terminal(sys.stderr)


def test_a_grpo_line_shows_the_reward_and_its_average_not_the_objective():
    """grpo's objective is ~0 by construction: the line shows the step's mean reward and the window's average (the
    loop tracks -reward as such a run's loss, so the average reward is -loss_avg), narrow terminals included."""
    import io

    from overnight.train.progress import fit

    progress = Progress(total_steps=100, enabled=False)
    line = progress.update(45, 0.0003, -0.48, steps_since_ckpt=5, memory_mb=900.0, reward=0.62)
    assert line == "Training: 45% | reward=0.62 | reward_avg=0.48 | eta=? | ckpt=-5 | memory_mb=900 | mem_delta=+0"
    assert progress.update(46, 0.0, 0.0, 0, 900.0, reward=0.0).startswith("Training: 46% | reward=0 | reward_avg=0 |")
    fields = {"reward": "0.62", "reward_avg": "0.48", "eta": "1:00", "ckpt": "-5", "memory_mb": "900",
              "mem_delta": "+0"}
    assert fit(fields, "45%", 56) == "45% reward=0.62 avg=0.48 eta=1:00 ckpt=-5 mem=900MB +0"
    assert fit(fields, "45%", 22) == "reward=0.62 eta=1:00"
    out = io.StringIO()
    plain = Progress(total_steps=10, out=out, terminal=False, wall_clock=lambda: "06:12:03")
    plain.update(1, 0.0, -0.25, 0, 900.0, reward=0.25)
    assert out.getvalue().startswith("06:12:03 Training: 10% | step=1/10 | reward=0.25 | reward_avg=0.25 | eta=")


def test_the_eval_line_shows_each_methods_own_figure():
    """A perplexity means something for the likelihood losses only: grpo shows the greedy answers' reward, a reward
    model its pairwise accuracy."""
    from overnight.train.progress import eval_line

    assert eval_line(8, {"val_loss": 1.5, "val_ppl": 4.48}, 1.5, True, None) == \
        "eval step 8: val_loss=1.5 ppl=4.48 score=1.5 (new best)"
    assert eval_line(8, {"val_loss": -0.4, "val_ppl": 0.67, "val_reward": 0.4}, -0.4, False, 4) == \
        "eval step 8: val_reward=0.4 score=-0.4 (best is still step 4)"
    assert eval_line(8, {"val_loss": 0.3, "val_ppl": 1.35, "val_accuracy": 0.875}, 0.3, True, None) == \
        "eval step 8: val_loss=0.3 accuracy=0.875 score=0.3 (new best)"
