"""Webhook notifications (SPEC §8): job_started, eval, checkpoint, early_stopped, oom, job_completed, job_failed,
and from the supervisor of an unattended run (overnight.runs.supervise) restart and restarts_exhausted.

Non-critical: a slow or failing webhook never stops training and is warned about once. Events are sent
in order by one background thread; at exit, close() waits a bounded time so that the last events
(job_completed, job_failed), posted just before the process ends, are still delivered."""
from __future__ import annotations

import json
import queue
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request

POST_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 10.0  # the most the end of a run waits for undelivered events


def safe_url(url: str) -> str:
    """The URL as it may be printed: scheme, host and port only. Webhook URLs are credentials (Slack, Discord
    and most others put the token in the path, some in the query or in user:password@), and warnings end up
    in logs that are shared."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(webhook_url, not shown)"
    hidden = "/..." if parts.path.strip("/") or parts.query or parts.fragment else ""
    return f"{parts.scheme or '?'}://{host}{port}{hidden}"


class Notifier:
    def __init__(self, url: str | None, warn=None):
        self.url = url
        self._warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
        self._warned = False
        self._queue: queue.Queue = queue.Queue()
        self._thread = None
        if url:
            # A daemon thread so a hung webhook can never keep the process alive; close() joins it.
            self._thread = threading.Thread(target=self._deliver, name="overnight-webhook", daemon=True)
            self._thread.start()

    def __call__(self, event: str, **fields) -> None:
        if self._thread is None:
            return
        body = {"event": event, "host": socket.gethostname(), "time": time.time(), **fields}
        self._queue.put(json.dumps(body, default=str).encode())

    def _deliver(self) -> None:
        while True:
            body = self._queue.get()
            if body is None:
                return
            try:
                request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
                urllib.request.urlopen(request, timeout=POST_TIMEOUT_S).close()
            except Exception as exc:  # noqa: BLE001 (non-critical by contract)
                if not self._warned:
                    self._warned = True
                    # urllib names the whole URL in some errors (ValueError: unknown url type: '...').
                    why = str(exc).replace(self.url, safe_url(self.url))
                    self._warn(f"warning: webhook {safe_url(self.url)} failed ({why}); training goes on")

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Deliver what is queued, waiting at most ``timeout`` seconds; True when nothing was left behind."""
        if self._thread is None:
            return True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._warn(f"warning: webhook {safe_url(self.url)}: some events were not delivered "
                       f"within {timeout:.0f}s of exit")
            return False
        return True
