import sys

from overnight.runs.launch import note_rank_exit, note_rank_started

# Before the heavy imports: a rank of `overnight train --devices N` says where the relayed signals go, sends its
# stderr (import errors included) to the supervisor's relay, and ends with the supervisor.
note_rank_started()

from overnight.commands.cli import main  # noqa: E402
code = 1  # what a rank that raised past main() left
try:
    code = main()
except SystemExit as exc:  # argparse's usage errors
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    raise
finally:
    note_rank_exit(code)
sys.exit(code)
