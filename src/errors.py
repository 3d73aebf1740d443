"""Exit codes (SPEC §3) and the errors a user mistake raises; the CLI maps them, nothing else prints them."""
from __future__ import annotations

EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_RESUME_REFUSED = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class UsageError(Exception):
    """Bad usage, config or data: exit 2."""


class ResumeRefused(Exception):
    """Exit 3."""


class RunLocked(ResumeRefused):
    """Another process owns the run directory: exit 3, naming it."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. out of memory at batch 1); the message says what to try. Exit 1, with the
    message and no traceback."""
