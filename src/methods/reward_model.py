"""A reward model as a GRPO reward: grpo.rewards=[reward_model=PATH] (SPEC §9, RLHF).

PATH is one of
  (a) a Hugging Face sequence-classification model folder with one label: config.json whose ``architectures`` ends in
      ForSequenceClassification, one label (id2label / num_labels), safetensors weights holding the head
      ``score.weight`` (1, hidden), tokenizer files (what `overnight fuse` of a reward run writes);
  (b) a PEFT LoRA adapter with task_type SEQ_CLS (adapter_config.json, adapter_model.safetensors holding the LoRA
      weights and the head ``base_model.model.score.weight`` from modules_to_save) whose base_model_name_or_path is a
      local model folder (what a torch reward run saves as its adapter);
  (b') an mlx reward adapter (an mlx reward run's adapter: mlx-lm's adapters.safetensors + adapter_config.json, the
      head as ``score.weight`` in score_head.safetensors, reward_head.json beside them), read on either backend
      (torch builds the PEFT model it stands for);
  (c) a reward run directory (`overnight train --method reward`): its final adapter, RUN_DIR/adapter, as (b) or
      (b'), on the base its config.yaml names (model.path) when the adapter's own base path is not a local folder.
Everything is checked here before any work, by reading JSON and safetensors headers only (ConfigError, exit 2,
naming PATH and what is wrong); the weights are loaded once, when the run binds the reward to its backend.

Scoring is TRL's GRPOTrainer with a reward model (trl 1.16.0, GRPOTrainer._calculate_rewards): a conversation
(chat rows: the prompt's messages + the completion's assistant message) is rendered through the reward model's own
tokenizer's chat template (no generation prompt), a plain prompt is the prompt text + the completion text; the texts
are tokenized by the reward model's tokenizer without added special tokens, right-padded with its pad token (its eos
when it names none, as TRL sets it), and the score is the head's output at the rightmost position whose token is not
the pad token (transformers' rule in GenericForSequenceClassification.forward: objectives.score_positions, the
reward method's own), without gradients, on the training backend.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from overnight.backend import OutOfMemory, reward_scorer
from overnight.backend.adapter_formats import MLX_HEAD_WEIGHTS, REWARD_HEAD, read_reward_head
from overnight.backend.objectives import score_positions
from overnight.config import ConfigError
from overnight.errors import UsageError
from overnight.train.loop import TrainingError

NAME = "reward_model"
HEAD = "score.weight"  # transformers' decoder-only sequence classifiers (GenericForSequenceClassification.score)
PEFT_HEAD = "base_model.model.score.weight"  # the same head saved by PEFT from modules_to_save
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MLX_ADAPTER_WEIGHTS = "adapters.safetensors"  # mlx-lm's adapter file (LoRA only); the head in MLX_HEAD_WEIGHTS as HEAD
# The fingerprint hashes weight files up to this size whole; a bigger one by its size and its first and last
# SAMPLE bytes (a retrained model of the same shape differs there too: the head is stored last, and a LoRA merge
# changes every block), so a resume does not read a 14 GB model.
WHOLE_HASH_LIMIT = 64 << 20
SAMPLE = 4 << 20


def _fail(spec: str, what: str) -> ConfigError:
    return ConfigError(f"config key 'grpo.rewards': {spec}: {what}")


def _read_json(spec: str, path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _fail(spec, f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _fail(spec, f"{path} is not a JSON object")
    return data


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header (the weights are not read). ValueError if unreadable."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        if size > 100 << 20:
            raise ValueError("the header length is implausible")
        header = json.loads(handle.read(size))
    return {name: list(meta["shape"]) for name, meta in header.items() if name != "__metadata__"}


def _shapes(spec: str, files: list[Path]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            shapes.update(safetensors_shapes(path))
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise _fail(spec, f"{path} is not a readable safetensors file ({exc.__class__.__name__}: {exc})") from None
    return shapes


def _weight_files(spec: str, folder: Path, what: str) -> list[Path]:
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != ADAPTER_WEIGHTS)
    if not files:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise _fail(spec, f"{what} {folder} has no safetensors weights" + (
            f" (only {', '.join(other[:3])}): save it with safetensors (save_pretrained's default)" if other else ""))
    return files


def _label_count(config: dict) -> int | None:
    """Labels the config declares (transformers: len(id2label), else num_labels); None when it says nothing."""
    for holder in (config, config.get("text_config") or {}):
        if isinstance(holder.get("id2label"), dict):
            return len(holder["id2label"])
        if isinstance(holder.get("num_labels"), int):
            return holder["num_labels"]
    return None


def _hidden_size(config: dict) -> int | None:
    for holder in (config, config.get("text_config") or {}):
        if isinstance(holder.get("hidden_size"), int):
            return holder["hidden_size"]
    return None


def _check_head(spec: str, where: Path, shape: list[int] | None, key: str, hidden: int | None) -> None:
    if shape is None:
        raise _fail(spec, f"{where} holds no score head ({key}): it is not a trained sequence classifier")
    if len(shape) != 2 or shape[0] != 1:
        raise _fail(spec, f"{where}: the score head {key} has shape {shape}, i.e. {shape[0]} labels; a reward "
                          "model has exactly one (num_labels=1), whose output is the reward")
    if hidden is not None and shape[1] != hidden:
        raise _fail(spec, f"{where}: the score head {key} reads {shape[1]} features but the model's hidden_size is "
                          f"{hidden}: the head belongs to another model")


def _check_tokenizer(spec: str, folder: Path) -> None:
    if not (folder / "tokenizer.json").is_file():
        raise _fail(spec, f"{folder} has no tokenizer.json: the reward model scores text with its own tokenizer, so "
                          "its folder needs the Hugging Face tokenizer files (tokenizer.save_pretrained(folder))")


@dataclass(frozen=True)
class Located:
    """Where a reward model's parts are: ``model_dir`` holds config.json and the weights (the base, for an adapter);
    ``adapter_dir`` an adapter on it (PEFT SEQ_CLS, or an mlx reward adapter: ``adapter_format``), or None;
    ``tokenizer_dir`` the tokenizer files."""

    spec: str
    kind: str  # "model", "adapter" or "run"
    model_dir: Path
    adapter_dir: Path | None
    tokenizer_dir: Path
    label: str  # the reward's name in metrics.jsonl: the folder's name, as TRL names a reward model
    adapter_format: str | None = None  # "peft" or "mlx"


def locate(arg: str, spec: str | None = None) -> Located:
    """PATH of reward_model=PATH, checked: ConfigError (exit 2) naming it and what is wrong."""
    spec = spec or f"{NAME}={arg}"
    path = Path(arg).expanduser()
    if not arg.strip():
        raise _fail(spec, "reward_model needs a path: reward_model=PATH (a sequence-classification model folder, a "
                          "PEFT SEQ_CLS adapter folder, or a reward run directory)")
    if not path.exists():
        raise _fail(spec, f"no such folder {path} (relative paths are from the working directory {Path.cwd()})")
    if not path.is_dir():
        raise _fail(spec, f"{path} is a file; give the folder that holds the reward model")
    path = path.resolve()
    if (path / ADAPTER_CONFIG).is_file():
        return _adapter(spec, path, None, "adapter", _name(path))
    if (path / "config.json").is_file():
        return _classifier(spec, path)
    if (path / "config.yaml").is_file() and ((path / "adapter").is_dir() or (path / "checkpoints").is_dir()):
        return _run(spec, path)
    raise _fail(spec, f"{path} is neither a model folder (no config.json), a PEFT adapter (no {ADAPTER_CONFIG}) nor "
                      "an overnight run directory (no config.yaml and adapter/)")


def _name(path: Path) -> str:
    # an adapter folder is usually called "adapter": the run (or model) it belongs to is the name a person knows
    return path.parent.name if path.name == "adapter" and path.parent.name else path.name


def _classifier(spec: str, path: Path) -> Located:
    config = _read_json(spec, path / "config.json")
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise _fail(spec, f"{path} is not a sequence classifier (config.json architectures: "
                          f"{architectures or 'none'}): a reward model is an XxxForSequenceClassification with one "
                          "label, e.g. a reward run (`overnight train --method reward`) or its `overnight fuse` output")
    labels = _label_count(config)
    if labels is not None and labels != 1:
        raise _fail(spec, f"{path} is a classifier with {labels} labels (config.json id2label/num_labels); a reward "
                          "model has exactly one label, whose output is the reward")
    shapes = _shapes(spec, _weight_files(spec, path, "the model folder"))
    _check_head(spec, path, shapes.get(HEAD), HEAD, _hidden_size(config))
    _check_tokenizer(spec, path)
    return Located(spec, "model", path, None, path, _name(path))


def _adapter(spec: str, path: Path, run_base: str | None, kind: str, label: str) -> Located:
    config = _read_json(spec, path / ADAPTER_CONFIG)
    if (path / MLX_ADAPTER_WEIGHTS).is_file():
        return _mlx_adapter(spec, path, config, run_base, kind, label)
    if config.get("task_type") != "SEQ_CLS":
        what = f"task_type {config.get('task_type')!r}" if config.get("task_type") else "no task_type"
        raise _fail(spec, f"{path} is a PEFT adapter with {what}, not a sequence classifier (task_type SEQ_CLS): a "
                          "reward model's adapter is saved by a reward run (`overnight train --method reward`)")
    if config.get("peft_type", "LORA") != "LORA":
        raise _fail(spec, f"{path}: peft_type {config.get('peft_type')!r}; overnight scores with LoRA adapters only")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise _fail(spec, f"{path} has no {ADAPTER_WEIGHTS} (adapter weights in safetensors)")
    try:
        read_reward_head(path, "peft")  # optional (PEFT's own SEQ_CLS adapters have none), but sound if there
    except UsageError as exc:
        raise _fail(spec, str(exc)) from None
    base = _adapter_base(spec, path, config.get("base_model_name_or_path"), run_base)
    base_config = _read_json(spec, base / "config.json")
    _check_head(spec, weights, _shapes(spec, [weights]).get(PEFT_HEAD), PEFT_HEAD, _hidden_size(base_config))
    _weight_files(spec, base, "the adapter's base model")
    tokenizer_dir = path if (path / "tokenizer.json").is_file() else base
    _check_tokenizer(spec, tokenizer_dir)
    return Located(spec, kind, base, path, tokenizer_dir, label, "peft")


def _mlx_adapter(spec: str, path: Path, config: dict, run_base: str | None, kind: str, label: str) -> Located:
    try:
        head = read_reward_head(path, "mlx")
    except UsageError as exc:
        raise _fail(spec, str(exc)) from None
    if head is None:
        raise _fail(spec, f"{path} is an mlx-lm adapter without a score head (no {REWARD_HEAD} and "
                          f"{MLX_HEAD_WEIGHTS}): a causal LM's adapter, not a reward model's (--method reward)")
    base = _adapter_base(spec, path, config.get("model"), run_base)
    weights = path / MLX_HEAD_WEIGHTS
    if not weights.is_file():
        raise _fail(spec, f"{path}: {REWARD_HEAD} names a score head in {MLX_HEAD_WEIGHTS}, which is missing: copy "
                          "the whole adapter folder")
    _check_head(spec, weights, _shapes(spec, [weights]).get(HEAD), HEAD,
                _hidden_size(_read_json(spec, base / "config.json")))
    _weight_files(spec, base, "the adapter's base model")
    tokenizer_dir = path if (path / "tokenizer.json").is_file() else base
    _check_tokenizer(spec, tokenizer_dir)
    return Located(spec, kind, base, path, tokenizer_dir, label, "mlx")


def _adapter_base(spec: str, adapter: Path, recorded: Any, run_base: str | None) -> Path:
    """The local base folder of an adapter: its base_model_name_or_path (as given, or beside the adapter), else
    the run's model.path."""
    tried = []
    for text in (recorded, run_base):
        if not isinstance(text, str) or not text:
            continue
        for candidate in (Path(text).expanduser(), adapter / text):
            if (candidate / "config.json").is_file():
                return candidate.resolve()
        tried.append(text)
    named = " or ".join(repr(t) for t in tried) or "nothing (no base_model_name_or_path)"
    raise _fail(spec, f"the adapter {adapter} is for base model {named}, which is not a local model folder: put the "
                      "base model there, or set base_model_name_or_path in its adapter_config.json to the local "
                      "folder (a hub id must be downloaded first)")


def _run(spec: str, path: Path) -> Located:
    import yaml

    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise _fail(spec, f"{path / 'config.yaml'} cannot be read ({exc})") from None
    method = (config.get("data") or {}).get("method")
    if method != "reward":
        raise _fail(spec, f"the run {path} trained method {method!r}, not a reward model (--method reward)")
    adapter = path / "adapter"
    if not adapter.is_dir():
        raise _fail(spec, f"the reward run {path} has no final adapter yet (adapter/ appears when the run "
                          "finishes): wait for it, or give one of its checkpoints' adapter folders, "
                          f"{path}/checkpoints/step-N/adapter")
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise _fail(spec, f"{adapter} has no {ADAPTER_CONFIG}")
    return _adapter(spec, adapter, (config.get("model") or {}).get("path"), "run", path.name)


# -- the fingerprint ------------------------------------------------------------------------------------------------

def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}".encode())
    with open(path, "rb") as handle:
        if size <= WHOLE_HASH_LIMIT:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(handle.read(SAMPLE))
            handle.seek(size - SAMPLE)
            digest.update(handle.read(SAMPLE))
    return digest.hexdigest()


def identity(loc: Located) -> str:
    """What a reward model is, for the resume's fingerprint: its config, adapter config, tokenizer files and
    weights by content (whole files up to WHOLE_HASH_LIMIT, bigger ones by size and their first and last SAMPLE
    bytes), never its path, so a copied folder is the same model and a retrained one is not."""
    digest = hashlib.sha256()
    folders = [loc.model_dir] + ([loc.adapter_dir] if loc.adapter_dir else []) + [loc.tokenizer_dir]
    for folder in dict.fromkeys(folders):
        for name in ("config.json", ADAPTER_CONFIG, REWARD_HEAD, "tokenizer.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                digest.update(name.encode() + (folder / name).read_bytes())
        for weights in sorted(folder.glob("*.safetensors")):
            digest.update(_file_digest(weights).encode())
    return digest.hexdigest()


def identities(specs: list[str]) -> dict[str, str]:
    """{spec: identity} of the reward models among grpo.rewards (empty without one)."""
    out = {}
    for spec in specs:
        name, _, arg = spec.strip().partition("=")
        if name.strip() == NAME:
            out[spec.strip()] = identity(locate(arg.strip(), spec.strip()))
    return out


# -- scoring --------------------------------------------------------------------------------------------------------

def right_padded(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int64 (B, T), attention_mask int64 (B, T)) as a tokenizer pads on the right (T >= 1)."""
    width = max([len(r) for r in rows] + [1])
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


def scoring_pad_id(tok) -> int | None:
    """The pad token a reward model's batches are padded with and its score position skips: its tokenizer's pad
    token, else its eos (TRL sets pad_token = eos_token for a reward tokenizer without one)."""
    pad = tok._id_of("pad_token", None)
    return pad if pad is not None else tok._id_of("eos_token", None)


def is_conversational(prompt: Any) -> bool:
    """TRL's is_conversational for a prompt: a list of messages (dicts with a role)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


class RewardModel:
    """The reward function (TRL's signature) of one reward model; bind() loads it on the run's backend."""

    def __init__(self, arg: str, spec: str):
        self.located = locate(arg, spec)
        self.__name__ = self.key = self.located.label
        self.tok = None
        self.pad_id: int | None = None
        self._scorer = None
        self._chunk = 0  # rows per backend call after an out of memory (0: all at once)

    def bind(self, backend, template_kwargs: dict | None = None, template_now=None, dtype: str = "auto") -> None:
        """Load the tokenizer and the model on ``backend`` (once per process)."""
        from overnight.data.tokenizer import load_tokenizer

        loc = self.located
        self.tok = load_tokenizer(loc.tokenizer_dir, template_kwargs, template_now)
        self.pad_id = scoring_pad_id(self.tok)
        if self.pad_id is None:
            raise _fail(loc.spec, f"the tokenizer in {loc.tokenizer_dir} names neither a pad token nor an eos token, "
                                  "so a batch of completions cannot be padded; set pad_token in its "
                                  "tokenizer_config.json")
        self._scorer = reward_scorer(backend, loc.model_dir, loc.adapter_dir, loc.adapter_format, dtype, loc.spec)

    def texts(self, prompts: list, completions: list, tools: list | None = None) -> list[str]:
        """What the reward model reads: a conversation through the chat template (with the row's tools, as the
        policy saw them), else prompt + completion as plain text."""
        if prompts and is_conversational(prompts[0]):
            tools = tools or [None] * len(prompts)
            return [self.tok.apply_chat_template(list(p) + list(c), tools=t)
                    for p, c, t in zip(prompts, completions, tools)]
        return [str(p) + (c if isinstance(c, str) else str(c[-1].get("content", ""))) for p, c in
                zip(prompts, completions)]

    def __call__(self, prompts: list, completions: list, **fields) -> list[float]:
        if self._scorer is None:
            raise RuntimeError(f"{self.located.spec} was not bound to a backend (rewards.bind)")
        texts = self.texts(prompts, completions, fields.get("tools"))
        rows = [self.tok.encode(text, add_special_tokens=False) for text in texts]
        return self.score_rows(rows).tolist()

    def score_rows(self, rows: list[list[int]]) -> np.ndarray:
        """Scores of token-id rows, all in one backend call, or in halves, quarters, ... after an out of memory
        (kept for the rest of the process: a row's score does not depend on the rows beside it)."""
        out = np.zeros(len(rows), dtype=np.float64)
        start = 0
        while start < len(rows):
            size = self._chunk or len(rows)
            part = rows[start:start + size]
            ids, mask = right_padded(part, self.pad_id)
            try:
                out[start:start + size] = self._scorer.score(ids, mask, score_positions(ids, self.pad_id))
            except OutOfMemory:
                if size <= 1:
                    raise TrainingError(f"out of memory scoring one completion with {self.located.spec}: lower "
                                        "grpo.max_new_tokens, or use a smaller reward model") from None
                self._chunk = max(1, size // 2)
                continue
            start += size
        return out
