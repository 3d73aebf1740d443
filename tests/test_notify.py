"""Webhook notifications against a real HTTP server on 127.0.0.1: what a run sends, that the last events
arrive although the process exits right after, and that a failing webhook never stops training."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from overnight.integrations.notify import Notifier

from test_cli import base_args, overnight


class Recorder:
    """A local webhook that records every event it is sent (optionally answering slowly)."""

    def __init__(self, delay_s: float = 0.0):
        self.events: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(delay_s)
                recorder.events.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def names(self) -> list[str]:
        return [e["event"] for e in self.events]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    recorder = Recorder()
    yield recorder
    recorder.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hook"


def test_events_are_delivered_in_order_by_close(hook):
    notify = Notifier(hook.url)
    for i in range(5):
        notify("eval", step=i)
    assert notify.close() is True
    assert [e["step"] for e in hook.events] == [0, 1, 2, 3, 4] and hook.events[0]["host"] == socket.gethostname()


def test_a_failing_webhook_is_warned_about_once():
    warnings = []
    notify = Notifier(closed_port_url(), warn=warnings.append)
    for i in range(3):
        notify("checkpoint", step=i)
    assert notify.close() is True
    assert len(warnings) == 1 and "webhook" in warnings[0] and "training goes on" in warnings[0]


def test_close_waits_a_bounded_time_for_a_slow_webhook():
    slow = Recorder(delay_s=5)
    try:
        warnings = []
        notify = Notifier(slow.url, warn=warnings.append)
        notify("job_completed")
        started = time.monotonic()
        assert notify.close(timeout=0.5) is False
        assert time.monotonic() - started < 2 and "not delivered" in warnings[-1]
    finally:
        slow.close()


def test_no_url_sends_nothing():
    notify = Notifier(None)
    notify("eval", step=1)
    assert notify.close() is True


def test_a_full_run_reports_start_evals_checkpoints_and_completion(tmp_path, tiny_model_dir, hook):
    result = overnight(*base_args(tiny_model_dir, tmp_path / "run", 12, "--set", f"notify.webhook_url={hook.url}"))
    assert result.returncode == 0, result.stderr
    names = hook.names()
    assert names[0] == "job_started" and names[-1] == "job_completed", names
    assert {"eval", "checkpoint"} <= set(names)
    assert hook.events[-1]["step"] == 12 and hook.events[-1]["status"] == "completed"


def test_a_failing_run_reports_job_failed(tmp_path, tiny_model_dir, hook):
    result = overnight(*base_args(tiny_model_dir, tmp_path / "run", 12, "--set", f"notify.webhook_url={hook.url}"),
                       faults={"oom_above_rows": 0})
    assert result.returncode == 1 and "out of memory" in result.stderr, result.stderr
    assert hook.names()[0] == "job_started" and hook.names()[-1] == "job_failed", hook.names()


def test_an_unreachable_webhook_never_stops_training(tmp_path, tiny_model_dir):
    result = overnight(*base_args(tiny_model_dir, tmp_path / "run", 12, "--set", f"notify.webhook_url={closed_port_url()}"))
    assert result.returncode == 0, result.stderr
    assert "finished at step 12" in result.stdout
    assert (result.stdout + result.stderr).count("warning: webhook") == 1


def test_ctrl_c_while_waiting_for_a_slow_webhook_at_exit_keeps_the_runs_record(tmp_path, tiny_model_dir):
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    from test_cli import env

    slow = Recorder(delay_s=3)
    out = tmp_path / "run"
    try:
        proc = subprocess.Popen([sys.executable, "-m", "overnight",
                                 *base_args(tiny_model_dir, out, 12, "--set", f"notify.webhook_url={slow.url}")],
                                env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
        for line in proc.stdout:
            if "finished at step 12" in line:
                break
        time.sleep(0.3)  # now draining the webhook queue (several events, 3 s each)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=8)
    finally:
        slow.close()
    assert proc.returncode == 130, stderr
    assert "the run had already ended (completed)" in stderr and "Traceback" not in stderr
    assert json.loads((out / "heartbeat.json").read_text())["state"] == "completed"


def test_a_failing_webhooks_warning_does_not_print_the_secret_in_its_url():
    # Slack/Discord-style hooks carry their token in the path, some in the query or in user:password@.
    url = closed_port_url().replace("http://", "http://bot:hunter2@") + "/T0SECRET/B0SECRET?token=xoxb-SECRET"
    warnings = []
    notify = Notifier(url, warn=warnings.append)
    notify("checkpoint", step=1)
    assert notify.close() is True
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0]
    assert "SECRET" not in warnings[0] and "hunter2" not in warnings[0], warnings[0]


def test_the_not_delivered_warning_does_not_print_the_secret_in_its_url():
    slow = Recorder(delay_s=5)
    try:
        warnings = []
        notify = Notifier(slow.url + "/T0SECRET", warn=warnings.append)
        notify("job_completed", step=3)
        notify.close(timeout=0.5)
        assert "not delivered" in warnings[-1] and "SECRET" not in warnings[-1], warnings[-1]
    finally:
        slow.close()


def test_a_url_without_scheme_is_not_echoed_by_urllibs_error():
    warnings = []
    notify = Notifier("hooks.example.com/services/T0SECRET", warn=warnings.append)
    notify("checkpoint", step=1)
    assert notify.close() is True
    assert len(warnings) == 1 and "unknown url type" in warnings[0] and "SECRET" not in warnings[0], warnings[0]
