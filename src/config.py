"""The config: one dataclass tree, loaded as defaults < YAML < flags < --set, validated in one place."""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in the config: the CLI prints it and exits 2."""


@dataclass
class QuantizationConfig:
    bits: int = 4  # 0 = no quantization (plain LoRA); 4 = QLoRA; 8 = 8-bit base
    group_size: int = 64


@dataclass
class ModelConfig:
    path: str = ""  # local Hugging Face / MLX folder, or a hub id
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    # The dtype of every weight that is not quantized (embeddings, norms, output head) and of the activations.
    # auto: torch bf16 on a GPU that has it natively, else float32; mlx the dtype the checkpoint was saved in.
    dtype: str = "auto"
    # How the loss takes the output head's log-probs at the target positions: chunked (overnight's own, a chunk of
    # positions at a time, every backend and device) or liger (Liger-Kernel's fused linear cross-entropy: torch on
    # a CUDA GPU with the liger-kernel package). Not a training key: both compute the same values up to rounding.
    loss_kernel: str = "chunked"


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    layers: int = 16  # the last N transformer blocks; -1 = all
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # An adapter folder (PEFT or mlx-lm; a run's adapter/, a checkpoint) whose LoRA weights start this run instead
    # of the seeded ones, like mlx-lm's --resume-adapter-file: a new run, optimizer and schedule from step 0. Its
    # content is in the fingerprint (src/runs/init_adapter.py), not compared as a config key.
    init_from: str | None = None
    # DoRA (weight-decomposed LoRA): a trained magnitude per output row on top of the LoRA update, computed as PEFT
    # computes it on both backends (src/backend/lora_init.py, DORA).
    use_dora: bool = False


@dataclass
class HfDatasetConfig:
    """A dataset datasets.load_dataset fetches (once, into the Hugging Face cache) instead of data.path."""

    name: str | None = None  # a hub id (org/name), or anything load_dataset takes (a local dataset folder)
    config: str | None = None  # the dataset's configuration (load_dataset's second argument), if it has several
    train_split: str = "train"
    val_split: str | None = None  # None: validation, val, valid or test, the first the dataset has


@dataclass
class DataConfig:
    # A folder with train.jsonl (and val.jsonl / valid.jsonl), train.parquet, the hub's parquet shards or a
    # datasets.save_to_disk folder; or a .jsonl / .parquet file (src/data/sources.py). Not read with hf_dataset.
    path: str = "data"
    method: str = "sft"
    streaming: bool = True
    packing: bool | None = None  # None = on for cpt, off otherwise
    mask_prompt: bool = True
    truncate: bool = True  # rows longer than max_seq_length: truncate (True) or drop (False)
    # Extra variables for every chat template rendering (training rows, GRPO and prediction prompts, validate-data),
    # as transformers' apply_chat_template(**kwargs): e.g. {enable_thinking: false} for Qwen3.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # The user's column names for the row keys, e.g. {prompt: question, completion: answer}; any source, JSONL too.
    columns: dict[str, str] = field(default_factory=dict)
    hf_dataset: HfDatasetConfig = field(default_factory=HfDatasetConfig)


@dataclass
class TrainConfig:
    batch_size: int = 8
    grad_accumulation: int = 1
    max_steps: int = 2000
    # Passes over the training data instead of max_steps (one or the other): max_steps is then derived from the
    # data's rows (packed blocks for cpt), the batch, accumulation and processes when the run starts.
    epochs: float | None = None
    learning_rate: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # the schedule decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 = no clipping (both backends)
    optimizer: str = "adamw"  # adamw | paged_adamw_8bit (torch on CUDA only)
    # torch on CUDA: torch.use_deterministic_algorithms (strict) for the whole run, so its gradients (attention's
    # backward above all) are bit-reproducible too and a resume continues exactly; a model op with no deterministic
    # CUDA kernel is then refused by this key, naming the op. Its cost is not measured on a GPU yet. The losses' own
    # sums are deterministic either way. Not a training key: either value trains the same model, so it may change
    # between a run and its resume. mlx and torch on the CPU have no such mode to switch: false is said at the start
    # there as changing nothing.
    deterministic: bool = True
    seed: int = 42
    report_every: int = 10  # steps between metrics.jsonl train lines and heartbeat rewrites
    # After an out-of-memory split, steps without another one before the original micro-batch is tried again
    # (0: the split stays for the rest of the run).
    oom_regrow_steps: int = 200
    # Steps in a row over 3x the median step time with memory near the device's limit (a slide into swap) before
    # the run saves and splits the micro-batch as on an out of memory (0: warn only). 10 such steps are ~30 normal
    # steps' time lost, while a single slow step (a GC pause, another app) never adds up to ten in a row.
    swap_patience: int = 10
    # Data parallel (torchrun / mlx.launch): a collective waiting longer than this means another process of the job
    # died or hangs, and every process stops with a message instead of waiting forever. Above the longest gap
    # between two steps (rank 0 writing predictions or a checkpoint while the others wait).
    collective_timeout_s: float = 600.0
    # An unattended run (--auto-resume, or no terminal) trains in a child process that is started again after a
    # crash (a signal, or exit 1 from an unexpected error) this many times at most; 0 trains in this process.
    max_restarts: int = 3


@dataclass
class EvalConfig:
    every_steps: int = 250
    max_batches: int = 50
    batch_size: int = 0  # 0 = train.batch_size
    predictions: int = 3  # fixed validation prompts generated at each eval; 0 = off
    max_new_tokens: int = 48


@dataclass
class CheckpointConfig:
    every_steps: int = 250
    keep_last: int = 3
    keep_best: bool = True


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    patience: int = 5
    min_delta: float = 0.01
    warmup_steps: int = 50
    check_every_steps: int = 50
    grad_spike_threshold: float = 1000.0
    grad_spike_patience: int = 3
    stuck_steps: int = 10  # circuit breaker: loss unchanged (or non-finite) this many steps in a row


@dataclass
class PreferenceConfig:
    beta: float = 0.1  # dpo: scale of the reward margin; orpo: weight of the odds-ratio term (SPEC §9)


@dataclass
class RewardConfig:
    """method reward (SPEC §9): a scalar score head on the LoRA'd base, trained on preference pairs."""
    # TRL RewardTrainer's center_rewards_coefficient: weight of mean (r_chosen + r_rejected)^2, which pulls the
    # scores toward mean 0 (src/backend/objectives.py); 0 = no such term (TRL's None)
    center_coefficient: float = 0.0


@dataclass
class GrpoConfig:
    """GRPO (SPEC §9): group_size completions are sampled per prompt, scored by the rewards, and each one's
    advantage is its reward against its group's."""
    group_size: int = 4  # completions per prompt; train.batch_size counts prompts
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    # TRL's defaults since its GRPO went token-level: no KL term (and so no reference forward) and the dapo loss.
    beta: float = 0.0  # weight of the KL to the reference (the base with LoRA off); 0 skips the reference pass
    epsilon: float = 0.2  # PPO clip range of the policy ratio
    loss_type: str = "dapo"  # dapo | grpo | dr_grpo (src/backend/objectives.py)
    iterations: int = 1  # optimizer steps per generated batch; 1 = on-policy
    rewards: list[str] = field(default_factory=list)  # built-in names, "package.module:function", "file.py:function"
    reward_weights: list[float] = field(default_factory=list)  # empty = 1.0 each
    dead_reward_patience: int = 10  # circuit breaker: steps in a row with no advantage anywhere
    eval_prompts: int = 32  # validation prompts each eval answers (a fixed subset drawn from train.seed)
    # "prompt" rows through the model's chat template as one user turn: auto = when the tokenizer has one
    # (an instruct model given bare text often answers with an immediate end of turn)
    chat_template: str = "auto"  # auto | true | false
    log_completions_every: int = 10  # steps between completions.jsonl entries (the sampled completions); 0 = never


@dataclass
class OutputConfig:
    dir: str = "runs/overnight"
    keep_awake: bool = True  # macOS: `caffeinate -i` for the run's lifetime, so the Mac does not sleep mid-run


@dataclass
class NotifyConfig:
    webhook_url: str | None = None


@dataclass
class ReportConfig:
    """Live reporting beside metrics.jsonl (pip install 'overnight[report]'); both off unless asked for."""
    tensorboard: bool = False  # event files under RUN_DIR/tb
    wandb: bool = False  # Weights & Biases; WANDB_MODE=offline logs under RUN_DIR/wandb without network
    wandb_project: str = "overnight"
    wandb_entity: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    backend: str = "auto"

    def __post_init__(self) -> None:
        # Not a config field (never dumped): what loading noticed but let through (a YAML key given twice), for the
        # run to say once at its start.
        self.warnings: list[str] = []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    @property
    def packing(self) -> bool:
        return self.data.method == "cpt" if self.data.packing is None else self.data.packing


# Config fields that change what training computes: a resume with any of them changed is refused
# (SPEC §7). max_steps is left out on purpose so a finished run can be extended.
TRAINING_KEYS = (
    "model.path", "model.quantization.bits", "model.quantization.group_size", "model.max_seq_length", "model.dtype",
    "lora.rank", "lora.alpha", "lora.dropout", "lora.layers", "lora.targets", "lora.use_dora",
    "data.method", "data.packing", "data.mask_prompt", "data.truncate", "data.chat_template_kwargs",
    "train.batch_size", "train.grad_accumulation", "train.learning_rate", "train.schedule",
    "train.warmup_steps", "train.min_lr_ratio", "train.weight_decay", "train.max_grad_norm",
    "train.optimizer", "train.seed", "preference.beta",
    "grpo.group_size", "grpo.max_new_tokens", "grpo.temperature", "grpo.top_p", "grpo.beta", "grpo.epsilon",
    "grpo.loss_type", "grpo.iterations", "grpo.rewards", "grpo.reward_weights", "grpo.chat_template",
    "reward.center_coefficient",
)



def applies_to_method(key: str, method: str) -> bool:
    """Whether a training key can change what ``method`` computes: grpo.* only grpo's, preference.beta only dpo's
    and orpo's. A resume compares only these (an sft run does not care that grpo's defaults moved)."""
    if key.startswith("grpo."):
        return method == "grpo"
    if key.startswith("reward."):
        return method == "reward"
    if key == "preference.beta":
        return method in ("dpo", "orpo")
    return True


# Keys only some methods read: (prefix or key, the methods that read it, what the others do instead). A method's
# own keys are grpo.*, reward.* and preference.beta; the rest are eval or data keys whose work another key does in
# some methods, or that have nothing to act on there.
METHOD_KEYS = (
    ("grpo.", ("grpo",), {}),
    ("reward.", ("reward",), {}),
    ("preference.beta", ("dpo", "orpo"), {}),
    ("data.mask_prompt", ("sft",), {"cpt": "its text rows are all targets",
                                    "dpo": "a pair's prompt is never a target", "orpo": "a pair's prompt is never "
                                    "a target", "reward": "a reward model reads whole rows", "grpo": "its prompts "
                                    "are never targets"}),
    ("eval.max_batches", ("sft", "cpt", "dpo", "orpo", "reward"),
     {"grpo": "its eval answers grpo.eval_prompts validation prompts"}),
    ("eval.max_new_tokens", ("sft", "cpt", "dpo", "orpo"),
     {"grpo": "its answers are grpo.max_new_tokens long", "reward": "a reward model generates nothing"}),
    ("eval.predictions", ("sft", "cpt", "dpo", "orpo", "grpo"), {"reward": "a reward model generates nothing"}),
    ("early_stopping.stuck_steps", ("sft", "cpt", "dpo", "orpo", "reward"),
     {"grpo": "its breaker is grpo.dead_reward_patience"}),
)
# Keys another key switches off: (key, the switch, why it is off).
SWITCHED_KEYS = tuple(
    (f"early_stopping.{name}", lambda c: c.early_stopping.enabled, "early_stopping.enabled is false (only the "
     "non-finite and stuck-loss breakers run)")
    for name in ("patience", "min_delta", "warmup_steps", "check_every_steps", "grad_spike_threshold",
                 "grad_spike_patience")
) + tuple(
    (f"report.{name}", lambda c: c.report.wandb, "report.wandb is false") for name in ("wandb_project", "wandb_entity")
) + tuple(
    (f"data.hf_dataset.{name}", lambda c: bool(c.data.hf_dataset.name), "data.hf_dataset.name is not set")
    for name in ("config", "train_split", "val_split")
) + (
    ("data.path", lambda c: not c.data.hf_dataset.name, "data.hf_dataset.name is set (the rows come from that "
     "dataset)"),
    ("model.quantization.group_size", lambda c: c.model.quantization.bits != 0,
     "model.quantization.bits is 0 (nothing is quantized)"),
)


def unused_keys(cfg: Config, given: set[str]) -> list[str]:
    """A warning for each key given (in the YAML or on the command line) a value other than its default that this
    config never reads: a key of another method, or one its switch turns off. Said, not refused: one config file
    may serve several methods (sft, then a reward model, then grpo on the same YAML with --method), and a
    config.yaml a run wrote holds every key."""
    default, warnings = Config(), []
    for key in sorted(given):
        value = cfg.get(key)
        if value == default.get(key):
            continue
        method = cfg.data.method
        readers, instead = next(((methods, instead) for name, methods, instead in METHOD_KEYS
                                 if key == name or (name.endswith(".") and key.startswith(name))), (None, {}))
        if readers is not None and method not in readers:
            who = " and ".join([", ".join(readers[:-1]), readers[-1]] if len(readers) > 1 else readers)
            why = (f"data.method {method} does not read it (only {who} {'does' if len(readers) == 1 else 'do'}"
                   f"{'; ' + instead[method] if method in instead else ''})")
        else:
            why = next((reason for name, on, reason in SWITCHED_KEYS if name == key and not on(cfg)), None)
        if why:
            shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            warnings.append(f"config key '{key}' is set to {shown}, but {why}; it changes nothing in this run")
    return warnings


CHOICES = {
    "data.method": ("sft", "cpt", "dpo", "orpo", "grpo", "reward"),
    "grpo.loss_type": ("dapo", "grpo", "dr_grpo"),
    "grpo.chat_template": ("auto", "true", "false"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.optimizer": ("adamw", "paged_adamw_8bit"),
    "backend": ("auto", "mlx", "torch"),
    "model.quantization.bits": (0, 4, 8),
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "model.loss_kernel": ("chunked", "liger"),
}


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid: {', '.join(options)})"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        return _columns(key, value) if key == "data.columns" else _template_kwargs(key, value)
    if origin is list:
        if isinstance(value, str):
            if _unbalanced(value) or value.lstrip().startswith(("[", "{")) or value.rstrip().endswith(("]", "}")):
                # "[q_proj, v_proj" split at the commas would train a module named "[q_proj"
                raise ConfigError(f"config key '{key}': {value!r} looks like a list with a bracket missing or "
                                  f"extra; write it as [a, b] (or a, b without brackets)")
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if hint is float:
        # YAML 1.1 reads `1e-5` (no dot) as a string; accept it as the number the user meant.
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected text, got {value!r}")
        if isinstance(value, bool):  # YAML read `true` as a bool: the text the user wrote (grpo.chat_template)
            return "true" if value else "false"
        return str(value)
    return value


# The variables overnight itself hands a chat template (src/data/tokenizer.py): not the user's to set.
TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "tools", "documents")


def _template_kwargs(key: str, value: Any) -> dict[str, Any]:
    """data.chat_template_kwargs: a mapping of names to plain YAML values (they are recorded in the checkpoints'
    fingerprint as JSON); empty when left blank."""
    example = "e.g. {enable_thinking: false}"
    if value is None or value == "":  # `chat_template_kwargs:` left blank, or `--set data.chat_template_kwargs=`
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}': expected a mapping of template variables ({example}), got "
                          f"{value!r}; on the command line quote it: --set '{key}={{enable_thinking: false}}'")
    for name, item in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"config key '{key}': {name!r} is not a variable name a chat template can read; use "
                              f"names like enable_thinking ({example})")
        if name in TEMPLATE_VARIABLES:
            raise ConfigError(f"config key '{key}': '{name}' is set by overnight itself for every rendering; remove "
                              f"it ({example})")
        if not _plain(item):
            raise ConfigError(f"config key '{key}.{name}': {item!r} is not text, a number, true/false or a list or "
                              f"mapping of those (a YAML date must be quoted, e.g. date_string: '26 Jul 2024')")
    return dict(value)


# The keys of every row format (src/data/formats.py FORMAT_KEYS, a higher layer; a test keeps the two equal):
# what data.columns may map a column onto.
ROW_KEYS = ("messages", "prompt", "completion", "text", "chosen", "rejected")


def _columns(key: str, value: Any) -> dict[str, str]:
    """data.columns: row key -> the user's column name. A key that is no row key is refused here (the columns
    are checked against the data when it is read, src/data/sources.py)."""
    row_keys = sorted(ROW_KEYS)
    example = "e.g. {prompt: question, completion: answer} (the row key first, then your column)"
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}': expected a mapping of row keys to your column names ({example}), "
                          f"got {value!r}; on the command line quote it: --set '{key}={{prompt: question}}'")
    for row_key, column in value.items():
        if not isinstance(column, str) or not column:
            raise ConfigError(f"config key '{key}.{row_key}': expected a column name, got {column!r} ({example})")
        if row_key not in row_keys:
            near = difflib.get_close_matches(str(row_key), row_keys, n=1, cutoff=0.5)
            turned = (f"; did you mean {{{column}: {row_key}}}? the row key comes first" if column in row_keys
                      else f"; did you mean '{near[0]}'?" if near else "")
            raise ConfigError(f"config key '{key}': '{row_key}' is not a key of any row format (row keys: "
                              f"{', '.join(row_keys)}){turned}")
    doubled = sorted({c for c in value.values() if list(value.values()).count(c) > 1})
    if doubled:
        raise ConfigError(f"config key '{key}': column '{doubled[0]}' is mapped to more than one row key; map each "
                          f"column once ({example})")
    return dict(value)


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _plain(v) for k, v in value.items())


def _unbalanced(text: str) -> bool:
    """Brackets or braces that do not pair up (a backslash-escaped one, as in a regex, is not counted)."""
    stack: list[str] = []
    pairs = {"]": "[", "}": "{"}
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "[{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return True
    return bool(stack)


def _apply(node: Any, values: dict[str, Any], prefix: str = "", given: set[str] | None = None) -> None:
    """Set ``values`` (nested mappings) on the config tree; ``given`` collects the dotted keys set to a value."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(node))
    names = [f.name for f in dataclasses.fields(node)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'" + _closest(str(key), names))
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value if value is not None else {}, dotted + ".", given)
        else:
            setattr(node, key, _coerce(dotted, value, hints[key]))
            if given is not None and value is not None:
                given.add(dotted)


def _hint_of(cfg: Config, dotted: str) -> Any:
    """The type a dotted key holds, or None when it is not a leaf key (then _apply names the mistake)."""
    node: Any = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return None
        if i == len(parts) - 1:
            return None if dataclasses.is_dataclass(getattr(node, part)) else typing.get_type_hints(type(node))[part]
        node = getattr(node, part)
    return None


def _closed(raw: str) -> str | None:
    """``raw`` with its unclosed brackets closed, when that alone makes it valid YAML (the likely fix to show)."""
    stack: list[str] = []
    for ch in raw:
        if ch in "[{":
            stack.append({"[": "]", "{": "}"}[ch])
        elif ch in "]}":
            if not stack or stack.pop() != ch:
                return None
    if not stack:
        return None
    fixed = raw.rstrip() + "".join(reversed(stack))
    try:
        yaml.safe_load(fixed)
    except yaml.YAMLError:
        return None
    return fixed


def set_value(dotted: str, raw: str) -> Any:
    """The value of one `--set a.b=c`, parsed as YAML (so 1e-5, true, [a, b] work). A value YAML cannot read is
    taken as plain text only where text is wanted; a malformed list or mapping is refused by name, since reading
    it as text would train something other than what was typed."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        hint = _hint_of(Config(), dotted)
        if hint is None or not (raw.lstrip().startswith(("[", "{")) or typing.get_origin(hint) is list
                                or _unbalanced(raw)):
            return raw  # text (or a key _apply names as unknown)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if raw.rstrip().endswith(","):
            fix = ("it ends at a comma, as when the shell splits an unquoted argument at a space: quote the "
                   f"whole argument, e.g. --set '{dotted}=[a, b]'")
        else:
            fixed = _closed(raw)
            fix = (f"did you mean --set '{dotted}={fixed}'?" if fixed else
                   f"write a list as --set '{dotted}=[a, b]' (a mapping as {{key: value}}).") \
                + " Quote the whole argument in the shell, since a space splits it in two"
        raise ConfigError(f"--set {dotted}: the value {raw!r} is not a valid list or mapping ({problem}); "
                          f"{fix}") from None


def set_dotted(cfg: Config, dotted: str, raw: str, given: set[str] | None = None) -> None:
    """Apply one `--set a.b=c` (see set_value)."""
    _apply_value(cfg, dotted, set_value(dotted, raw), given)


def _apply_value(cfg: Config, dotted: str, value: Any, given: set[str] | None = None) -> None:
    nested: Any = value
    for part in reversed(dotted.split(".")):
        nested = {part: nested}
    _apply(cfg, nested, given=given)


def _leaves(node: Any, prefix: str = ""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def validate(cfg: Config) -> Config:
    """Refuse a config that cannot train, naming the key; checked in this order, so the first problem is the
    one reported."""
    _check_finite(cfg)
    if cfg.train.seed < 0:
        raise ConfigError(f"config key 'train.seed' must be 0 or a positive integer, got {cfg.train.seed}")
    _check_choices(cfg)
    _check_bounds(cfg)
    _check_lora(cfg)
    _check_grpo(cfg)
    _check_zero_means_nothing(cfg)
    url = cfg.notify.webhook_url
    if url and not (isinstance(url, str) and url.split("://", 1)[0].lower() in ("http", "https") and "://" in url):
        # urllib can only post to http(s); anything else failed at run time as one warning and nothing arrived
        # all night. The value is not repeated: a webhook URL carries its secret.
        raise ConfigError("config key 'notify.webhook_url' must be an http:// or https:// URL (the webhook's "
                          "full address, e.g. https://hooks.example.com/services/...); nothing could be posted to it")
    if cfg.train.min_lr_ratio > 1:
        raise ConfigError(f"config key 'train.min_lr_ratio' must be in [0, 1], got {cfg.train.min_lr_ratio}")
    if cfg.train.epochs is not None and not cfg.train.epochs > 0:
        raise ConfigError(f"config key 'train.epochs' must be above 0 (passes over the training data, e.g. 3 or "
                          f"0.5), got {cfg.train.epochs}")
    return cfg


def _check_finite(cfg: Config) -> None:
    for name, value in _leaves(cfg):
        # nan passes every `< 0` test in _check_bounds and inf trains nothing useful: refuse both by name
        # (a spike threshold of inf is allowed: it switches the spike check off).
        infinite_ok = name == "early_stopping.grad_spike_threshold" and not math.isnan(value if isinstance(value, float) else 0)
        if isinstance(value, float) and not math.isfinite(value) and not infinite_ok:
            raise ConfigError(f"config key '{name}' must be a finite number, got {value}")


def _check_choices(cfg: Config) -> None:
    for key, options in CHOICES.items():
        if key == "backend" and ":" in cfg.backend:
            continue  # a plugin backend "package.module:ClassName"
        if cfg.get(key) not in options:
            raise ConfigError(
                f"config key '{key}': {cfg.get(key)!r} is not one of {', '.join(map(str, options))}"
                + _closest(str(cfg.get(key)), [str(o) for o in options])
            )


def _check_bounds(cfg: Config) -> None:
    positive = ("model.max_seq_length", "lora.rank", "train.batch_size", "train.grad_accumulation",
                "train.max_steps", "eval.every_steps", "eval.max_batches", "checkpoint.every_steps",
                "checkpoint.keep_last", "early_stopping.patience", "early_stopping.grad_spike_patience",
                "early_stopping.check_every_steps", "early_stopping.stuck_steps", "train.report_every",
                "model.quantization.group_size", "grpo.group_size", "grpo.max_new_tokens", "grpo.iterations",
                "grpo.dead_reward_patience", "grpo.eval_prompts")
    for key in positive:
        if cfg.get(key) < 1:
            raise ConfigError(f"config key '{key}' must be at least 1, got {cfg.get(key)}")
    non_negative = ("train.learning_rate", "train.warmup_steps", "train.weight_decay", "train.max_grad_norm",
                    "early_stopping.warmup_steps", "early_stopping.min_delta", "eval.predictions",
                    "eval.batch_size", "eval.max_new_tokens", "lora.alpha", "train.min_lr_ratio",
                    "preference.beta", "grpo.beta", "grpo.epsilon", "train.oom_regrow_steps",
                    "train.swap_patience", "train.max_restarts", "grpo.log_completions_every",
                    "reward.center_coefficient")
    for key in non_negative:
        if cfg.get(key) < 0:
            raise ConfigError(f"config key '{key}' must not be negative, got {cfg.get(key)}")
    if not cfg.train.collective_timeout_s > 0:
        raise ConfigError(f"config key 'train.collective_timeout_s' must be above 0 seconds, got "
                          f"{cfg.train.collective_timeout_s}")


def _check_lora(cfg: Config) -> None:
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.lora.layers == 0 or cfg.lora.layers < -1:
        raise ConfigError(f"config key 'lora.layers' must be a positive number of blocks or -1 (all), got {cfg.lora.layers}")
    if not cfg.lora.targets:
        raise ConfigError("config key 'lora.targets' must name at least one module, e.g. [q_proj, v_proj]")
    if cfg.lora.use_dora and cfg.data.method == "reward":
        # A reward model's adapter is read back as a sequence classifier (src/methods/reward_model.py), and neither
        # that reader nor convert-adapter carries DoRA's magnitudes.
        raise ConfigError("config key 'lora.use_dora': DoRA is not supported with data.method reward; "
                          "train the reward model with plain LoRA (lora.use_dora=false)")
    if cfg.lora.use_dora and cfg.lora.init_from:
        raise ConfigError("config key 'lora.use_dora': lora.init_from starts only LoRA's A and B, not DoRA's "
                          "magnitudes; leave one of the two out")


def _check_zero_means_nothing(cfg: Config) -> None:
    """Values the bounds above let through that would train, or stop, or predict nothing without saying so."""
    if cfg.lora.alpha == 0:
        # the adapter's output is scaled by lora.alpha / lora.rank: at 0 it adds nothing and gets no gradient
        raise ConfigError("config key 'lora.alpha' must be above 0 (LoRA's update is scaled by lora.alpha / "
                          "lora.rank, so 0 trains nothing), got 0; e.g. twice lora.rank")
    if cfg.data.method == "dpo" and cfg.preference.beta == 0:
        # -logsigmoid(0 * margin) is log 2 for every pair: no gradient, while orpo's beta 0 is its sft term alone
        raise ConfigError("config key 'preference.beta' must be above 0 for method dpo (it scales the reward "
                          "margin; at 0 every pair's loss is log 2 and nothing trains), got 0; TRL's default is 0.1")
    if not cfg.early_stopping.grad_spike_threshold > 0:
        raise ConfigError(f"config key 'early_stopping.grad_spike_threshold' must be above 0 (a gradient norm above "
                          f"it counts as a spike; .inf turns the check off), got "
                          f"{cfg.early_stopping.grad_spike_threshold}")
    if cfg.eval.predictions > 0 and cfg.eval.max_new_tokens == 0 and cfg.data.method not in ("grpo", "reward"):
        raise ConfigError("config key 'eval.max_new_tokens' is 0 while eval.predictions is "
                          f"{cfg.eval.predictions}: every prediction would be empty; give it at least 1, or set "
                          "eval.predictions=0 to write no predictions")


def _check_grpo(cfg: Config) -> None:
    g = cfg.grpo
    if not 0.0 < g.top_p <= 1.0:
        raise ConfigError(f"config key 'grpo.top_p' must be in (0, 1], got {g.top_p}")
    if g.temperature <= 0:
        raise ConfigError(f"config key 'grpo.temperature' must be above 0 (training samples), got {g.temperature}")
    if g.reward_weights and len(g.reward_weights) != len(g.rewards):
        raise ConfigError(f"config key 'grpo.reward_weights' has {len(g.reward_weights)} weights for "
                          f"{len(g.rewards)} rewards: give one weight per entry of grpo.rewards, or none (all 1.0)")
    if cfg.data.method == "grpo":
        if not g.rewards:
            raise ConfigError("config key 'grpo.rewards' is empty: method grpo needs at least one reward, e.g. "
                              "--set grpo.rewards=[exact_match] or my_rewards.py:correct")
        if g.group_size < 2:
            raise ConfigError(f"config key 'grpo.group_size' must be at least 2 (an advantage compares completions "
                              f"of the same prompt), got {g.group_size}")


def load_yaml(path: Path, warnings: list[str] | None = None) -> dict[str, Any]:
    """The YAML file as a dict; ConfigError naming the file and line when it is not YAML. Keys given twice are
    added to ``warnings``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        duplicates = _duplicate_keys(node) if node is not None else []
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a YAML mapping of sections (model:, lora:, train:, ...)")
    if warnings is not None:
        for key, lines in duplicates:
            where = " and ".join([", ".join(map(str, lines[:-1])), str(lines[-1])])
            times = "twice" if len(lines) == 2 else f"{len(lines)} times"
            warnings.append(f"config file {path}: key '{key}' is given {times} (lines {where}); the value "
                            f"on line {lines[-1]} is used (PyYAML keeps the last), remove the "
                            f"{'other' if len(lines) == 2 else 'others'}")
    return data


def _duplicate_keys(node: yaml.Node, prefix: str = "",
                    seen_nodes: set[int] | None = None) -> list[tuple[str, list[int]]]:
    """(dotted key, the lines it is on) for every mapping key given more than once. Keys brought in by a merge
    (<<: *defaults) are meant to be overridden and are not counted."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias: its keys were checked where the anchor is
        return []
    seen_nodes.add(id(node))
    found: list[tuple[str, list[int]]] = []
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, list[int]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            lines.setdefault(key_node.value, []).append(key_node.start_mark.line + 1)
            found.extend(_duplicate_keys(value_node, f"{prefix}{key_node.value}.", seen_nodes))
        found.extend((prefix + name, at) for name, at in lines.items() if len(at) > 1)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found.extend(_duplicate_keys(item, prefix, seen_nodes))
    return found


# The run's length is given one way: a number of steps, or passes over the data that max_steps is derived from.
LENGTH_KEYS = ("train.max_steps", "train.epochs")


def _one_length(given: set[str], where: str) -> None:
    if all(key in given for key in LENGTH_KEYS):
        raise ConfigError(f"{where} sets both train.max_steps and train.epochs: give the run's length one way (with "
                          "train.epochs, max_steps is derived from the training data) and remove the other")


def build_config(yaml_path: Path | None = None, flags: dict[str, Any] | None = None,
                 sets: list[str] | None = None) -> Config:
    """defaults < YAML < flags (already mapped to dotted keys) < --set KEY=VALUE.

    train.max_steps and train.epochs are one setting: both in the YAML, or both on the command line (flags and
    --set together), is refused; the command line's one replaces the YAML's other."""
    cfg = Config()
    in_yaml: set[str] = set()
    # --set values are read first: a list the shell split at a space leaves its tail where the config file goes,
    # and the broken list is the mistake to name, not "config file v_proj] does not exist".
    set_values = []
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}' (e.g. --set train.learning_rate=2e-4)")
        key, raw = item.split("=", 1)
        set_values.append((key.strip(), set_value(key.strip(), raw)))
    if yaml_path is not None:
        values = load_yaml(yaml_path, cfg.warnings)
        try:
            _apply(cfg, values, given=in_yaml)
        except ConfigError as exc:
            raise ConfigError(f"{yaml_path}: {exc}") from None
        _one_length(in_yaml, f"config file {yaml_path}")
    on_command_line: set[str] = set()
    for dotted, value in (flags or {}).items():
        if value is not None:
            _apply_value(cfg, dotted, value, on_command_line)
    for dotted, value in set_values:
        _apply_value(cfg, dotted, value, on_command_line)
    _one_length(on_command_line, "the command line")
    if "train.max_steps" in on_command_line:
        cfg.train.epochs = None  # --max-steps replaces the YAML's train.epochs
    validate(cfg)
    cfg.warnings += unused_keys(cfg, in_yaml | on_command_line)
    return cfg


def dump_config(cfg: Config, path: Path) -> None:
    """The resolved config that ran. A run given in epochs records the max_steps derived from them (what
    `overnight report` and a rerun from this file use) and names the epochs in a comment, since a file giving both
    is refused."""
    from overnight.fsutil import atomic_write_text

    values = cfg.to_dict()
    note = ""
    if cfg.train.epochs is not None:
        values["train"]["epochs"] = None
        note = (f"# train.max_steps {cfg.train.max_steps} was derived from train.epochs {cfg.train.epochs:g} "
                "and the training data at the start\n")
    atomic_write_text(path, note + yaml.safe_dump(values, sort_keys=False))
