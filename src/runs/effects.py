"""The training loop's side effects for one run (overnight.train.loop.Effects): where its records, notifications,
predictions and checkpoints go. Rank 0 of a job (or the single process) writes the run directory; the other ranks of
a data-parallel job follow and write nothing."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from overnight.runs.checkpoint import CheckpointManager, NonFiniteWeights, export_adapter
from overnight.runs.portable import save_resumable
from overnight.train.progress import Progress, checkpoint_line


def _nothing(*args, **kwargs) -> None:
    pass


class RunEffects:
    """Rank 0's effects: metrics.jsonl and heartbeat.json (RunFiles, which also feeds TensorBoard / W&B), the
    webhook, predictions.jsonl, the console through the progress bar, and the checkpoints: the backend's resumable
    state (native and portable, SPEC §13) committed by the CheckpointManager's protocol (SPEC §7)."""

    def __init__(self, files, checkpoints: CheckpointManager, backend, progress: Progress, *, fingerprint: dict,
                 model_path: str, notify: Callable[..., None] = _nothing,
                 predict: Callable[[int], None] | None = None, say: Callable[[str], None] | None = None):
        self.files, self.checkpoints, self.backend, self.progress = files, checkpoints, backend, progress
        self.fingerprint, self.model_path = fingerprint, model_path
        self._notify, self._predict = notify, predict
        self._say = say or progress.write
        self.versions = backend.versions()  # recorded in every manifest

    def say(self, message: str) -> None:
        self._say(message)

    def event(self, kind: str, step: int, **fields) -> None:
        self.files.event(kind, step, **fields)

    def heartbeat(self, step: int, **fields) -> None:
        self.files.heartbeat(step, **fields)

    def notify(self, kind: str, **fields) -> None:
        self._notify(kind, **fields)

    def predict(self, step: int) -> None:
        if self._predict is not None:
            self._predict(step)

    def report_state(self) -> dict:
        return self.files.report_state()  # the W&B run id, so a resume continues the same W&B run

    def commit_checkpoint(self, step: int, trainer_state: dict, best_step: int | None) -> bool:
        try:
            path = self.checkpoints.save(step, lambda folder: save_resumable(self.backend, folder), trainer_state,
                                         self.fingerprint, self.versions)
        except NonFiniteWeights:
            return False
        self.files.event("checkpoint", step, path=str(path.relative_to(self.files.dir)))
        removed = self.checkpoints.rotate(best_step)
        self.notify("checkpoint", step=step)
        self.say(checkpoint_line(step, best_step, removed))
        return True

    def export_adapter(self, best_step: int | None) -> int | None:
        """The final adapter: the best-scored checkpoint when it is still there, else the newest good one. Without
        keep_best a checkpoint at the best step is chance (a signal's save lands there), so the newest it is: a
        resumed run must export what the uninterrupted one exports."""
        chosen = None
        if best_step is not None and self.checkpoints.keep_best:  # verified again (quarantined if it rotted)
            found = self.checkpoints.latest_valid(at_step=best_step)
            chosen = found.step if found else None
        if chosen is None:
            latest = self.checkpoints.latest_valid()
            chosen = latest.step if latest else None
        if chosen is not None:
            export_adapter(self.checkpoints.path_for(chosen), Path(self.files.dir),
                           getattr(self.backend, "adapter_format", None), self.model_path)
        return chosen


class FollowerEffects:
    """The effects of a rank other than 0 in a data-parallel job: rank 0 writes the job's one run directory and
    speaks for it, so this rank records, says and saves nothing (its failures still reach stderr)."""

    def __init__(self, progress: Progress):
        self.progress = progress

    say = event = heartbeat = notify = predict = _nothing

    def report_state(self) -> dict:
        return {}

    def commit_checkpoint(self, step: int, trainer_state: dict, best_step: int | None) -> bool:
        raise RuntimeError("only rank 0 commits checkpoints")

    def export_adapter(self, best_step: int | None) -> int | None:
        raise RuntimeError("only rank 0 exports the adapter")
