"""The one training loop. It knows the Backend protocol and the two objects it is handed — a BatchSource
(overnight.data.source) and the run's Effects (below) — never a framework, the terminal or the run directory."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Protocol

import numpy as np

from overnight.backend import Batch, OutOfMemory, objectives
from overnight.data.prefetch import Prefetched, prefetching
from overnight.data.source import BatchSource
from overnight.distributed import Solo, agreed_flag, agreed_signal, step_batches
from overnight.errors import TrainingError
from overnight.train.memory import MicroSplits, SwapWatch
from overnight.train.progress import Progress, eval_line
from overnight.train.schedule import lr_at
from overnight.train.scoring import BestTracker
from overnight.train.stopping import EarlyStopping, Stop, agreed_stop

__all__ = ["Effects", "Outcome", "SaveOutcome", "TrainingError", "train"]


class Effects(Protocol):
    """Everything the loop does outside its own memory, handed in by overnight.runs (runs.effects.RunEffects): the
    loop decides *when* to record, notify, predict or save; this object knows *how and where*. Rank 0's writes the
    run directory; the other ranks' write nothing."""

    progress: Progress

    def say(self, message: str) -> None:
        """A line for the person reading the log (through the progress bar)."""

    def event(self, kind: str, step: int, **fields) -> None:
        """One metrics.jsonl record (and the trackers'); non-critical."""

    def heartbeat(self, step: int, **fields) -> None:
        """The run is alive at this step (``fields``: what it is about to do); non-critical."""

    def notify(self, kind: str, **fields) -> None:
        """A webhook notification; non-critical."""

    def predict(self, step: int) -> None:
        """Sample generations after an eval (predictions.jsonl); non-critical, a no-op when not enabled."""

    def report_state(self) -> dict:
        """What the trackers need to continue after a resume (the W&B run id), kept in the checkpoint."""

    def commit_checkpoint(self, step: int, trainer_state: dict, best_step: int | None) -> bool:
        """Rank 0: commit the backend's state and ``trainer_state`` as the checkpoint of ``step``, then rotate.
        False when the weights are not finite (nothing written); raises what the save raised."""

    def export_adapter(self, best_step: int | None) -> int | None:
        """Rank 0, at the end: write the final adapter from the chosen checkpoint; the step it came from."""


@dataclass
class Outcome:
    status: str  # completed | stopped | interrupted
    step: int
    exit_code: int = 0
    reason: str = ""
    best_step: int | None = None
    adapter_from: int | None = None


class SaveOutcome(IntEnum):
    """How a checkpoint save ended. Ranks agree on the worst one (the all-reduce takes the largest value)."""

    SAVED = 0
    NOT_FINITE = 1  # the weights were not finite: nothing was written, the last good checkpoint stands
    FAILED = 2  # rank 0's save raised (its exception says why)


def train(cfg, backend, source: BatchSource, validator, effects: Effects, *, resume_state: dict | None = None,
          interrupted: Callable[[], int | None] = lambda: None, world=Solo(),
          split_at: tuple[int, int] | None = None) -> Outcome:
    """``world``: this process's place in a data-parallel job (overnight.distributed). Every rank runs this same loop
    on the same global batches; rank 0 alone writes (through ``effects``), and every decision that changes the
    control flow is agreed, so all ranks reach the same collectives.

    ``split_at``: (step, micro_splits) a supervisor asks for because the process died twice in a row during that
    step (overnight.runs.supervise): that step starts with the micro-batch split at least that many ways.

    One function on purpose (nanoGPT's shape): the order of train, record, stop, eval, save and stop again is the
    contract that makes a resumed run identical to an uninterrupted one, and it is easiest to check read at once
    (_loop; this wrapper only owns the data thread)."""
    # The next step's micro-batches are built on a thread while this one trains (a source that allows it: not grpo,
    # whose batches need the current weights), so a fast device never waits for tokenizing. The same batches in the
    # same order; checkpoints record the position after the last batch the loop took. The thread ends however the
    # loop ends: finished, a signal, an exception.
    feed = prefetching(source, max(2, cfg.train.grad_accumulation * world.size))
    try:
        return _loop(cfg, backend, feed, validator, effects, resume_state=resume_state, interrupted=interrupted,
                     world=world, split_at=split_at)
    finally:
        if isinstance(feed, Prefetched):
            feed.stop()


def _loop(cfg, backend, source: BatchSource, validator, effects: Effects, *, resume_state: dict | None,
          interrupted: Callable[[], int | None], world, split_at: tuple[int, int] | None) -> Outcome:
    t, say = cfg.train, effects.say
    stopper, best = EarlyStopping(cfg.early_stopping, stuck_rule=not source.scores_own_steps), BestTracker()
    step, tokens_seen, elapsed, owed = 0, 0, 0.0, None
    # The micro-batch split and when it last had to split: recorded, so a resumed run regrows at the same step.
    splits, swap = MicroSplits(t.oom_regrow_steps), SwapWatch(t.swap_patience)
    if resume_state:  # everything the uninterrupted run would have had in memory at this step
        step, tokens_seen = resume_state["step"], resume_state["tokens_seen"]
        elapsed = resume_state["elapsed_s"]
        splits.restore(resume_state)
        stopper.restore(resume_state["early_stopping"])
        best.restore(resume_state["best"])
        source.restore(resume_state["data"])
        owed = resume_state.get("owed")  # the end of a step a signal cut short: its eval (and stop), done first
    last_saved = step

    def save(owe: dict | None = None) -> bool:
        def trainer_state() -> dict:  # everything above, at this step (rank 0 writes it)
            return {"step": step, "tokens_seen": tokens_seen, "elapsed_s": elapsed, **splits.state(),
                    "early_stopping": stopper.state(), "best": best.state(), "data": source.state(), "owed": owe,
                    "world_size": world.size, "report": effects.report_state()}

        saved = _save_agreed(world, effects, step, trainer_state, best.best_step) is SaveOutcome.SAVED
        if not saved:
            say(f"the weights at step {step} are not finite, so they were not saved; "
                f"the last good checkpoint is step {last_saved}")
        return saved

    # The train event of the step just trained, until written: every report_every steps, and always at a step the
    # run ends on (max_steps, a stop, a signal, a validation that cannot fit), so metrics.jsonl, TensorBoard and W&B
    # end where the run did. Its fields are the step's own figures, never re-read later.
    unreported: dict | None = None

    def report_step() -> None:
        nonlocal unreported
        if unreported is not None:
            effects.event("train", step, **unreported)
            effects.heartbeat(step)
            unreported = None

    stop: Stop | None = None
    while step < t.max_steps or owed:
        if owed:  # resumed at a step whose eval a signal skipped: finish that step exactly as it would have ended
            stop, eval_due, owed = Stop(**owed["stop"]) if owed["stop"] else None, validator.enabled, None
            swap_split = False
            say(f"running the evaluation of step {step} that the interruption skipped")
        else:
            # The whole step's micro-batches from the one data order; this rank trains its share of them with
            # the whole step's normalisers (overnight.distributed), so a step is the same on any number of ranks.
            whole, micro = step_batches(source, t.grad_accumulation, world, step, t.seed)
            lr = lr_at(step, t)
            if splits.regrow_due(step):  # the same on every rank: a pure function of the recorded state
                was = splits.regrow()
                effects.event("oom_regrow", step, micro_splits=1, previous_splits=was)
                say(f"{t.oom_regrow_steps} steps without running out of memory at x{was}: trying the original "
                    f"micro-batch again")
            if split_at is not None and step + 1 == split_at[0] and split_at[1] > splits.splits:
                _split_after_repeated_crash(splits, split_at[1], micro, step, effects)
            # Before the step, what a supervisor needs if this process dies in it (SIGKILL, a Metal abort).
            effects.heartbeat(step, training_step=step + 1, micro_splits=splits.splits)
            effects.progress.step_started()
            result, new_splits = _train_step_with_oom_fallback(
                backend, micro, lr, objectives.step_scales(cfg.data.method, whole, cfg.grpo.loss_type),
                splits.splits, say)
            if new_splits != splits.splits:
                splits.split(step, new_splits)
                swap.reset()
                effects.event("oom", step, micro_splits=new_splits)
                effects.notify("oom", step=step, micro_splits=new_splits)
            step_time = effects.progress.step_finished()  # eval and save time never enter the ETA
            step += 1
            tokens_seen += sum(batch.num_target_tokens for batch in whole) if world.size > 1 else result.tokens
            elapsed += step_time
            # The source names the loss the run tracks (loss_avg, plateau, checkpoint score): the step's loss, or
            # for a source that scores its own steps (grpo) its reward figure, with its own breaker's stop.
            tracked, source_stop = source.after_step(step, result)
            best.add_train_loss(tracked)
            memory = backend.memory()
            effects.progress.update(step, result.loss, best.loss_avg(), step - last_saved, memory["memory_mb"],
                                    memory.get("limit_mb"),
                                    reward=source.step_stats().get("reward") if source.scores_own_steps else None)
            swap_split = _watch_swap(swap, splits, world, effects, step, step_time, memory, whole)
            unreported = dict(loss=result.loss, loss_avg=best.loss_avg(), lr=lr, tokens=result.tokens,
                              tokens_per_sec=result.tokens / step_time if step_time > 0 else None,
                              grad_norm=result.grad_norm, memory_mb=memory["memory_mb"], elapsed_s=elapsed,
                              **source.step_stats())
            if step % t.report_every == 0 or step == 1 or step == t.max_steps:
                report_step()
            stop = source_stop or stopper.after_step(step, tracked, result.grad_norm)
            if stop is None and stopper.check_due(step):
                stop = stopper.check_plateau(step, best.loss_avg())
            stop = agreed_stop(world, stop)
            if stop:
                report_step()
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
                report_step()
                if last_saved != step:
                    save({"stop": stop and vars(stop)})
                raise
            if evaluation is None and agreed_signal(world, interrupted()):
                owe = {"stop": stop and vars(stop)}  # the resumed run does this eval first, then the same stop
                say(f"interrupted: the evaluation of step {step} is skipped now and runs first on resume")
            elif evaluation:
                scores = best.score(evaluation["val_loss"], overfit_gap=not source.scores_own_steps)
                new_best = agreed_flag(world, best.offer(step, scores["score"], evaluation["val_loss"]))
                effects.event("eval", step, **evaluation, **scores, best=new_best)
                say(eval_line(step, evaluation, scores["score"], new_best, best.best_step))
                effects.notify("eval", step=step, val_loss=evaluation["val_loss"], best=new_best)
                if not interrupted():  # non-critical: not owed when a signal came during the eval
                    effects.predict(step)

        signal_code = agreed_signal(world, interrupted())
        if signal_code:
            report_step()
        # Save on schedule, at the end, at every stop, on a signal, and whenever a new best appears (so the
        # best is always a real checkpoint, whatever the checkpoint interval); not again at the step resumed
        # from (after an owed eval): that checkpoint plus the owed eval is this very state.
        if last_saved != step and (step % cfg.checkpoint.every_steps == 0 or step == t.max_steps or stop
                                   or signal_code or swap_split or (new_best and cfg.checkpoint.keep_best)):
            if save(owe):
                last_saved = step
        if stop and not owe:  # with an eval owed, the stop is carried over to the resumed run
            say(f"stopping early: {stop.message}")
            effects.event("stop", step, reason=stop.code, message=stop.message)
            effects.notify("early_stopped", step=step, reason=stop.message)
            break
        if signal_code:
            effects.event("interrupted", step, signal=signal_code - 128)
            return Outcome("interrupted", step, signal_code, f"signal {signal_code - 128}", best.best_step)

    chosen = effects.export_adapter(best.best_step) if world.rank == 0 else None
    status = "stopped" if stop else "completed"
    reason = stop.message if stop else f"reached max_steps {t.max_steps}"
    return Outcome(status, step, 0, reason, best.best_step, chosen)


def _save_agreed(world, effects: Effects, step: int, trainer_state: Callable[[], dict],
                 best_step: int | None) -> SaveOutcome:
    """Commit this step: rank 0 writes (the weights are the same on every rank) and every rank learns how it went,
    so all raise together when the save failed instead of waiting for rank 0 until the collective timeout."""
    world.barrier()  # every rank finished this step, so the checkpoint is the whole job's state
    outcome = SaveOutcome.FAILED
    try:
        if world.rank == 0:
            saved = effects.commit_checkpoint(step, trainer_state(), best_step)
            outcome = SaveOutcome.SAVED if saved else SaveOutcome.NOT_FINITE
        else:
            outcome = SaveOutcome.SAVED
    finally:  # also when rank 0's save raised: the others must not wait for it until the timeout
        if world.size > 1:
            outcome = SaveOutcome(int(world.all_max(np.array([float(outcome)]))[0]))
    if outcome is SaveOutcome.FAILED:
        raise TrainingError("rank 0 could not save the checkpoint (its message says why)")
    return outcome


def _watch_swap(swap: SwapWatch, splits: MicroSplits, world, effects: Effects, step: int, step_time: float,
                memory: dict, whole: list[Batch]) -> bool:
    """Feed the step to the swap watch; True when the run should save now because the micro-batch was just split.
    The watch sees this rank's clock and memory, so in a job rank 0's verdict is every rank's."""
    verdict = swap.after_step(step_time, memory["memory_mb"], memory.get("limit_mb"))
    if world.size > 1:
        codes = (None, "warn", "split")
        verdict = codes[int(world.broadcast(np.array([float(codes.index(verdict))]))[0])]
    if verdict is None:
        return False
    typical = swap.median_s()
    figures = dict(step_time_s=step_time, median_step_s=typical, memory_mb=memory["memory_mb"],
                   limit_mb=memory.get("limit_mb"))
    if verdict == "warn":
        effects.say(f"warning: steps take over {swap.ratio:g}x their usual time with memory near the limit "
                    f"({memory['memory_mb']:.0f} of {memory.get('limit_mb') or 0:.0f} MB): the machine is likely "
                    f"swapping; after {swap.patience} such steps in a row the micro-batch is split")
        effects.event("swap", step, **figures)
        effects.notify("swap", step=step, **figures)
        return False
    rows = max(part.num_rows // (2 if part.paired else 1) for batch in whole for part in batch.split(splits.splits))
    if rows <= 1:
        effects.say("warning: still swapping at one example per micro-batch; try model.grad_checkpoint=true or "
                    "a smaller model.max_seq_length")
        return False
    splits.split(step, splits.splits * 2)
    effects.say(f"swapping for {swap.patience} steps: saving, then the micro-batch is halved to about "
                f"{max(1, rows // 2)} rows, accumulation doubled (x{splits.splits}); the effective batch is unchanged")
    effects.event("swap_split", step, micro_splits=splits.splits, **figures)
    effects.notify("oom", step=step, micro_splits=splits.splits, cause="swap")
    return True


ONE_ROW_OOM = ("out of memory even at one example per micro-batch; try model.grad_checkpoint=true, a smaller "
               "model.max_seq_length, fewer lora.layers, or a smaller lora.rank")


def _split_after_repeated_crash(splits, wanted: int, micro: list[Batch], step: int, effects: Effects) -> None:
    """The process died twice in a row during this step (a Metal out-of-memory aborts from C++, so the in-process
    fallback never ran): split it like an out of memory would, recorded in the checkpoint and as an oom event."""
    was = splits.splits
    new = was
    while new < wanted:
        pieces = [part for batch in micro for part in (batch.split(new) if new > 1 else [batch])]
        if max(p.num_rows // (2 if p.paired else 1) for p in pieces) <= 1:
            if new == was:
                raise TrainingError(ONE_ROW_OOM)
            break
        new *= 2
    splits.split(step, new)
    effects.say(f"the process died twice in a row during step {step + 1}: this step runs with the micro-batch split "
                f"{new} ways (accumulation x{new}); the effective batch is unchanged")
    effects.event("oom", step, micro_splits=new, previous_splits=was, cause="repeated crash")
    effects.notify("oom", step=step, micro_splits=new, cause="repeated crash")


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
                raise TrainingError(ONE_ROW_OOM) from None
            splits *= 2
            say(f"out of memory: micro-batch halved to about {max(1, rows // 2)} rows, accumulation doubled "
                f"(x{splits}); the effective batch is unchanged")
