"""One training run's lifecycle and what it leaves on disk. `lifecycle` is `overnight train`: the checks before
anything is written, the resume plan, then a TrainingRun (open outputs -> set up the model -> the method's parts
-> restore -> train -> finish, cleanup in one place); `effects` is what the loop's side effects do for a run
(metrics, notifications, predictions, checkpoint commit, the final adapter); `resume` the resume policy (--fresh,
--auto-resume, the prompt, fingerprint and backend checks); `checkpoint` the commit protocol (SPEC §7);
`portable` the backend-neutral copy inside a checkpoint (SPEC §13); `fingerprint` what a checkpoint was trained
on; `lock` one owner per run directory; `rundir` metrics.jsonl, heartbeat.json and the files a run owns;
`launch` the `--devices` job under torchrun / mlx.launch; `console` and `signals` what a run prints and how
SIGTERM/SIGINT end it. Imports train, data, methods and the backend protocol, never a framework."""
