"""What the user types: `cli` turns argv into a command and its exit code (SPEC §3); `status` (also
`checkpoints`), `report`, `fuse` and `validate_data` each implement one command, read-only on a run directory
except for the folder fuse writes. `overnight train` is overnight.runs.lifecycle, `overnight convert-adapter` is
overnight.backend.adapter_formats and `overnight models` is overnight.models.provided: cli dispatches to them.
Nothing below this package imports it."""
