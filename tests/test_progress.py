from overnight.progress import Progress


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
    assert line == ("Training: 45% | loss=3.2 | loss_avg=3.4 | eta_h=0.0 | ckpt=-15 | "
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
    progress = Progress(total_steps=100, out=out)
    progress.update(45, 3.2, 3.4, steps_since_ckpt=150, memory_mb=14051.0)
    progress.close()
    assert "Training: 45% | loss=3.2 | loss_avg=3.4 | eta_h=nan | ckpt=-150 | memory_mb=14051 | mem_delta=+0" in out.getvalue()
