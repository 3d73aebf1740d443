"""The one training loop. It knows the Backend protocol, never a framework."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from overnight.backend import objectives
from overnight.backend import Batch, OutOfMemory
from overnight.runs.checkpoint import CheckpointManager, NonFiniteWeights, export_adapter
from overnight.distributed import Solo, agreed_flag, agreed_signal, step_batches
from overnight.runs.portable import save_resumable
from overnight.train.progress import checkpoint_line, eval_line
from overnight.train.schedule import lr_at
from overnight.train.scoring import BestTracker
from overnight.train.stopping import EarlyStopping, Stop, agreed_stop


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. out of memory at batch 1); the message says what to try."""


@dataclass
class Outcome:
    status: str  # completed | stopped | interrupted
    step: int
    exit_code: int = 0
    reason: str = ""
    best_step: int | None = None
    adapter_from: int | None = None


def _train_step_with_oom_fallback(backend, micro: list[Batch], lr: float, scales: tuple, splits: int, say) -> tuple:
    """Run one optimizer step; on OOM halve the micro-batch and double accumulation (same effective
    batch, same data) and try again, down to one row per micro-batch. In a data-parallel job the backend
    raises OutOfMemory on every rank when any rank ran out, so all ranks split together."""
    while True:
        pieces = [part for batch in micro for part in batch.split(splits)] if splits > 1 else micro
        try:
            return backend.train_step(pieces, lr, scales), splits
        except OutOfMemory:
            rows = max(p.num_rows // (2 if p.paired else 1) for p in pieces)
            if rows <= 1:
                raise TrainingError(
                    "out of memory even at one example per micro-batch; try model.grad_checkpoint=true, "
                    "a smaller model.max_seq_length, fewer lora.layers, or a smaller lora.rank") from None
            splits *= 2
            say(f"out of memory: micro-batch halved to about {max(1, rows // 2)} rows, accumulation doubled "
                f"(x{splits}); the effective batch is unchanged")


def train(cfg, backend, stream, validator, checkpoints: CheckpointManager, files, progress, *,
          fingerprint: dict, resume_state: dict | None = None, interrupted: Callable[[], int | None] = lambda: None,
          predict: Callable[[int], None] | None = None, notify: Callable[..., None] = lambda *a, **k: None,
          say: Callable[[str], None] = print, world=Solo()) -> Outcome:
    """``world``: this process's place in a data-parallel job (src/distributed.py). Every rank runs this same loop
    on the same global batches; rank 0 alone writes (files, checkpoints, predictions, the final adapter), and
    every decision that changes the control flow is agreed, so all ranks reach the same collectives."""
    t = cfg.train
    # A source that scores its own steps (grpo) has its own circuit breaker in place of the loss-unchanged rule.
    stopper, best = EarlyStopping(cfg.early_stopping, stuck_rule=not hasattr(stream, "after_step")), BestTracker()
    step, tokens_seen, elapsed, splits, owed = 0, 0, 0.0, 1, None
    if resume_state:  # everything the uninterrupted run would have had in memory at this step
        step, tokens_seen = resume_state["step"], resume_state["tokens_seen"]
        elapsed, splits = resume_state["elapsed_s"], resume_state["micro_splits"]
        stopper.restore(resume_state["early_stopping"])
        best.restore(resume_state["best"])
        stream.restore(resume_state["data"])
        owed = resume_state.get("owed")  # the end of a step a signal cut short: its eval (and stop), done first
    last_saved = step
    versions = backend.versions()

    def save_checkpoint(owe: dict | None = None) -> bool:
        """Commit this step (rank 0 writes; weights are the same on every rank). True if saved, False if the
        weights were not finite; raises what the save raised, on every rank."""
        world.barrier()  # every rank finished this step, so the checkpoint is the whole job's state
        outcome = 2.0  # 0 saved, 1 not finite, 2 rank 0's save raised
        try:
            if world.rank == 0:
                state = {"step": step, "tokens_seen": tokens_seen, "elapsed_s": elapsed, "micro_splits": splits,
                         "early_stopping": stopper.state(), "best": best.state(), "data": stream.state(),
                         "owed": owe, "world_size": world.size,
                         "report": files.report_state()}  # the W&B run id, so a resume continues the same W&B run
                try:
                    path = checkpoints.save(step, lambda folder: save_resumable(backend, folder), state, fingerprint,
                                            versions)
                except NonFiniteWeights:
                    outcome = 1.0
                else:
                    outcome = 0.0
                    files.event("checkpoint", step, path=str(path.relative_to(files.dir)))
                    removed = checkpoints.rotate(best.best_step)
                    notify("checkpoint", step=step)
                    say(checkpoint_line(step, best.best_step, removed))
            else:
                outcome = 0.0
        finally:  # also when rank 0's save raised: the others must not wait for it until the timeout
            outcome = float(world.all_max(np.array([outcome]))[0]) if world.size > 1 else outcome
        if outcome == 2.0:
            raise TrainingError("rank 0 could not save the checkpoint (its message says why)")
        if outcome == 1.0:
            say(f"the weights at step {step} are not finite, so they were not saved; "
                f"the last good checkpoint is step {last_saved}")
        return outcome == 0.0

    stop: Stop | None = None
    signal_code = None
    while step < t.max_steps or owed:
        if owed:  # resumed at a step whose eval a signal skipped: finish that step exactly as it would have ended
            stop, eval_due, owed = Stop(**owed["stop"]) if owed["stop"] else None, validator.enabled, None
            say(f"running the evaluation of step {step} that the interruption skipped")
        else:
            # The whole step's micro-batches from the one data order; this rank trains its share of them with
            # the whole step's normalisers (src/distributed.py), so a step is the same on any number of ranks.
            whole, micro = step_batches(stream, t.grad_accumulation, world, step, t.seed)
            scales = objectives.step_scales(cfg.data.method, whole)
            lr = lr_at(step, t)
            progress.step_started()
            result, new_splits = _train_step_with_oom_fallback(backend, micro, lr, scales, splits, say)
            if new_splits != splits:
                files.event("oom", step, micro_splits=new_splits)
                notify("oom", step=step, micro_splits=new_splits)
                splits = new_splits
            step_time = progress.step_finished()  # eval and save time never enter the ETA
            step += 1
            tokens_seen += sum(batch.num_target_tokens for batch in whole) if world.size > 1 else result.tokens
            elapsed += step_time
            # A source that scores its own steps (grpo: rewards, the dead-reward breaker) names the loss the run
            # tracks (loss_avg, plateau, checkpoint score) and may stop it; otherwise that is the step's loss.
            tracked, source_stop = stream.after_step(step, result) if hasattr(stream, "after_step") \
                else (result.loss, None)
            best.add_train_loss(tracked)
            memory = backend.memory()
            progress.update(step, result.loss, best.loss_avg(), step - last_saved, memory["memory_mb"],
                            memory.get("limit_mb"))
            if step % t.report_every == 0 or step == 1:
                files.event("train", step, loss=result.loss, loss_avg=best.loss_avg(), lr=lr, tokens=result.tokens,
                            tokens_per_sec=result.tokens / step_time if step_time > 0 else None,
                            grad_norm=result.grad_norm, memory_mb=memory["memory_mb"], elapsed_s=elapsed,
                            **(stream.step_stats() if hasattr(stream, "step_stats") else {}))
                files.heartbeat(step)
            stop = source_stop or stopper.after_step(step, tracked, result.grad_norm)
            if stop is None and stopper.check_due(step):
                stop = stopper.check_plateau(step, best.loss_avg())
            stop = agreed_stop(world, stop)
            # Validate on schedule and at the last step (max_steps, or a plateau stop) so the final weights
            # compete for best; never the weights of a broken run (non-finite, stuck, spiking).
            eval_due = validator.enabled and (stop is None or stop.code == "plateau") and (
                step % cfg.eval.every_steps == 0 or step == t.max_steps or stop is not None)

        new_best, owe = False, None
        if eval_due:
            try:  # a pending signal skips or cuts it short: a spot instance gives ~30 s, an eval can take minutes
                evaluation = validator.run(backend, cancelled=lambda: agreed_signal(world, interrupted()),
                                           say=say, world=world)
            except TrainingError:  # validation cannot fit even one row: keep this step's work, owe its eval
                if last_saved != step:
                    save_checkpoint({"stop": stop and vars(stop)})
                raise
            if evaluation is None and agreed_signal(world, interrupted()):
                owe = {"stop": stop and vars(stop)}  # the resumed run does this eval first, then the same stop
                say(f"interrupted: the evaluation of step {step} is skipped now and runs first on resume")
            elif evaluation:
                scores = best.score(evaluation["val_loss"])
                new_best = agreed_flag(world, best.offer(step, scores["score"], evaluation["val_loss"]))
                files.event("eval", step, **evaluation, **scores, best=new_best)
                say(eval_line(step, evaluation, scores["score"], new_best, best.best_step))
                notify("eval", step=step, val_loss=evaluation["val_loss"], best=new_best)
                if predict and not interrupted():  # non-critical: not owed when a signal came during the eval
                    predict(step)

        signal_code = agreed_signal(world, interrupted())
        # Save on schedule, at the end, at every stop, on a signal, and whenever a new best appears (so the
        # best is always a real checkpoint, whatever the checkpoint interval); not again at the step resumed
        # from (after an owed eval): that checkpoint plus the owed eval is this very state.
        if last_saved != step and (step % cfg.checkpoint.every_steps == 0 or step == t.max_steps or stop
                                   or signal_code or (new_best and cfg.checkpoint.keep_best)):
            if save_checkpoint(owe):
                last_saved = step
        if stop and not owe:  # with an eval owed, the stop is carried over to the resumed run
            say(f"stopping early: {stop.message}")
            files.event("stop", step, reason=stop.code, message=stop.message)
            notify("early_stopped", step=step, reason=stop.message)
            break
        if signal_code:
            files.event("interrupted", step, signal=signal_code - 128)
            return Outcome("interrupted", step, signal_code, f"signal {signal_code - 128}", best.best_step)

    # The final adapter: the best-scored checkpoint when it is still there, else the newest good one. Without
    # keep_best a checkpoint at the best step is chance (a signal's save lands there), so the newest it is: a resumed
    # run must export what the uninterrupted one exports.
    chosen = None
    if world.rank != 0:
        pass  # rank 0 exports it
    elif best.best_step is not None and cfg.checkpoint.keep_best:  # verified again (quarantined if it rotted)
        found = checkpoints.latest_valid(at_step=best.best_step)
        chosen = found.step if found else None
    if chosen is None and world.rank == 0:
        latest = checkpoints.latest_valid()
        chosen = latest.step if latest else None
    if chosen is not None:
        export_adapter(checkpoints.path_for(chosen), files.dir, getattr(backend, "adapter_format", None),
                       cfg.model.path)
    status = "stopped" if stop else "completed"
    reason = stop.message if stop else f"reached max_steps {t.max_steps}"
    return Outcome(status, step, 0, reason, best.best_step, chosen)
