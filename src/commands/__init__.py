"""What the user types: one module per `overnight` command. `cli` turns argv into a command and its exit code
(SPEC §3); `fuse`, `convert_adapter`, `report`, `status` (also `checkpoints`) and `validate_data` each implement one
command, read-only on a run directory except fuse's and convert-adapter's own output folder. `overnight train`
itself is `overnight.runs.lifecycle`. Nothing here is imported by the layers below (runs, train, data, methods)."""
