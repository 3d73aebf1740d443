"""The contract between the core and a backend: the Backend protocol, the small value types that cross it, the
lazy registry, and (in this package's modules) what both backends must agree on, written once: `objectives` (each
method's objective and its normalisation, a numpy reference, the skip-a-non-finite-step rule), `lora_init` (the
LoRA A init), `lora_targets` (which modules lora.targets names), `step_buffer` (the data-parallel all-reduce buffer),
`adapter_formats` (mlx-lm <-> PEFT adapters), `model_folder` (a model folder read before a framework loads it),
`hub` (model.path as a local folder, a hub id downloaded once).
The prompts, stop ids and generator seeds the core hands to sampling are defined here (as_prompts, as_stop_ids,
generator_seed).

Only numpy arrays, Python numbers, strings and Paths cross this boundary, so the core never touches a framework
type. Backends live in ``overnight.backends.<name>_backend`` and are imported only when chosen.
"""
from __future__ import annotations

import importlib
import importlib.util
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np



@dataclass
class Batch:
    """One micro-batch of token ids.

    ``input_ids``: int32 (B, T), right-padded with ``pad_id``.
    ``loss_mask``: float32 (B, T); ``loss_mask[b, t] == 1`` means token ``t`` is a target,
    i.e. the loss includes predicting ``input_ids[b, t]`` from ``input_ids[b, :t]``.
    Column 0 is therefore always 0. Padding positions are 0.
    ``attention_mask``: int32 (B, T), 1 for real tokens, 0 for padding.
    For preference methods (dpo, orpo) rows come in pairs: row 2i is "chosen",
    row 2i+1 is "rejected" for the same prompt.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    attention_mask: np.ndarray
    pad_id: int = 0
    paired: bool = False  # preference pairs: row 2i chosen, 2i+1 rejected
    # grpo (src/backend/objectives.py): each row a sampled completion; its advantage, and with grpo.iterations > 1 the
    # per-token log-probs (B, T, aligned like loss_mask) of the policy that sampled it.
    advantages: np.ndarray | None = None
    old_logp: np.ndarray | None = None
    # The key of this micro-batch's dropout masks, a pure function of (seed, step, place in the whole step) set by
    # the loop (noise_seed): the backend reseeds its dropout from it before the micro-batch's forward, so which
    # process of a data-parallel job runs it, an OOM split before it, or a resume cannot change its masks.
    noise_seed: int | None = None

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def split(self, parts: int) -> list["Batch"]:
        """Split into ``parts`` micro-batches of (nearly) equal rows; used on OOM.

        Preference pairs stay together."""
        unit = 2 if self.paired else 1
        units = self.num_rows // unit
        parts = max(1, min(parts, units))
        bounds = np.linspace(0, units, parts + 1).astype(int) * unit
        def rows(x, a, b):
            return None if x is None else x[a:b]

        return [
            Batch(self.input_ids[a:b], self.loss_mask[a:b], self.attention_mask[a:b], self.pad_id, self.paired,
                  rows(self.advantages, a, b), rows(self.old_logp, a, b),
                  None if self.noise_seed is None else noise_seed(self.noise_seed, part))
            for part, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
            if b > a
        ]


def noise_seed(*key: int) -> int:
    """A 63-bit seed that is a pure function of ``key`` (e.g. seed, step, micro-batch index): torch.manual_seed and
    mx.random.seed both take it."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> np.uint64(1))


GENERATOR_SEED_LIMIT = 2**63


def generator_seed(value: int) -> int:
    """``value`` (any int, e.g. a 64-bit SeedSequence draw) folded into [0, 2**63), a non-negative signed 64-bit
    integer: the seeds the core hands Backend.sample are already in this range, and torch.Generator.manual_seed
    and mx.random.key take them as they are, so both backends seed a row's generator from the same number."""
    return int(value) % GENERATOR_SEED_LIMIT


def as_stop_ids(stop_ids: Iterable[int] | int | None) -> tuple[int, ...]:
    """Backend.sample / Backend.generate's ``stop_ids`` as the tuple of ints the backends test membership in:
    the core hands a tuple (TextTokenizer.stop_ids); None (no stop token) and a lone int are taken too."""
    if stop_ids is None:
        return ()
    if isinstance(stop_ids, (int, np.integer)):
        return (int(stop_ids),)
    return tuple(int(i) for i in stop_ids)


def as_prompts(prompts) -> tuple[list[np.ndarray], bool]:
    """Backend.sample / Backend.generate's ``prompts`` as (one int64 array per prompt, whether one prompt was given):
    a 1-D array or list of ints is one prompt; a list (or 2-D array) of them is one prompt per row. A prompt needs
    at least one token (its last one is where the continuation starts)."""
    if isinstance(prompts, np.ndarray) and prompts.ndim != 1:
        if prompts.ndim != 2:
            raise ValueError(f"prompts: expected one prompt (1-D) or one per row (2-D), got shape {prompts.shape}")
        rows, single = list(prompts), False
    else:
        items = list(prompts)
        single = bool(items) and all(isinstance(x, (int, np.integer)) for x in items)
        rows = [items] if single else items
    out = [np.asarray(p, dtype=np.int64).reshape(-1) for p in rows]
    if any(p.size == 0 for p in out):
        raise ValueError("a prompt needs at least one token")
    return out, single


@dataclass
class SetupInfo:
    trainable_params: int
    total_params: int
    model_dir: Path  # a local folder holding the tokenizer files (hub ids resolved by the backend)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    loss: float  # token-weighted mean loss over all micro-batches of the step
    tokens: int  # target tokens in the step
    grad_norm: float  # global gradient norm before clipping
    extras: dict[str, float] = field(default_factory=dict)  # method-specific figures for the train event (grpo: kl)


@dataclass
class PortableState:
    """LoRA weights and AdamW moments keyed ``<module>.A`` / ``<module>.B`` (neutral names, PEFT layout)."""

    weights: dict[str, np.ndarray]
    exp_avg: dict[str, np.ndarray] = field(default_factory=dict)
    exp_avg_sq: dict[str, np.ndarray] = field(default_factory=dict)
    adam_step: int = 0
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def has_moments(self) -> bool:
        return bool(self.exp_avg) and bool(self.exp_avg_sq)


class OutOfMemory(RuntimeError):
    """Raised by a backend when a step ran out of device memory; the loop halves the micro-batch."""


class PeerLost(RuntimeError):
    """A collective of a data-parallel job failed or timed out: another process of the job died, was killed or
    stopped answering. The message says which collective and after how long; the run ends without saving
    (the last committed checkpoint is the job's state)."""


class PortTaken(PeerLost):
    """A rank could not listen on the port its launcher gave it: another program took it after the port was chosen.
    Nothing has started; `overnight train --devices` starts the job again on other ports."""


class Collective(Protocol):
    """The few collectives the loop needs across the processes of a data-parallel job (src/distributed.py), each a
    call every process makes at the same point. Values are float64 vectors of the same length on every rank."""

    rank: int
    size: int

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """Elementwise sum over all ranks; the same result on every rank."""

    def all_max(self, values: np.ndarray) -> np.ndarray:
        """Elementwise max over all ranks; the same result on every rank."""

    def broadcast(self, values: np.ndarray) -> np.ndarray:
        """Rank 0's values, on every rank."""

    def barrier(self) -> None:
        """Returns once every rank has called it."""


class Backend(Protocol):
    name: str
    # True for a backend that builds DoRA layers when lora.use_dora is set (src/backend/lora_init.py, DORA); the core
    # refuses the key for any other, rather than let it train plain LoRA
    supports_dora: bool
    # The values of model.loss_kernel it computes ("chunked" at least); the core refuses any other by name
    loss_kernels: tuple[str, ...]

    def setup(self, cfg: Any, seed: int) -> SetupInfo:
        """Load model, quantize if asked, attach LoRA, build the optimizer. ``cfg`` is overnight.config.Config."""

    def train_step(self, micro_batches: list[Batch], lr: float,
                   step_scales: tuple[float, float, int] | None = None) -> StepResult:
        """One optimizer update: accumulate gradients over ``micro_batches`` (token-weighted),
        clip to cfg.train.max_grad_norm, step AdamW with learning rate ``lr``.

        ``step_scales``: objectives.step_scales over the whole step's micro-batches, all ranks together (None:
        over ``micro_batches``). Connected to a job of several processes (``connect``), the backend sums the
        LoRA gradients, the loss sums and an out-of-memory flag over the ranks in one all-reduce after its
        local backward passes (one flat buffer laid out as src/backend/step_buffer.py says), then clips and
        steps: loss, tokens and grad_norm are the whole step's, the same on every rank, and an OOM on any rank
        raises OutOfMemory on every rank with the weights untouched. A step whose loss or norm is not finite is
        reported but not applied (objectives.update_applies).
        Batches carrying ``noise_seed`` reseed dropout from it before their forward."""

    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        """(sum of target-token losses, number of target tokens), without gradients."""

    def save(self, directory: Path) -> None:
        """Write everything a resume needs into ``directory`` (it exists; it is a temporary folder
        owned by the checkpoint manager, which fsyncs, hashes and commits it afterwards, so write
        plain file names directly). The adapter goes into ``directory / "adapter"`` in the backend's
        native loadable format (SPEC §5): the core copies that folder to RUN_DIR/adapter/.
        Optimizer state and framework RNG state go beside it."""

    def load(self, directory: Path) -> None:
        """Restore what ``save`` wrote, so training continues exactly as if uninterrupted."""

    def memory(self) -> dict[str, float]:
        """Memory figures in MB; must include 'memory_mb' (the figure the progress line shows).
        May include 'limit_mb' (e.g. Metal's recommended working set) for the near-limit warning."""

    def generate(self, prompts, max_new_tokens: int, stop_ids: tuple[int, ...]):
        """Greedy continuation token ids (without the prompt): at most ``max_new_tokens``, ending before the first
        token in ``stop_ids`` (not included). ``stop_ids`` is the tokenizer's (TextTokenizer.stop_ids: its eos,
        every eos_token_id the model folder lists and the chat template's end-of-turn token); the
        backend only tests membership in it (overnight.backend.as_stop_ids also takes None and a lone int).
        ``prompts`` is one prompt (a 1-D int array: returns one int64 array) or a list of them (returns a list,
        one array each), decoded in one batch: left-padded, each row's positions counted from its own first
        token, so a prompt's answer does not depend on the prompts beside it (overnight.backend.as_prompts).
        Out of memory: OutOfMemory (the caller splits the list)."""

    def versions(self) -> dict[str, str]:
        """Library versions, recorded in each checkpoint manifest."""

    def connect(self, timeout_s: float) -> Collective:
        """Join the data-parallel job its launcher started (torchrun / accelerate: RANK, WORLD_SIZE, LOCAL_RANK,
        MASTER_ADDR; mlx.launch: MLX_RANK, MLX_HOSTFILE) through the framework's own runtime, before ``setup``;
        setup then puts the model on this rank's device. A collective that does not complete within
        ``timeout_s`` (or fails because a peer died) raises PeerLost. Called only when launched so."""

    def portable_state(self) -> PortableState:
        """The LoRA weights and AdamW moments in the backend-neutral layout (src/runs/portable.py, SPEC §13); the
        checkpoint writes it beside the native files so the other backend can continue the run."""

    def load_portable(self, state: PortableState) -> None:
        """Continue from another backend's checkpoint: LoRA weights, AdamW moments and step count from
        ``state`` (already checked against this run's LoRA shape). Framework RNG states do not cross."""

    def init_lora(self, weights: dict[str, np.ndarray]) -> None:
        """Right after ``setup``, before any step: set the LoRA weights to ``weights`` (lora.init_from, a new run
        started from an existing adapter), keyed and laid out as portable_state().weights (float32, neutral names;
        src/backend/adapter_weights.py), already checked to name exactly this run's modules with their shapes. The
        optimizer is untouched: it has taken no step, so a new run's AdamW state and schedule start from there."""

    def sample(self, prompts, seeds: list[int], max_new_tokens: int, temperature: float,
               top_p: float, stop_ids: tuple[int, ...]) -> np.ndarray:
        """grpo: one sampled continuation per seed, all rows in one batch, with a KV cache, adapter on, no dropout:
        int64 (len(seeds), max_new_tokens), a row ending at its first token in ``stop_ids`` (kept), -1 after it
        (``stop_ids`` as for generate). ``prompts``: one prompt per row (rows of one prompt adjacent: each distinct
        prompt is prefilled once), or a single 1-D prompt every row continues (overnight.backend.as_prompts). Each
        row depends only on its own prompt and seed (its own generator, drawn once per token whatever the batch):
        the rows beside it, and rows that have ended, change nothing, so sampling a batch in parts (out of memory)
        gives the same rows. Seeds come in [0, 2**63) (generator_seed) and seed the row's generator as they are.
        Out of memory: OutOfMemory (the caller splits the rows)."""

    def token_logps(self, batch: Batch, adapter: bool = True) -> np.ndarray:
        """Per-token log-probs (B, T) of input_ids[:, t] given input_ids[:, :t] where loss_mask is 1 (0 elsewhere),
        without dropout; ``adapter=False`` is the reference model (grpo old-policy values, tests)."""


# ---------------------------------------------------------------------------
# Registry

BACKENDS = {
    "mlx": ("overnight.backends.mlx_backend", "MLXBackend", ("mlx", "mlx_lm")),
    "torch": ("overnight.backends.torch_backend", "TorchBackend", ("torch", "transformers", "peft")),
}

# `overnight fuse` (src/commands/fuse.py): each backend's exporter runs as `python -m <module> JOB.json` in a child
# process, so the core process never imports a framework; it needs the same modules as its backend.
EXPORTERS = {
    "mlx": "overnight.backends.mlx_export",
    "torch": "overnight.backends.torch_export",
}
# `overnight models get`: the GGUF -> Hugging Face folder conversion, run in a child process (transformers).
GGUF_CONVERTER = "overnight.backends.gguf_convert"
# grpo.rewards=[reward_model=PATH] (src/methods/reward_model.py): each backend's scorer of a one-label sequence
# classifier, imported only when a run uses one.
REWARD_SCORERS = {
    "mlx": "overnight.backends.mlx_reward_model",
    "torch": "overnight.backends.torch_reward_model",
}


class RewardScorer(Protocol):
    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """float64 (B,): the score head's output at ``positions`` (B,) of right-padded ``input_ids`` (B, T), without
        gradients. Out of memory: OutOfMemory (the caller scores fewer rows at a time)."""


def reward_scorer(backend, model_dir: Path, adapter_dir: Path | None, adapter_format: str | None, dtype: str,
                  spec: str) -> RewardScorer:
    """A reward model loaded on ``backend``'s device (its module's ``load_scorer``): the sequence classifier in
    ``model_dir``, with the adapter in ``adapter_dir`` on it when given (``adapter_format`` "peft": a PEFT SEQ_CLS
    adapter; "mlx": an mlx reward run's adapter). ``dtype``: model.dtype.
    ConfigError (exit 2, naming ``spec``) when this backend has no scorer or cannot load the model."""
    from overnight.config import ConfigError

    module_name = REWARD_SCORERS.get(getattr(backend, "name", ""))
    if module_name is None:
        raise ConfigError(f"config key 'grpo.rewards': {spec}: the backend {getattr(backend, 'name', backend)!r} "
                          f"cannot score with a reward model (backends that can: {', '.join(REWARD_SCORERS)})")
    return importlib.import_module(module_name).load_scorer(backend, Path(model_dir),
                                                            None if adapter_dir is None else Path(adapter_dir),
                                                            adapter_format, dtype, spec)


class BackendUnavailable(RuntimeError):
    pass


def _installed(modules: tuple[str, ...]) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _torch_cuda_visible() -> bool:
    # Asked in a child process so that the core never imports torch itself (SPEC §2); only the
    # chosen backend module imports its framework.
    try:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0 and probe.stdout.strip().endswith("True")


def choose_backend(requested: str) -> tuple[str, str]:
    """Return (name, why) following SPEC §3's auto rule."""
    if ":" in requested:  # a third-party backend given as "package.module:ClassName"
        return requested, "named as module:Class"
    if requested in BACKENDS:
        if not _installed(BACKENDS[requested][2]):
            extra = "mlx" if requested == "mlx" else "cuda"
            raise BackendUnavailable(
                f"backend '{requested}' is not installed: pip install 'overnight[{extra}]'"
            )
        return requested, "requested"
    if requested != "auto":
        raise BackendUnavailable(f"unknown backend '{requested}': choose auto, mlx or torch")
    if _is_apple_silicon() and _installed(BACKENDS["mlx"][2]):
        return "mlx", "Apple Silicon with mlx installed"
    if _installed(BACKENDS["torch"][2]) and _torch_cuda_visible():
        return "torch", "CUDA is visible to torch"
    for name in ("torch", "mlx"):
        if _installed(BACKENDS[name][2]):
            return name, f"no Apple Silicon GPU or CUDA; {name} is the first installed of torch, mlx"
    raise BackendUnavailable(
        "no backend installed: pip install 'overnight[mlx]' (Apple Silicon) or 'overnight[cuda]' (CUDA)"
    )


def get_backend(requested: str = "auto", announce=print) -> Backend:
    name, why = choose_backend(requested)
    module_name, class_name = name.split(":", 1) if ":" in name else BACKENDS[name][:2]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"backend '{name}' cannot be imported: {exc}") from None
    if announce:
        announce(f"backend: {name} ({why})")
    return getattr(module, class_name)()
