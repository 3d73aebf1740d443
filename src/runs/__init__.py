"""One training run's lifecycle and what it leaves on disk. `lifecycle` assembles a run (plan the resume -> build
the method's parts -> restore -> train -> finish, cleanup in one place); `resume` is the resume policy (--fresh,
--auto-resume, the prompt, fingerprint and backend checks); `checkpoint` the commit protocol (write, fsync,
manifest, COMMIT, rename, verify, quarantine, rotate, export); `portable` the backend-neutral copy inside a
checkpoint (SPEC §13); `fingerprint` what a checkpoint was trained on; `lock` one owner per run directory;
`rundir` metrics.jsonl, heartbeat.json and the files a run owns; `launch` the `--devices` job under torchrun /
mlx.launch and its exit codes. Imports train, data, methods and the backend protocol, never a framework."""
