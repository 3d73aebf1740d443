"""`overnight validate-data [PATH] [--method M] [--model DIR] [--max-seq-length N] [--set KEY=VALUE ...]`: the
pre-training data check.

PATH is what --data takes (JSONL, parquet, a datasets save_to_disk folder); a hub dataset is named with
--set data.hf_dataset.name=ORG/NAME instead, and --set data.columns=... maps column names as for train.
Prints rows per file and format, token-length statistics when a model folder is given, and every
problem as file:line (source and row, for data that is not JSONL). Returns 0 when the data is clean, 2 otherwise.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np

from overnight.backend.objectives import PAIRED
from overnight.config import build_config, unused_keys, validate
from overnight.data import DataError, check_data, find_data_files, load_tokenizer
from overnight.data.formats import (METHOD_FORMATS, detect_format, iter_lines, label_of, no_target_fix, parse_line,
                                    row_ref, where)
from overnight.methods.registry import method as method_of
from overnight.train.progress import DataCheckProgress


def infer_method(train_file: Path) -> str:
    """dpo for preference rows, sft for everything else (text rows also fit cpt)."""
    try:
        for _, _, content in iter_lines(train_file):
            row, err = parse_line(content)
            if err is None and detect_format(row) is not None:
                return "dpo" if detect_format(row) == "preference" else "sft"
    except OSError:
        pass
    return "sft"


def validate_data_main(path: str | None, method: str | None, model: str | None, max_seq_length: int | None = None,
                       out: Callable[[str], None] = print, sets: list[str] | None = None,
                       config: str | None = None) -> int:
    """``sets``: `--set KEY=VALUE` as for train (e.g. data.chat_template_kwargs, data.mask_prompt), so rows are
    checked as the run will encode them; ``config``: the run's YAML, read as train reads it (its data.path,
    data.method and a local model.path stand in for PATH, --method and --model). Chat templates that print today's
    date get today's: a run pins its start date instead, so lengths can differ by a token on another day."""
    # The config is refused or not for the method the run trains, as train refuses it.
    cfg = build_config(Path(config) if config else None, {"data.method": method} if method in METHOD_FORMATS else {},
                       sets)
    on_command_line = {item.partition("=")[0].strip() for item in sets or []}
    asked = "as asked" if method is not None or not config else f"data.method of {config}"
    if method is None and (config or "data.method" in on_command_line):
        method = cfg.data.method  # what train trains; only a bare check infers it from the rows
    if method is not None:
        for warning in cfg.warnings:  # train's start warnings, said before its refusals as train says them
            out(f"warning: {warning}")
    if config and not model and Path(cfg.model.path).expanduser().is_dir():
        model = cfg.model.path  # train tokenizes with a local model: the same length checks
    if config and path is None and not cfg.data.hf_dataset.name:
        path = cfg.data.path
    if max_seq_length is not None:
        cfg.model.max_seq_length = max_seq_length
    try:
        if max_seq_length is not None and (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int)
                                           or max_seq_length < 1):
            raise DataError(f"max_seq_length must be a whole number of tokens, at least 1 (got {max_seq_length!r})")
        hub = cfg.data.hf_dataset.name
        if path is None and not hub:
            raise DataError("no data named -> pass DIR_OR_FILE (what --data takes), or a hub dataset with "
                            "--set data.hf_dataset.name=ORG/NAME")
        if path is not None and hub:
            raise DataError(f"both {path} and data.hf_dataset.name={hub} name the data -> pass one of them")
        path = path if path is not None else cfg.data.path
        train_file, val_file = find_data_files(Path(path), cfg.data.columns, cfg.data.hf_dataset)
        if method is None:
            method, how = infer_method(train_file), "inferred from the rows; pass --method to check for another"
        elif method not in METHOD_FORMATS:
            raise DataError(f"unknown method '{method}' -> use one of {', '.join(METHOD_FORMATS)}")
        else:
            how = asked
        if how.startswith("inferred"):  # inferred: the config and train's warnings for that method
            cfg.data.method = method
            validate(cfg)
            for warning in unused_keys(cfg, on_command_line):
                out(f"warning: {warning}")
        if model:
            from overnight.models.provided import resolve_model_path

            model = resolve_model_path(model, out)
        tokenizer = load_tokenizer(Path(model), cfg.data.chat_template_kwargs) if model else None
        shown = DataCheckProgress()  # on stderr, and only for a file that takes more than a moment
        try:
            report = check_data(Path(path), method, tokenizer=tokenizer, cfg=cfg, on_progress=shown)
        finally:
            shown.done()
        if report.ok:  # what train checks next (grpo: the fields its rewards read), or the data is not ready
            method_of(method).check(cfg, train_file, val_file)
    except DataError as exc:
        out(f"error: {exc}")
        return 2

    out(f"data: {f'hub dataset {hub}' if hub else path} (method {method}, {how})")
    for f in report.files:
        fmt = f"{f.format} format" if f.format else "format unknown"
        blank = f", {f.blank_lines} blank line(s) skipped" if f.blank_lines else ""
        label = label_of(f.path)
        copy = f" (rows counted from 1; read through the JSONL copy {f.path})" \
            if label is not None and not label.lines else ""
        out(f"  {where(f.path)}: {f.rows} valid row(s), {fmt}{blank}{copy}")
        if f.lengths is not None and len(f.lengths):
            unit = "tokens per pair (longer side)" if method in PAIRED else "tokens per row"
            too_long = f"{f.too_long} longer than max_seq_length {cfg.model.max_seq_length}"
            if f.too_long and not report.packing:
                too_long += " (would be truncated)" if cfg.data.truncate else " (would be dropped)"
            out(f"    {unit}: min {int(f.lengths.min())}, median {int(np.median(f.lengths))}, "
                f"max {int(f.lengths.max())}; {too_long}")
            if f.no_targets:
                out(f"    {f.no_targets} with no target token within max_seq_length {cfg.model.max_seq_length} "
                    f"(e.g. {row_ref(f.path, f.no_target_line)}; they would train nothing): "
                    f"{no_target_fix(f, cfg.data.mask_prompt)}")
    if tokenizer is None:
        out("  (pass --model DIR for token-length statistics)")
    if report.ok:
        out("no problems: the data is ready to train")
        return 0
    out(f"{report.problem_count} problem(s):")
    for problem in report.problems:
        out(f"  {problem}")
    hidden = report.problem_count - len(report.problems)
    if hidden:
        out(f"  ... and {hidden} more not listed")
    return 2


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m overnight.commands.validate_data")
    p.add_argument("path", nargs="?")
    p.add_argument("--method", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--max-seq-length", type=int, default=None)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    sys.exit(validate_data_main(a.path, a.method, a.model, a.max_seq_length, sets=a.set))
