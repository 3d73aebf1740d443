"""`overnight fuse`: a checkpoint's adapter merged into its base, written as a standalone model in the format of
the backend the run trained with.

A reward run (`--method reward`) fuses into a standalone sequence-classification folder instead: the merged
decoder without its LM head, the score head as ``score.weight``, and a config.json naming the base's class with
ForCausalLM -> ForSequenceClassification, one label and the pad id the scores were read at
(sequence_classifier_config), which AutoModelForSequenceClassification opens on its own.

The core chooses and verifies the checkpoint (the same manifest sha256 check a resume makes, read-only: nothing
is quarantined), checks that the base model is still the one the run trained on, and hands the merge to the
backend's exporter (backends/<name>_export.py, found through the registry in src/backend/__init__.py) in a child process,
so this process never imports a framework (SPEC §2). The exporter writes into a temporary folder beside
``--output``, which is renamed into place only when complete.

Exit codes: 0 fused; 2 bad usage (missing run directory, unreadable STEP, --output in use, base model gone or
unreadable, backend not installed); 3 refused (no valid checkpoint to fuse, or the base model changed since
training); 1 the exporter failed unexpectedly.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from overnight.backend import BACKENDS, EXPORTERS, _installed
from overnight.runs.checkpoint import STEP_DIR, CheckpointInfo, CheckpointManager, disk_full
from overnight.backend.adapter_formats import MLX_HEAD_WEIGHTS, REWARD_HEAD, _human_size, check_output_dir, \
    convert_adapter, detect_format, write_folder_atomically
from overnight.errors import EXIT_CRASH, EXIT_OK, EXIT_RESUME_REFUSED, EXIT_SIGINT, UsageError
from overnight.runs.fingerprint import _model_identity
from overnight.fsutil import sha256_file
from overnight.runs.rundir import read_metrics

# What a fused folder takes from its base besides the weights: tokenizer, chat template, generation defaults,
# and the model code of trust_remote_code models.
BASE_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "chat_template*", "generation_config.json", "*.tiktoken", "tiktoken.model", "*.py")
CHAT_TEMPLATE_DIR = "additional_chat_templates"
GGUF_NAME = "model.gguf"
# mlx-lm's GGUF writer (mlx_lm/gguf.py, reached through mlx_lm.fuse --export-gguf) knows these model types only.
MLX_GGUF_MODEL_TYPES = ("llama", "mistral", "mixtral")
LLAMA_CPP = "https://github.com/ggml-org/llama.cpp"


class NoValidCheckpoint(Exception):
    """Nothing verifiable to fuse: exit 3."""


class ExportFailed(RuntimeError):
    """The exporter stopped without a result: exit 1, with what it said."""


class DiskFull(ExportFailed):
    """The disk filled up while the fused model (as large as the base) was written: exit 1, said as that, with no
    traceback; the partial folder is removed like any failed write."""


# The exporter's exit code for a full disk (2 is its refusal, 1 a crash), so the fuse can say what to do about it
EXPORT_DISK_FULL = 4


@dataclass
class Chosen:
    info: CheckpointInfo
    why: str  # how it was chosen, for the summary line


class ExportRefused(Exception):
    """A known reason an exporter (backends/*_export.py) cannot make the merge: exit 2 with one line."""


def run_export_job(export, argv: list[str]) -> int:
    """An exporter child process's main: read the job file, export, write the result file; a refusal (or a
    config error) is one line on stderr and exit 2, anything else a crash with its traceback (exit 1)."""
    from overnight.config import ConfigError

    _exit_with_parent()
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        result = export(job)
    except (ExportRefused, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - a full disk is said as one; anything else is a crash, re-raised
        if not disk_full(exc, Path(job["output"]).parent):
            raise
        print(f"error: {exc.__class__.__name__}: {exc}", file=sys.stderr, flush=True)
        return EXPORT_DISK_FULL
    Path(job["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


def _exit_with_parent() -> None:
    """End this exporter when the `overnight fuse` that started it is gone (SIGKILL, a closed terminal): nobody is
    left to rename what it writes, and the next fuse removes that temporary folder, which it must not be filling."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="overnight-fuse-parent-watch", daemon=True).start()


def copy_base_files(base_dir: Path, output: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation config of ``base_dir`` into ``output`` as they are (a
    library's save_pretrained would rewrite them, e.g. transformers 5 names a tokenizer class older versions
    lack)."""
    copied = []
    for pattern in BASE_FILE_PATTERNS:
        for source in sorted(Path(base_dir).glob(pattern)):
            if source.is_file():
                (output / source.name).write_bytes(source.read_bytes())
                copied.append(source.name)
    # A model's named chat templates (tool_use, rag, ...) live in a folder of their own (transformers'
    # CHAT_TEMPLATE_DIR): without it apply_chat_template(chat_template="tool_use") fails on the fused model.
    for source in sorted((Path(base_dir) / CHAT_TEMPLATE_DIR).glob("*.jinja")):
        if source.is_file():
            (output / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
            (output / CHAT_TEMPLATE_DIR / source.name).write_bytes(source.read_bytes())
            copied.append(f"{CHAT_TEMPLATE_DIR}/{source.name}")
    return sorted(set(copied))


# -- choosing the checkpoint ----------------------------------------------------------------------------------

def recorded_best_step(run_dir: Path, newest: CheckpointInfo) -> int | None:
    """The best checkpoint the run recorded: the newest valid checkpoint's best-model state, or the run's end
    event when the run evaluated once more after that checkpoint (what `overnight checkpoints` marks)."""
    best = CheckpointManager.trainer_state(newest.path).get("best")
    step = best.get("best_step") if isinstance(best, dict) else None
    ends = [r for r in read_metrics(run_dir) if r.get("event") == "end"]
    if ends and isinstance(ends[-1].get("step"), int) and ends[-1]["step"] >= newest.step:
        step = ends[-1].get("best_step", step)
    return step if isinstance(step, int) else None


def parse_choice(choice: str) -> str | int:
    if choice in ("best", "latest"):
        return choice
    try:
        step = int(choice)
    except ValueError:
        raise UsageError(f"--checkpoint must be best, latest or a step number, not {choice!r}") from None
    if step < 0:
        raise UsageError(f"--checkpoint {choice}: a step number is 0 or more")
    return step


def choose_checkpoint(run_dir: Path, choice: str | int) -> Chosen:
    manager = CheckpointManager(run_dir, log=lambda message: None)
    listing = f"see: overnight checkpoints {run_dir}"
    if isinstance(choice, int):
        path = manager.path_for(choice)
        if not path.is_dir():
            steps = [step for step, _ in manager._step_dirs()]
            have = f"checkpoints at steps {', '.join(map(str, steps))}" if steps else "no checkpoints"
            raise NoValidCheckpoint(f"{run_dir} has no checkpoint at step {choice} ({have}; {listing})")
        ok, why = manager.verify(path)
        if not ok:
            raise NoValidCheckpoint(f"the checkpoint at step {choice} ({path}) does not verify: {why}. Choose "
                                    f"another ({listing})")
        return Chosen(CheckpointInfo(choice, path, True), f"step {choice}, as asked")
    skipped: list[CheckpointInfo] = []
    newest = manager.latest_valid(read_only=True, skipped=skipped)
    if newest is None:
        invalid = "".join(f"; {i.path.name} is invalid ({i.why})" for i in skipped)
        raise NoValidCheckpoint(f"{run_dir} has no valid checkpoint to fuse{invalid or ' (none was saved yet)'}")
    notes = "".join(f"; newer {i.path.name} is invalid ({i.why})" for i in skipped)
    if choice == "latest":
        return Chosen(newest, f"the latest valid checkpoint{notes}")
    best = recorded_best_step(run_dir, newest)
    if best is None:
        return Chosen(newest, f"no best recorded (no evaluation ran), so the latest valid checkpoint{notes}")
    if best == newest.step:
        return Chosen(newest, "the best checkpoint")
    path = manager.path_for(best)
    if not path.is_dir():
        return Chosen(newest, f"the best checkpoint (step {best}) is gone, so the latest valid one{notes}")
    ok, why = manager.verify(path)
    if not ok:
        return Chosen(newest, f"the best checkpoint (step {best}) does not verify ({why}), so the latest valid "
                              f"one{notes}")
    return Chosen(CheckpointInfo(best, path, True), "the best checkpoint")


# -- what the run trained on ----------------------------------------------------------------------------------

def _run_config(run_dir: Path) -> dict:
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _trained_on(chosen: Chosen, run_dir: Path) -> dict:
    manifest = CheckpointManager.manifest(chosen.info.path)
    fingerprint = manifest.get("fingerprint") or {}
    run_config = _run_config(run_dir)
    model_section = run_config.get("model") or {}
    quant = model_section.get("quantization") or {}
    recorded = fingerprint.get("config") or {}
    adapter = chosen.info.path / "adapter"
    backend = fingerprint.get("backend") or {"mlx": "mlx", "peft": "torch"}[detect_format(adapter)]
    return {
        "backend": backend,
        "model_path": _base_path(fingerprint.get("model_path") or model_section.get("path"), adapter),
        "model_identity": fingerprint.get("model"),
        "bits": recorded.get("model.quantization.bits", quant.get("bits", 0)) or 0,
        "group_size": recorded.get("model.quantization.group_size", quant.get("group_size", 64)),
    }


def _base_path(recorded: str | None, adapter: Path) -> str | None:
    """The base as the run recorded it, unless that is a relative path that means nothing from here (`--model
    runs/tiny-model` typed in another folder): then the absolute path the adapter recorded, if it is a folder.
    _check_base still proves it is the model the run trained on."""
    if not recorded or Path(recorded).expanduser().is_absolute() or Path(recorded).expanduser().is_dir():
        return recorded
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return recorded
    noted = config.get("base_model_name_or_path") or config.get("model") if isinstance(config, dict) else None
    return noted if isinstance(noted, str) and Path(noted).is_absolute() and Path(noted).is_dir() else recorded


def _check_base(base: str, identity: dict | None, given: bool) -> None:
    """The base must be the model the adapter was trained on: the same config.json and weight files (by name and
    size, as the resume fingerprint compares them), wherever the folder now lives."""
    folder = Path(base).expanduser()
    trained_locally = isinstance(identity, dict) and "config_and_weights" in identity
    if not folder.is_dir():
        if given or trained_locally:
            raise UsageError(f"the base model folder {base} does not exist"
                             + ("" if given else " (the run trained on it); pass --base DIR with the same model"))
        return  # a hub id: the exporter loads it from the local cache
    if trained_locally and _model_identity(str(folder)) != identity:
        raise NoValidCheckpoint(f"the base model in {folder} is not the one this run trained on (config.json or "
                                "weight files differ); fusing the adapter into another model would give a wrong "
                                "model. Pass --base DIR with the original model")


# -- the exporter ---------------------------------------------------------------------------------------------

def _verified_adapter_copy(checkpoint: Path, scratch: Path) -> Path:
    """Copy the checkpoint's adapter and check the copy against the manifest: the bytes merged are the bytes
    verified, even if a run still training rotates that checkpoint away meanwhile."""
    files = CheckpointManager.manifest(checkpoint).get("files", {})
    copy = scratch / "adapter"
    try:
        shutil.copytree(checkpoint / "adapter", copy)
    except OSError as exc:
        if disk_full(exc, scratch, by_free_space=False):
            raise DiskFull(f"disk full copying the adapter into {scratch} ({exc}); free some space in "
                           f"{scratch.parent} (or point TMPDIR elsewhere) and run fuse again") from None
        raise NoValidCheckpoint(f"{checkpoint / 'adapter'} could not be read ({exc}); run fuse again") from None
    for file in sorted(p for p in copy.rglob("*") if p.is_file()):
        meta = files.get("adapter/" + file.relative_to(copy).as_posix())
        if meta is None or sha256_file(file) != meta["sha256"]:
            raise NoValidCheckpoint(f"{checkpoint / 'adapter'} changed while it was read (a training run rotating "
                                    "its checkpoints?); run fuse again")
    return copy


def _run_exporter(backend: str, job: dict, scratch: Path) -> dict:
    module = EXPORTERS[backend]
    job_path, result_path = scratch / "job.json", scratch / "result.json"
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps(job | {"result": str(result_path)}), encoding="utf-8")
    env = dict(os.environ, TOKENIZERS_PARALLELISM=os.environ.get("TOKENIZERS_PARALLELISM", "false"))
    with subprocess.Popen([sys.executable, "-m", module, str(job_path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL) as proc:
        try:
            while True:
                # Woken twice a second: a Ctrl-C the kernel delivered to another thread of this process (a
                # library's) only sets Python's flag, and a wait with no timeout would not see it until the
                # exporter ends (a fuse took minutes to answer Ctrl-C, once in the test suite's full run).
                try:
                    _, stderr = proc.communicate(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        except BaseException:
            proc.kill()
            raise
    said = (stderr or "").strip()
    if proc.returncode == EXPORT_DISK_FULL:
        lines = [line for line in said.splitlines() if line.startswith("error: ")]
        raise DiskFull(lines[-1][len("error: "):] if lines else said[-1000:])
    if proc.returncode == 2:  # the exporter's own refusal, one line starting "error: "
        lines = [line for line in said.splitlines() if line.startswith("error: ")]
        raise UsageError(lines[-1][len("error: "):] if lines else said[-1000:])
    if proc.returncode != 0 or not result_path.is_file():
        raise ExportFailed(f"the {backend} exporter ({module}) failed with exit code {proc.returncode}:\n"
                           f"{said[-3000:]}")
    return json.loads(result_path.read_text(encoding="utf-8"))


def llama_cpp_command(folder: Path, dtype: str) -> str:
    outtype = {"bfloat16": "bf16", "float32": "f32"}.get(dtype, "f16")
    return f"python llama.cpp/convert_hf_to_gguf.py {folder} --outfile {folder / GGUF_NAME} --outtype {outtype}"


def fuse(run_dir: Path, choice: str, output: Path, dequantize: bool = False, gguf: bool = False,
         base: str | None = None, say: Callable[[str], None] = print) -> dict:
    _check_run_dir(run_dir)
    step_choice = parse_choice(choice)
    check_output_dir(output)
    reward = _is_reward_run(run_dir)
    _refuse_reward_gguf(run_dir, reward and gguf)
    chosen = choose_checkpoint(run_dir, step_choice)
    # The adapter says so too (a run whose config.yaml is gone or was edited): its head must never be dropped.
    reward = reward or _has_score_head(chosen.info.path / "adapter")
    _refuse_reward_gguf(run_dir, reward and gguf)
    trained = _trained_on(chosen, run_dir)
    backend, written_by = _exporter_here(trained["backend"]), trained["backend"]
    base_path = base or trained["model_path"]
    if not base_path:
        raise UsageError(f"the checkpoint in {chosen.info.path} does not record its base model; pass --base DIR")
    _check_base(base_path, trained["model_identity"], given=base is not None)

    gguf_by_mlx = bool(gguf) and backend == "mlx" and _mlx_writes_gguf(base_path, trained, dequantize)

    if backend != written_by:
        say(f"note: checkpoint step {chosen.info.step} was written by the {written_by} backend, which is not "
            f"installed here: its adapter is converted exactly (as convert-adapter does) and fused by the {backend} "
            "exporter")
    say(f"fusing {run_dir} checkpoint step {chosen.info.step} ({chosen.why}; verified) into {base_path} "
        f"with the {backend} exporter")
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="overnight-fuse-") as scratch:
        adapter = _verified_adapter_copy(chosen.info.path, Path(scratch))
        adapter = _in_format_of(backend, adapter, Path(scratch), str(base_path), written_by)
        job = {"base": str(base_path), "adapter": str(adapter), "dequantize": bool(dequantize), "gguf": gguf_by_mlx,
               "gguf_name": GGUF_NAME, "bits": int(trained["bits"] or 0),
               "group_size": int(trained["group_size"] or 64), "reward": reward}
        try:
            write_folder_atomically(output, lambda folder: result.update(
                _run_exporter(backend, job | {"output": str(folder)}, Path(scratch))), say)
        except (DiskFull, OSError) as exc:
            if not isinstance(exc, DiskFull) and not disk_full(exc, output.parent, by_free_space=False):
                raise
            raise DiskFull(f"disk full while writing the fused model beside {output} ({exc}); the partial folder was "
                           f"removed. The fused model takes about {_human_size(_weights_size(base_path))} (the "
                           f"base's weight files): free that much in {output.parent.resolve()} or give --output on "
                           "another disk") from None
    result["step"] = chosen.info.step
    say(f"fused model: {output} ({result['format']}, {result['weights']})")
    if result.get("note"):
        say(f"note: {result['note']}")
    if (backend == "torch" or reward) and dequantize:
        say(f"note: --dequantize changes nothing for a {'reward' if reward else 'torch'} run: its fused model is "
            "always full precision")
    if gguf:
        _say_gguf(output, backend, result, gguf_by_mlx, say)
    return result


def _weights_size(base: str) -> int:
    """Bytes of the base's weight files: about what a fused model takes (a hub id's cached folder is not looked up)."""
    folder = Path(base).expanduser()
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern)
               if p.is_file()) if folder.is_dir() else 0


def _is_reward_run(run_dir: Path) -> bool:
    return (_run_config(run_dir).get("data") or {}).get("method") == "reward"


def _has_score_head(adapter: Path) -> bool:
    """A reward model's adapter: either format's with reward_head.json, or PEFT's SEQ_CLS (adapter_formats.py)."""
    if (adapter / REWARD_HEAD).is_file() or (adapter / MLX_HEAD_WEIGHTS).is_file():
        return True
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # read again, and refused by name, where the exporter needs it
    return isinstance(config, dict) and config.get("task_type") == "SEQ_CLS"


def _refuse_reward_gguf(run_dir: Path, refused: bool) -> None:
    if refused:
        raise UsageError(f"{run_dir} trained a reward model (data.method reward): --gguf writes a causal LM for "
                         "llama.cpp, which has no place for its score head; fuse it without --gguf (a "
                         "sequence-classification folder for transformers)")


def sequence_classifier_config(base_config: dict, architecture: str, pad_token_id: int) -> dict:
    """config.json of a fused reward model: the base's, naming ``architecture`` (the model type's
    ForSequenceClassification class) with one label, and the pad id training read the score before
    (objectives.score_positions: transformers' sequence classifiers read it the same way from config.pad_token_id).
    Quantization keys go: the fused weights are full precision."""
    config = {k: v for k, v in base_config.items() if k not in ("quantization", "quantization_config")}
    config.update(architectures=[architecture], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                  pad_token_id=int(pad_token_id))
    return config


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a run directory (no such folder)")
    step_folder = STEP_DIR.match(run_dir.resolve().name)
    if step_folder and run_dir.resolve().parent.name == "checkpoints":
        raise UsageError(f"{run_dir} is one checkpoint; give the run directory and the step: overnight fuse "
                         f"{run_dir.resolve().parent.parent} --checkpoint {int(step_folder.group(1))} --output ...")


def _exporter_here(backend: str) -> str:
    """The backend whose exporter fuses: the one that wrote the checkpoint, or, when only the other is installed
    here (a portable run moved from the Mac to a GPU box, its best checkpoint still mlx's), that other one: the
    adapter crosses exactly (_in_format_of), and each exporter merges into the Hugging Face base as its backend
    trains on it."""
    other = {"mlx": "torch", "torch": "mlx"}.get(backend)
    if (backend in EXPORTERS and not _installed(BACKENDS[backend][2]) and other in EXPORTERS
            and _installed(BACKENDS[other][2])):
        return other
    _check_exporter(backend)
    return backend


def _in_format_of(backend: str, adapter: Path, scratch: Path, base: str, written_by: str) -> Path:
    """``adapter`` in the format ``backend``'s exporter reads (PEFT for torch, mlx-lm's for mlx), converted in
    ``scratch`` when the checkpoint was written by the other backend."""
    want = "peft" if backend == "torch" else "mlx"
    if detect_format(adapter) == want:
        return adapter
    try:
        return convert_adapter(adapter, want, scratch / f"adapter-{want}", base, say=lambda _: None)
    except UsageError as exc:
        raise UsageError(f"the checkpoint's adapter was written by the {written_by} backend, which is not installed "
                         f"here, and it cannot be converted for the {backend} exporter: {exc}. Fuse it where "
                         f"{written_by} is installed, or choose a checkpoint the {backend} backend wrote "
                         "(--checkpoint latest or STEP; see overnight checkpoints RUN_DIR)") from None


def _check_exporter(backend: str) -> None:
    """The run's backend must have an exporter and be installed here: the fused model is written by it."""
    if backend not in EXPORTERS:
        raise UsageError(f"the run trained with backend {backend!r}; fuse knows {', '.join(sorted(EXPORTERS))}")
    if not _installed(BACKENDS[backend][2]):
        extra = "mlx" if backend == "mlx" else "cuda"
        raise UsageError(f"the run trained with the {backend} backend, which is not installed here: "
                         f"pip install 'overnight[{extra}]'")


def _mlx_writes_gguf(base_path: str, trained: dict, dequantize: bool) -> bool:
    """Whether mlx-lm's exporter can write the GGUF itself (its model types, unquantized only); refused before
    any work when only --dequantize stands in the way."""
    base_config = Path(base_path).expanduser() / "config.json"
    model_type = json.loads(base_config.read_text())["model_type"] if base_config.is_file() else None
    quantized = bool(trained["bits"]) or (base_config.is_file() and "quantization" in json.loads(
        base_config.read_text()))
    gguf_by_mlx = model_type in MLX_GGUF_MODEL_TYPES
    if gguf_by_mlx and quantized and not dequantize:
        raise UsageError("mlx-lm's GGUF export writes unquantized models only, and this run's base is "
                         "quantized: add --dequantize (the fused folder is then full precision as well)")
    return gguf_by_mlx


def _say_gguf(output: Path, backend: str, result: dict, gguf_by_mlx: bool, say: Callable[[str], None]) -> None:
    """Where the GGUF is, or why it is not here and the llama.cpp command that makes it."""
    if gguf_by_mlx:
        say(f"GGUF (mlx-lm's exporter): {output / GGUF_NAME}")
        return
    why = ("transformers has no GGUF writer" if backend == "torch" else
           f"mlx-lm's GGUF export supports model types {', '.join(MLX_GGUF_MODEL_TYPES)} only")
    folder_note = (" (llama.cpp reads full-precision weights: fuse again with --dequantize first)"
                   if result.get("quantized") else "")
    say(f"GGUF: not written here ({why}). Make it with llama.cpp's converter ({LLAMA_CPP}){folder_note}:\n"
        f"  git clone {LLAMA_CPP} && pip install -r llama.cpp/requirements.txt\n"
        f"  {llama_cpp_command(output, result.get('dtype', 'float16'))}")


def fuse_main(run_dir: str, choice: str, output: str, dequantize: bool, gguf: bool, say: Callable[[str], None],
              base: str | None = None) -> int:
    try:
        fuse(Path(run_dir), choice, Path(output), dequantize, gguf, base, say)
    except NoValidCheckpoint as exc:
        print(f"fuse refused: {exc}", file=sys.stderr, flush=True)
        return EXIT_RESUME_REFUSED
    except ExportFailed as exc:
        print(f"error: {exc}\nnothing was written to {output}", file=sys.stderr, flush=True)
        return EXIT_CRASH
    except KeyboardInterrupt:  # the exporter is killed and its temporary folder removed on the way here
        print(f"\nfuse interrupted; nothing was written to {output}", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    return EXIT_OK
