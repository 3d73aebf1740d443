import sys

from overnight.commands.cli import main
from overnight.runs.launch import note_rank_exit, note_rank_started

note_rank_started()  # a rank of `overnight train --devices N` says where the relayed signals go
code = 1  # what a rank that raised past main() left
try:
    code = main()
except SystemExit as exc:  # argparse's usage errors
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    raise
finally:
    note_rank_exit(code)
sys.exit(code)
