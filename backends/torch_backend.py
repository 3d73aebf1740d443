"""PyTorch + transformers + PEFT (+ bitsandbytes) backend: LoRA and QLoRA on CUDA, and on CPU for tests.

Only numpy arrays, Python numbers, strings and Paths leave this module (SPEC §2).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import random
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any


def prefer_expandable_segments(environ=os.environ, torch_version: str | None = None) -> bool:
    """Ask PyTorch's CUDA allocator for expandable segments unless the user configured the allocator: a long run
    with varying sequence lengths fragments fixed-size segments until an allocation fails with gigabytes "reserved
    but unallocated". The allocator reads this once, at its first CUDA allocation (c10/cuda/CUDAAllocatorConfig.h),
    so it is set when this module loads, before any model is built; ranks and children inherit it. Under the name
    the installed torch reads without complaint: torch 2.9 renamed it PYTORCH_ALLOC_CONF and prints "PYTORCH_CUDA_
    ALLOC_CONF is deprecated" on every run that sets the old one (c10/core/AllocatorConfig.cpp); older ones read
    only the old one. ``torch_version`` is the installed torch's, read from its metadata when not given (torch is not
    imported yet)."""
    if any(key in environ for key in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")):
        return False
    environ[_allocator_variable(torch_version)] = "expandable_segments:True"
    return True


def _allocator_variable(torch_version: str | None) -> str:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version

    try:
        release = Version(torch_version if torch_version is not None else version("torch")).release
    except (PackageNotFoundError, InvalidVersion):
        return "PYTORCH_CUDA_ALLOC_CONF"  # every torch reads it (the newer ones with a warning)
    return "PYTORCH_ALLOC_CONF" if release[:2] >= (2, 9) else "PYTORCH_CUDA_ALLOC_CONF"


prefer_expandable_segments()

import numpy as np
import torch
import torch.distributed
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from overnight.backend import lora_init, lora_targets, model_folder, objectives, step_buffer
from overnight.backend import Batch, OutOfMemory, PeerLost, PortableState, SetupInfo, StepResult, as_prompts, \
    as_stop_ids
from overnight.backend.adapter_formats import PEFT_SCORE_KEY, PORTABLE_SCORE_KEY, REWARD_HEAD, recorded_base, \
    reward_head_text
from overnight.backends import noise, torch_stored_dtype
from overnight.config import ConfigError
from overnight.errors import TrainingError
from overnight.fsutil import give_default_modes

noise.install()  # before bitsandbytes is imported: its import logs a line that is not the user's business
noise.import_bitsandbytes_without_hub_kernels()  # before transformers or PEFT import it
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# Allocation failures that arrive as a plain RuntimeError rather than _OOM, as ATen/cuda/Exceptions.h and
# c10/cuda/CUDAException.h word them: cuBLAS/cuSPARSE/cuSOLVER/cuFFT ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when
# calling `cublasCreate(handle)`"), cuDNN ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", a workspace that does not fit:
# "..._NOT_ENOUGH_WORKSPACE"), a raw CUDA call ("CUDA error: out of memory"), and host memory, which torch's CPU
# allocator words "DefaultCPUAllocator: can't allocate memory" (c10/core/impl/alloc_cpu.cpp): reading a model's
# weights on a machine with little RAM.
_OOM_TEXTS = ("out of memory", "_alloc_failed", "not_enough_workspace", "can't allocate memory")


def _is_oom(exc: BaseException) -> bool:
    """A framework's out of memory, whatever class it arrives as (never overnight's own OutOfMemory or PeerLost,
    which already say what happened)."""
    if isinstance(exc, (OutOfMemory, PeerLost)):
        return False
    if isinstance(exc, (_OOM, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _OOM_TEXTS)


# torch's words for an op it has no deterministic kernel for, in strict deterministic mode (Context.cpp,
# alertNotDeterministic): "<op> does not have a deterministic implementation, but you set ...".
_NO_DETERMINISTIC_KERNEL = " does not have a deterministic implementation"


def _say_which_op_is_not_deterministic(method):
    """A backend call whose model runs an op with no deterministic CUDA kernel under train.deterministic (a model's
    own code can: a float cumsum, histc, ...) ends as that key's error, naming the op and the way out, instead of
    torch's RuntimeError from deep inside the step."""
    @functools.wraps(method)
    def said(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except RuntimeError as exc:
            text = str(exc)
            if _NO_DETERMINISTIC_KERNEL not in text:
                raise
            op = text.split(_NO_DETERMINISTIC_KERNEL, 1)[0].strip().splitlines()[-1][-120:]
            raise ConfigError(
                f"config key 'train.deterministic': this model runs {op}, which torch {torch.__version__} has no "
                "deterministic CUDA kernel for, so its steps cannot be bit-reproducible -> set "
                "train.deterministic=false (a resume may change it; losses then repeat only up to float rounding)"
            ) from None

    return said


STATE_FORMAT = 1
# Sampling on an accelerator reads back whether every row has ended once per this many tokens (see _decode).
STOP_CHECK_EVERY = 8
# The first Liger-Kernel release whose fused linear cross-entropy gives per-token losses their own gradients
# (model.loss_kernel=liger, _liger_loss).
LIGER_PER_TOKEN_GRADIENTS = "0.8.2"


class TorchCollective:
    """The Collective protocol (src/backend/__init__.py) over torch.distributed: gloo on CPU, NCCL on the rank's GPU. Each
    call is one all_reduce of a float64 vector; any failure or timeout becomes PeerLost."""

    def __init__(self, rank: int, size: int, device: torch.device, timeout_s: float):
        self.rank, self.size, self.device, self.timeout_s = rank, size, device, timeout_s

    def _all_reduce(self, tensor: torch.Tensor, op: str, what: str, to_host: bool = False):
        import torch.distributed as dist

        started = time.monotonic()
        try:
            dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
            return tensor.cpu().numpy() if to_host else tensor  # NCCL may report a failure only when it is read
        except Exception as exc:  # noqa: BLE001 (gloo/NCCL raise RuntimeError or DistError subclasses)
            raise PeerLost(f"another process of this data-parallel job stopped answering or died ({what} on rank "
                           f"{self.rank} of {self.size}, after {time.monotonic() - started:.0f} s; collective "
                           f"timeout {self.timeout_s:.0f} s): {_first_line(exc)}") from None

    def reduce(self, values, op: str, what: str) -> np.ndarray:
        tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), device=self.device)
        return self._all_reduce(tensor, op, what, to_host=True)

    def reduce_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """train_step's gradient all-reduce (sum), on the tensor's own device (the GPU under NCCL)."""
        return self._all_reduce(tensor, "SUM", "the gradient all-reduce")

    def all_sum(self, values) -> np.ndarray:
        return self.reduce(values, "SUM", "a sum")

    def all_max(self, values) -> np.ndarray:
        return self.reduce(values, "MAX", "an agreement")

    def broadcast(self, values) -> np.ndarray:
        mine = np.asarray(values, dtype=np.float64)
        return self.reduce(mine if self.rank == 0 else np.zeros_like(mine), "SUM", "a broadcast from rank 0")

    def barrier(self) -> None:
        # An all_reduce rather than dist.barrier(), which guesses the device under NCCL.
        self.reduce(np.zeros(1), "SUM", "a barrier")

    def close(self) -> None:
        import torch.distributed as dist

        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 (leaving: nothing left to save)
            pass


def _bnb_version() -> str | None:
    try:
        import bitsandbytes

        return bitsandbytes.__version__
    except Exception:
        return None


class TorchBackend:
    name = "torch"
    adapter_format = "peft"  # what its adapter/ folders hold (src/backend/adapter_formats.py)
    supports_dora = True  # lora.use_dora (src/backend/lora_init.py, DORA)
    loss_kernels = ("chunked", "liger")  # model.loss_kernel (liger: CUDA with liger-kernel, see _liger_loss)

    def __init__(self) -> None:
        self._model = None
        self._optimizer = None
        self._params: list[torch.nn.Parameter] = []
        self._param_names: list[str] = []
        self._kl_sums: list | None = None  # grpo: per micro-batch (KL sum, tokens) of the step being taken
        self._step_extras: dict[str, float] = {}
        self._world: TorchCollective | None = None  # set by connect() in a data-parallel job
        self._stop_every: int | None = None  # tests: the stop check's interval (None: the device's)
        self._fused = False  # AdamW's fused kernel (set with the optimizer)
        self._liger = None  # model.loss_kernel=liger: Liger-Kernel's fused linear cross-entropy (set in setup)

    @property
    def placement(self) -> tuple[torch.device, torch.dtype]:
        """(device, compute dtype) setup picked: where a model loaded beside the policy (a GRPO reward model) goes."""
        return self._device, self._compute_dtype

    def connect(self, timeout_s: float) -> TorchCollective:
        """Join the job torchrun / accelerate started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL with
        one GPU per process (LOCAL_RANK picks it) when CUDA is there, gloo on CPU."""
        import torch.distributed as dist

        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"this is process {local_rank} on this machine but it has "
                                  f"{torch.cuda.device_count()} visible GPU(s): start one process per GPU "
                                  "(--devices / --nproc_per_node at most the GPU count)")
            torch.cuda.set_device(local_rank)
            device, backend = torch.device("cuda", local_rank), "nccl"
            # A collective that fails or times out then raises in the call (PeerLost) instead of NCCL's watchdog
            # tearing the process down from another thread.
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        else:
            device, backend = torch.device("cpu"), "gloo"
        try:
            dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
        except Exception as exc:  # noqa: BLE001
            raise PeerLost(f"could not join the data-parallel job as rank {rank} of {size} ({backend}): "
                           f"{_first_line(exc)}") from None
        self._world = TorchCollective(rank, size, device, timeout_s)
        self._local_rank = local_rank
        return self._world

    def close(self) -> None:
        """Leave the data-parallel job (if any); never raises."""
        if self._world is not None:
            self._world.close()

    # ------------------------------------------------------------------ setup

    def setup(self, cfg: Any, seed: int) -> SetupInfo:
        """Load the model (quantized if asked), attach LoRA with the framework-free initial weights, build the
        optimizer: the steps below, in this order."""
        noise.hide_loading_bars()
        self._read_config(cfg)
        self._pick_device()
        model_dir = self._resolve_model_dir(cfg.model.path)
        folder_config = model_folder.read_config(model_dir)
        model_folder.refuse_mlx_quantized_for_torch(model_dir, folder_config)
        self._read_folder_quantization(model_dir, folder_config)
        tokenizer = _load_tokenizer(model_dir)
        skeleton = _meta_skeleton(model_dir)
        self._check_lora_targets_before_loading(skeleton)
        # float32 compute on a 16-bit checkpoint: the frozen embedding and head stay 16-bit (torch_stored_dtype.py)
        stored = torch_stored_dtype.plan(skeleton, model_dir, self._compute_dtype) if skeleton is not None else {}
        model = self._load_model(model_dir, stored)
        self._kept_16bit = torch_stored_dtype.upcast_on_use(model, stored, self._compute_dtype)
        _check_vocabulary(model, tokenizer, model_dir)
        model = self._prepare_for_training(model)
        model, lora_layers = self._apply_lora(model, seed)
        self._model = model
        _init_lora_a(model, seed)
        self._find_plain_head()
        self._liger = self._liger_loss() if cfg.model.loss_kernel == "liger" else None
        self._score = self._build_score_head() if self._method == "reward" else None
        if self._score is not None:  # the score position's pad id, as the core's tokenizer pads (objectives.py)
            from overnight.data.tokenizer import load_tokenizer

            self._pad_id = load_tokenizer(model_dir).pad_id
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._param_names = [name for name, p in model.named_parameters() if p.requires_grad]
        if self._score is not None:  # trained fully beside LoRA: same optimizer, clip, all-reduce and checkpoints
            self._params.append(self._score.weight)
            self._param_names.append(PORTABLE_SCORE_KEY)
        if not self._params:
            raise ConfigError(f"config key 'lora.targets': {list(cfg.lora.targets)} matched no trainable module")
        self._optimizer = self._build_optimizer()
        return self._setup_info(model_dir, tokenizer, lora_layers)

    def _backbone(self):
        """reward: the decoder without its LM head (LoRA inside), whose output is the final-normed hidden states."""
        base = self._peft_model().get_base_model()
        backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
        if not isinstance(backbone, torch.nn.Module) or backbone is base:
            raise ConfigError(f"config key 'data.method': reward needs the decoder of {type(base).__name__} without "
                              "its output head, and this architecture does not expose one (base_model_prefix); "
                              "train a reward model on a Llama/Qwen/Mistral-style model")
        return backbone

    def _build_score_head(self) -> torch.nn.Linear:
        """reward's score head (objectives.py): hidden -> 1, no bias, float32, zero at the start (every pair's
        loss starts at log 2 whatever the base)."""
        self._backbone()
        hidden = self._model.config.get_text_config().hidden_size
        head = torch.nn.Linear(hidden, 1, bias=False, device=self._device, dtype=torch.float32)
        torch.nn.init.zeros_(head.weight)
        return head

    def _reward_scores(self, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """r(row), float32 (B,): the score head on the final hidden state at each row's score position; the LM head
        never runs."""
        with self._autocast():
            hidden = self._backbone()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        picked = hidden[torch.arange(ids.shape[0], device=hidden.device), positions].float()
        return (picked @ self._score.weight.t()).squeeze(-1)

    @_say_which_op_is_not_deterministic
    def reward_scores(self, batch: Batch) -> np.ndarray:
        """reward: each row's score, float32 (B,), without gradients or dropout (validation, tests, export checks)."""
        self._model.eval()
        ids, attn, _, positions, _ = self._tensors(batch)
        try:
            with torch.no_grad():
                return self._reward_scores(ids, attn, positions[0]).cpu().numpy()
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            message = _first_line(exc)
        self._recover_from_oom()
        raise OutOfMemory(f"out of memory scoring a batch of {batch.num_rows} rows: {message}")

    def _read_config(self, cfg: Any) -> None:
        self._cfg = cfg
        self._method = cfg.data.method
        self._beta = float(cfg.preference.beta)
        self._grpo = cfg.grpo
        self._optimizer_name = cfg.train.optimizer

    def _read_folder_quantization(self, model_dir: Path, folder_config: dict) -> None:
        """The quantization the base loads with (self._bits, self._prequantized): model.quantization.bits, unless the
        folder was saved quantized (a bitsandbytes 4-bit upload, GPTQ, ...), which transformers loads as it is
        whatever is asked; model.quantization then is said as not applied (it read as "none" or "int8" while the
        layers were 4-bit)."""
        bits = self._cfg.model.quantization.bits
        saved = folder_config.get("quantization_config")
        self._prequantized, self._bits, self._quantization_note = None, bits, None
        if not isinstance(saved, dict) or not saved:
            return
        method = str(saved.get("quant_method") or "quantized")
        if method == "bitsandbytes":
            self._bits = 4 if saved.get("load_in_4bit") else 8 if saved.get("load_in_8bit") else bits
            kind = (f"bitsandbytes {saved.get('bnb_4bit_quant_type', 'fp4')}"
                    f"{', double quantization' if saved.get('bnb_4bit_use_double_quant') else ''}"
                    if self._bits == 4 else "bitsandbytes int8")
            same = self._bits == bits
        else:
            kind, same = method, False
        self._prequantized = f"pre-quantized {kind} (saved in the model folder), used as is"
        if not same:
            self._quantization_note = (f"model.quantization.bits={bits} is not applied: {model_dir} is saved "
                                       f"quantized ({kind}) and trains as it is; give the original model to "
                                       "quantize it another way")

    def _pick_device(self) -> None:
        """This process's device and compute dtype, and CUDA's deterministic mode (train.deterministic). In a
        data-parallel job each rank has its own GPU (connect() set it current): QLoRA per rank."""
        self._device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        on_cuda = self._device.type == "cuda"
        if on_cuda:
            # The losses' sums are deterministic by construction (_row_sums); what can still reorder float sums from
            # run to run on CUDA is in kernels overnight does not write (attention's backward above all: flash and
            # memory-efficient attention accumulate dQ across key blocks with atomics), so a bit-exact resume needs
            # the mode, and the strict one: with warn_only=True torch keeps both attention backwards
            # non-deterministic and only warns once (aten/src/ATen/native/transformers/cuda/attention_backward.cu),
            # and still picks cuDNN's attention (sdp_utils.cpp). Strict, an op with no deterministic CUDA kernel
            # raises instead, said as this key (_say_which_op_is_not_deterministic). Its price: every torch.empty is
            # filled (fill_uninitialized_memory), bitsandbytes' dequantisation buffers included. The CPU's kernels
            # are deterministic already: there the mode would only add the fills.
            deterministic = bool(self._cfg.train.deterministic)
            if deterministic:
                fix_cublas_workspace(os.environ)
            torch.use_deterministic_algorithms(deterministic)
        self._deterministic_note = None if on_cuda or self._cfg.train.deterministic else (
            "train.deterministic=false changes nothing on the CPU: its kernels are deterministic, there is no mode "
            "to turn off (the key switches torch's on CUDA)")
        if self._optimizer_name == "paged_adamw_8bit" and not on_cuda:
            raise ConfigError(
                "config key 'train.optimizer': paged_adamw_8bit needs a CUDA GPU (bitsandbytes paged optimizers are "
                "CUDA-only); use train.optimizer=adamw on this machine"
            )
        # auto: bf16 where the GPU has it natively (Ampere and newer); fp32 on CPU and on older GPUs, where bf16 would
        # be emulated (slow) and fp16 would need a grad scaler. model.dtype names one to run another (bf16 on CPU
        # is how the tests see the GPU's dtype path).
        named = self._cfg.model.dtype
        if named == "auto":
            native_bf16 = on_cuda and torch.cuda.is_bf16_supported(including_emulation=False)
            self._compute_dtype = torch.bfloat16 if native_bf16 else torch.float32
        else:
            self._compute_dtype = getattr(torch, named)

    def _check_lora_targets_before_loading(self, skeleton) -> None:
        """lora.targets checked on the model's skeleton (no weights, no memory), so a misspelt target is refused in
        seconds rather than after loading (and quantizing) a large base. Best effort: an architecture that cannot be
        built on the meta device is checked after loading, in _apply_lora, as every model is."""
        num_layers = getattr(skeleton.config.get_text_config(), "num_hidden_layers", None) if skeleton else None
        if num_layers is None:
            return
        lora_targets.resolve(self._cfg.lora.targets, _lora_capable_paths(skeleton),
                             lora_targets.lora_blocks(num_layers, self._cfg.lora.layers))

    def _load_model(self, model_dir: Path, stored: dict[str, torch.dtype]):
        """The base causal LM, quantized by bitsandbytes when model.quantization.bits is 4 or 8, on this device; the
        weights named in ``stored`` loaded in their 16-bit dtype."""
        from transformers import AutoModelForCausalLM

        bits = self._bits
        load_kwargs: dict[str, Any] = {"dtype": self._compute_dtype}
        if bits in (4, 8) and self._prequantized is None:
            load_kwargs["quantization_config"] = self._quantization_config(bits)
        if self._device.type == "cuda" or bits in (4, 8) or self._prequantized is not None:
            # Straight onto the device: no full-precision copy of a large model in host memory first.
            load_kwargs["device_map"] = {"": self._device.index if self._device.type == "cuda" else "cpu"}
        try:
            with _weights_read_not_mapped(), torch_stored_dtype.loading_in(stored):
                model = AutoModelForCausalLM.from_pretrained(str(model_dir), **load_kwargs)
        except Exception as exc:  # noqa: BLE001 - a truncated or corrupt weight file raises SafetensorError, not OSError
            if _is_oom(exc):
                # Said, not a crash: a supervised run would otherwise be relaunched into the same failure.
                raise TrainingError(_load_out_of_memory(model_dir, bits, self._device, exc)) from None
            raise ConfigError(
                f"config key 'model.path': cannot load a causal LM from {model_dir}: {exc.__class__.__name__}: "
                f"{str(exc)[:300]}. Check that the weight files are complete (re-download or re-copy the model)"
            ) from None
        model.config.use_cache = False
        _keep_4bit_weights_unpacked(model)
        if self._prequantized is not None:
            # the folder's bnb_4bit_compute_dtype (often float32 or float16) would run every 4-bit matmul in it
            # whatever model.dtype says: the compute dtype is the config's, as for a base quantized here
            for module in model.modules():
                if getattr(module, "compute_dtype", None) is not None:
                    module.compute_dtype = self._compute_dtype
        return model

    def _quantization_config(self, bits: int):
        from transformers import BitsAndBytesConfig

        if bits == 4:
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=self._compute_dtype,
            )
        return BitsAndBytesConfig(load_in_8bit=True)

    def _prepare_for_training(self, model):
        """The base frozen, every weight left in the dtype it was loaded in, and gradient checkpointing when
        model.grad_checkpoint asks.

        Not PEFT's prepare_model_for_kbit_training: it casts every non-quantized weight (embeddings, norms, output
        head) to float32, so the residual stream between blocks runs in float32 (about twice the activations of a
        bf16 run, and 2 GB more for an 8B model's embeddings and head). Norms compute in float32 inside their forward
        (LlamaRMSNorm and its kin upcast), LoRA keeps float32 weights (PEFT's autocast_adapter_dtype) and casts
        its output back. Its other step, making the embeddings' output require grad, is for reentrant
        checkpointing; overnight's is non-reentrant, which needs no such hook."""
        for param in model.parameters():
            param.requires_grad_(False)
        if self._cfg.model.grad_checkpoint:
            # Non-reentrant: its recompute replays the saved RNG state, so dropout masks (and losses) do not change.
            ckpt_kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        return model

    def _apply_lora(self, model, seed: int):
        """(the PEFT model, the block indices that got LoRA): lora.rank/alpha/dropout on lora.targets of the last
        lora.layers blocks (-1: all)."""
        from peft import LoraConfig, get_peft_model

        lora = self._cfg.lora
        if lora.use_dora and self._bits == 8 and self._device.type != "cuda":
            # bitsandbytes' int8 layer on the CPU cannot be dequantized for DoRA's norm once it has run: PEFT's
            # forward raised AttributeError at the first step (tests/test_dora.py)
            raise ConfigError("config key 'lora.use_dora': DoRA on an 8-bit base does not run on the CPU "
                              "(bitsandbytes' int8 weights cannot be dequantized there) -> use "
                              "model.quantization.bits=4 or 0, or lora.use_dora=false")
        num_layers = model.config.get_text_config().num_hidden_layers
        blocks = lora_targets.lora_blocks(num_layers, lora.layers)
        self._lora_blocks_note = lora_targets.lora_blocks_note(num_layers, lora.layers)
        # PEFT errs only when no target matches anything: check each one first, by the rule mlx uses too.
        lora_targets.resolve(lora.targets, _lora_capable_paths(model), blocks)
        layers = None if len(blocks) == num_layers else blocks
        lora_config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,  # PEFT scales by lora_alpha / r, the same scale mlx-lm is given (SPEC §4)
            lora_dropout=lora.dropout,
            target_modules=list(lora.targets),
            layers_to_transform=layers,
            bias="none",
            task_type="CAUSAL_LM",
            use_dora=bool(lora.use_dora),  # PEFT's DoRA is the definition both backends compute (lora_init.DORA)
        )
        _seed_everything(seed)  # right before LoRA init, so the adapter's initial weights depend on the seed alone
        try:
            with warnings.catch_warnings():
                # PEFT probes a property transformers 5 deprecated; the warning is theirs, not the user's.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(model, lora_config)
        except ValueError as exc:
            raise ConfigError(f"config key 'lora.targets' {list(lora.targets)}: {exc}") from None
        # A local folder by its absolute path, a hub id as given (not this machine's cache folder): the rule every
        # adapter overnight writes follows (adapter_formats.recorded_base).
        model.peft_config["default"].base_model_name_or_path = recorded_base(self._cfg.model.path)
        if lora.use_dora:
            _start_dora_magnitudes_in_float32(model)
        return model, (layers if layers is not None else list(range(num_layers)))

    def _setup_info(self, model_dir: Path, tokenizer, lora_layers: list[int]) -> SetupInfo:
        cfg, bits = self._cfg, self._bits
        trainable, total = self._model.get_nb_trainable_parameters()
        lora_modules = sorted({name.split(".lora_")[0] for name in self._param_names})
        details = {
            "device": str(self._device),
            "compute_dtype": str(self._compute_dtype).replace("torch.", ""),
            "loss_head": ("output head on target positions only, Liger-Kernel's fused linear cross-entropy"
                          if self._liger is not None
                          else f"output head on target positions only, {self._chunk_rows} a chunk" if self._plain_head
                          else "the model's own head on target positions, all at once (its logits are not a plain "
                               "projection of the decoder's output)"),
            "quantization": self._prequantized or {0: "none", 4: "bitsandbytes nf4, double quantization, blocksize 64",
                                                   8: "bitsandbytes int8"}[bits],
            "lora_layers": lora_layers,
            "lora_modules": len(lora_modules),
            "lora_scale": cfg.lora.alpha / cfg.lora.rank,
            "optimizer": self._optimizer_name,
            "adamw_fused": self._fused,
            "grad_checkpoint": bool(cfg.model.grad_checkpoint),
            "method": self._method,
            "tokenizer_size": tokenizer.vocab_size,
        }
        if self._lora_blocks_note:
            details["lora_layers_note"] = self._lora_blocks_note
        if self._kept_16bit:
            details["stored_16bit"] = (f"{', '.join(self._kept_16bit)} kept in the checkpoint's 16-bit dtype, "
                                       f"upcast to {details['compute_dtype']} on use (frozen; exact)")
        if self._compute_dtype == torch.float16:
            # HF Trainer's fp16 runs a GradScaler; overnight has none (nor has mlx-lm, whose fp16 overnight's mlx
            # backend matches): an activation gradient under fp16's 6e-8 becomes 0, and LoRA then learns less than
            # the loss says, without any error.
            details["float16_note"] = ("model.dtype=float16 computes without loss scaling: gradients smaller than "
                                       "float16 can hold are lost; bfloat16 (a GPU that has it) or float32 has no "
                                       "such floor")
        group_size = cfg.model.quantization.group_size
        if self._quantization_note:
            details["quantization_note"] = self._quantization_note
        elif bits == 4 and group_size != 64:
            details["note"] = (f"model.quantization.group_size={group_size} is not used by bitsandbytes, whose NF4 "
                               "blocksize is 64")
        elif bits == 8 and group_size != 64:
            details["note"] = (f"model.quantization.group_size={group_size} is not used by bitsandbytes' int8, which "
                               "scales each row of a weight as a whole (LLM.int8)")
        if self._deterministic_note:
            details["deterministic_note"] = self._deterministic_note
        return SetupInfo(trainable_params=int(trainable), total_params=int(total), model_dir=model_dir, details=details)

    @staticmethod
    def _resolve_model_dir(path: str) -> Path:
        from overnight.backend import hub

        return hub.resolve_model_dir(path, backend="torch")

    def _build_optimizer(self) -> torch.optim.Optimizer:
        train = self._cfg.train
        if self._optimizer_name == "paged_adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(self._params, lr=train.learning_rate, weight_decay=train.weight_decay)
        # One kernel for every parameter's update instead of a dozen element-wise ops over them; its state is the
        # default kernel's (exp_avg, exp_avg_sq, step), so checkpoints and portable states are unchanged.
        self._fused = _fused_adamw_supported(self._params)
        return torch.optim.AdamW(self._params, lr=train.learning_rate, weight_decay=train.weight_decay,
                                 fused=self._fused or None)

    def _match_optimizer_kernel(self) -> None:
        """After a checkpoint's optimizer state is loaded: load_state_dict keeps the param groups' flags of the
        optimizer that saved it (a run from before the fused default, or from a machine where it was not
        supported), so this run's choice is set again, and each step count is put where that kernel reads it."""
        if self._optimizer_name != "adamw":
            return
        for group in self._optimizer.param_groups:
            group["fused"], group["foreach"] = self._fused or None, None
        for param in self._params:
            state = self._optimizer.state.get(param)
            if state and "step" in state:
                state["step"] = self._adam_step(float(state["step"]), param)

    def _adam_step(self, value: float, param: torch.Tensor) -> torch.Tensor:
        """An AdamW step count as torch keeps it: float32, on the parameter's device for the fused kernel, on the
        CPU for the default one (torch/optim/adam.py, _init_group)."""
        return torch.tensor(value, dtype=torch.float32, device=param.device if self._fused else "cpu")

    # ------------------------------------------------------------------ steps

    def _autocast(self):
        if self._device.type == "cuda" and self._compute_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self._compute_dtype)
        return contextlib.nullcontext()

    def _tensors(self, batch: Batch) -> tuple:
        if self._method in objectives.PAIRED and (not batch.paired or batch.num_rows % 2):
            raise ValueError(f"method {self._method} needs paired rows (chosen, rejected), got an unpaired batch")
        if self._method == "grpo" and batch.advantages is None:
            raise ValueError("method grpo needs batches of sampled completions with advantages (src/methods/grpo.py)")
        dev = self._device
        ids = torch.from_numpy(np.ascontiguousarray(batch.input_ids, dtype=np.int64)).to(dev, non_blocking=True)
        mask = torch.from_numpy(np.ascontiguousarray(batch.loss_mask, dtype=np.float32)).to(dev, non_blocking=True)
        # The target positions, found on the host from the numpy mask: a nonzero() on the device would wait
        # for the GPU once per micro-batch.
        where = (np.nonzero(batch.loss_mask[:, 1:]) if self._method != "reward"
                 else (objectives.score_positions(batch.input_ids, batch.pad_id),))
        targets = tuple(torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64)).to(dev, non_blocking=True)
                        for index in where)
        # The positions whose hidden states are read: a target's predecessor, or a reward row's score position.
        read = where if len(where) == 2 else (np.arange(batch.num_rows), where[0])
        attn = None if _causal_mask_changes_nothing(batch.attention_mask, *read) else torch.from_numpy(
            np.ascontiguousarray(batch.attention_mask, dtype=np.int64)).to(dev, non_blocking=True)
        grpo = None
        if batch.advantages is not None:
            adv = torch.from_numpy(np.ascontiguousarray(batch.advantages, dtype=np.float32)).to(dev, non_blocking=True)
            old = None if batch.old_logp is None else torch.from_numpy(
                np.ascontiguousarray(batch.old_logp, dtype=np.float32)).to(dev, non_blocking=True)
            grpo = (adv, old)
        return ids, attn, mask, targets, grpo

    def _row_logp_sums(self, ids: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor,
                       sel: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Per row, the mask-weighted sum of next-token log-probabilities, (B,): mask[:, t-1] weighs the score of
        input_ids[:, t] given input_ids[:, :t].

        The output head runs only at the target positions: a pre-hook hands it the hidden states there, (N, H),
        instead of (B, T, H). On a large vocabulary the head and its cross-entropy are a large share of the step,
        and most positions (prompts, padding) have no target. Same values as the full logits up to float rounding;
        a model whose head gets anything but (B, T, H) takes the full path."""
        return _row_sums(self._target_logps(ids, attn, sel) * mask[sel], sel, mask.shape)

    def _target_logps(self, ids: torch.Tensor, attn: torch.Tensor, sel: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The log-probability of each target token, float32 (N,) in the order of ``sel`` (the nonzero positions of
        loss_mask[:, 1:]). A pre-hook on the output head takes the decoder's hidden states at those positions and
        hands the head none, so the model's own forward computes no logits; the head then runs on the taken states
        in chunks (_chunked_logps). A model whose logits are not a plain projection (found at setup by
        _find_plain_head) gets its head run by its own forward on the target positions, all at once."""
        head = self._model.get_output_embeddings()
        taken = []

        def take_targets(module, args):
            hidden = args[0]
            if taken or hidden.dim() != 3 or hidden.shape[:2] != ids.shape:
                return None
            taken.append(hidden[:, :-1][sel])
            return (hidden[:, :0] if self._plain_head else taken[0],) + tuple(args[1:])

        handle = head.register_forward_pre_hook(take_targets) if head is not None else None
        try:
            with self._autocast():
                logits = self._model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        finally:
            if handle is not None:
                handle.remove()
        targets = ids[:, 1:][sel]
        if taken and self._plain_head:
            return self._chunked_logps(taken[0], targets)
        if logits.dim() == 3:
            logits = logits[:, :-1][sel]
        return -F.cross_entropy(self._tempered(logits.float()), targets, reduction="none")

    def _logit_temperature(self) -> float:
        """grpo's log-probs are those of the policy that sampled: logits / grpo.temperature (objectives.py); every
        other method's temperature is 1."""
        return self._grpo.temperature if self._method == "grpo" else 1.0

    def _tempered(self, logits: torch.Tensor) -> torch.Tensor:
        temperature = self._logit_temperature()
        return logits / temperature if temperature != 1.0 else logits

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self._model.get_output_embeddings()(hidden)
        if self._softcap:
            logits = torch.tanh(logits.float() / self._softcap) * self._softcap
        return logits.float()

    def _head_logps(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(self._tempered(self._head_logits(hidden)), targets, reduction="none")

    def _chunked_logps(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """_head_logps of (N, H) hidden states, objectives.logit_chunk_rows positions at a time. Under autograd each
        chunk is checkpointed: its logits are freed after its forward and recomputed in the backward, so no
        (N x vocabulary) tensor outlives one chunk (the cost: the head's matmul once more). With
        model.loss_kernel=liger, Liger-Kernel's fused linear cross-entropy computes the same values instead."""
        if self._liger is not None:
            return self._liger_logps(hidden, targets)
        rows = self._chunk_rows
        # One chunk: its logits are at their largest when the backward starts either way, so a checkpoint would
        # only add the head's matmul once more.
        keep_graph = torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[0] > rows
        pieces = []
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            if keep_graph:  # the head is deterministic: no RNG state to keep for the recompute
                pieces.append(checkpoint(self._head_logps, h, t, use_reentrant=False, preserve_rng_state=False))
            else:
                pieces.append(self._head_logps(h, t))
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]

    def _liger_loss(self):
        """model.loss_kernel=liger: Liger-Kernel's fused linear cross-entropy, where it computes what the chunked
        head does; anything else is refused by name rather than run another way."""
        def refuse(why: str) -> ConfigError:
            return ConfigError(f"config key 'model.loss_kernel': liger {why} -> model.loss_kernel=chunked")

        if self._method == "reward":
            raise refuse("takes the LM head's log-probs, which a reward model (data.method=reward) never computes")
        installed = _installed_older_than("liger-kernel", LIGER_PER_TOKEN_GRADIENTS)
        if installed is not None:
            # Before it, the backward of reduction "none" multiplies every token's input gradient by the first
            # token's upstream gradient (Liger-Kernel #1298): dpo's and grpo's per-token weights differ, so the
            # LoRA gradients would be wrong without any error. Read from the metadata: checked before the GPU.
            raise refuse(f"needs liger-kernel {LIGER_PER_TOKEN_GRADIENTS} or newer; liger-kernel {installed} is "
                         "installed, whose per-token losses (reduction \"none\") get the first token's gradient "
                         f"weight on every token: pip install -U 'liger-kernel>={LIGER_PER_TOKEN_GRADIENTS}'")
        if self._device.type != "cuda":
            raise refuse(f"runs on CUDA GPUs (Triton kernels) and this torch sees no GPU (device {self._device})")
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except Exception as exc:  # noqa: BLE001 - missing, or a Triton that does not import on this machine
            raise refuse(f"needs the liger-kernel package, which does not import here ({exc.__class__.__name__}: "
                         f"{str(exc)[:200]}): pip install 'liger-kernel>={LIGER_PER_TOKEN_GRADIENTS}'") from None
        head = self._model.get_output_embeddings()
        if not self._plain_head or head.bias is not None:
            raise refuse("needs logits that are the output head's plain projection (no bias, no other scaling); "
                         "this model's are not")
        if head.weight.dtype != self._compute_dtype:
            raise refuse(f"needs the output head in the compute dtype ({self._compute_dtype}); it is kept in "
                         f"{head.weight.dtype} (float32 compute on a 16-bit checkpoint): use model.dtype=bfloat16")
        if self._logit_temperature() != 1.0 and self._softcap:
            raise refuse("cannot divide soft-capped logits (final_logit_softcapping) by grpo.temperature")
        return liger_fused_linear_cross_entropy

    def _liger_logps(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) of (N, H) hidden states by Liger's kernel: its per-token cross-entropy (reduction "none",
        whose backward takes each token's own upstream gradient), negated. grpo's logits / T are (hidden / T) @ W.T
        (the head has no bias: checked at setup)."""
        temperature = self._logit_temperature()
        weight = self._model.get_output_embeddings().weight
        if temperature != 1.0:
            hidden = hidden / temperature
        losses = self._liger(hidden.to(weight.dtype), weight, targets, reduction="none", softcap=self._softcap)
        return -losses.float()

    def _find_plain_head(self) -> None:
        """Whether the model's logits are exactly its output head (then Gemma's final soft-capping, where the config
        has one) applied to the decoder's last hidden states: decided by a 4-token probe compared both ways, not by
        a list of architectures, so a model that scales or shifts its logits keeps its own forward."""
        model, head = self._model, self._model.get_output_embeddings()
        self._softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self._plain_head = False
        vocab = model.config.get_text_config().vocab_size
        if head is not None and getattr(head, "weight", None) is not None:
            vocab = head.weight.shape[0]
        self._chunk_rows = objectives.logit_chunk_rows(vocab)
        if head is None:
            return
        taken = []
        probe = torch.tensor([[1, 2, 3, 4]], device=self._device)
        handle = head.register_forward_pre_hook(lambda module, args: taken.append(args[0]) if not taken else None)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self._autocast():
                want = model(input_ids=probe, use_cache=False).logits.float()
            if taken and taken[0].shape[:2] == probe.shape:
                with torch.no_grad():
                    got = self._head_logits(taken[0])
                self._plain_head = got.shape == want.shape and bool(torch.allclose(want, got, rtol=1e-3, atol=1e-3))
        except Exception:  # noqa: BLE001 - a head that cannot be probed keeps the model's own forward
            self._plain_head = False
        finally:
            handle.remove()
            model.train(was_training)

    def _grpo_objective(self, ids, attn, mask, sel, adv, old, token_scale: float) -> torch.Tensor:
        """This micro-batch's share of the grpo objective (src/backend/objectives.py): sum over its rows of the row's
        per-token losses over the row's divisor, times token_scale (1/N of the step). Adds the micro-batch's
        KL sums to self._kl_sums for the step's mean kl."""
        g = self._grpo
        logp = self._target_logps(ids, attn, sel)
        weights = mask[:, 1:][sel]
        adv_tok = adv[sel[0]]
        old_tok = old[:, 1:][sel] if old is not None else logp.detach()
        ratio = torch.exp(logp - old_tok)
        per_token = -torch.min(ratio * adv_tok, ratio.clamp(1.0 - g.epsilon, 1.0 + g.epsilon) * adv_tok)
        if g.beta > 0:
            with torch.no_grad(), self._model.disable_adapter():
                ref = self._target_logps(ids, attn, sel)
            diff = ref - logp
            kl = torch.exp(diff) - diff - 1.0
            per_token = per_token + g.beta * kl
            if self._kl_sums is not None:
                self._kl_sums.append(torch.stack([(kl.detach() * weights).sum(), weights.sum()]))
        row_tokens = mask[:, 1:].sum(dim=1)
        # dr_grpo and dapo divide by a constant (max_new_tokens; 1, dapo's 1/C being token_scale)
        divisor = objectives.grpo_row_divisor(g.loss_type, 0, g.max_new_tokens) if g.loss_type in ("dr_grpo", "dapo") \
            else row_tokens.clamp(min=1.0)
        rows = _row_sums(per_token * weights, sel, (ids.shape[0], ids.shape[1] - 1)) / divisor
        return rows.sum() * token_scale

    def _objective(self, ids: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor, targets: tuple[torch.Tensor, ...],
                   grpo, token_scale: float, pair_scale: float) -> torch.Tensor:
        """This micro-batch's share of the step objective (src/backend/objectives.py, SPEC §9): its token sums times
        token_scale plus its pair sums times pair_scale, the scales being 1/T and 1/P of the whole step."""
        if self._method == "grpo":
            return self._grpo_objective(ids, attn, mask, targets, *grpo, token_scale)
        if self._method == "reward":
            r = self._reward_scores(ids, attn, targets[0])
            pair_losses = -F.logsigmoid(r[0::2] - r[1::2])
            center = self._cfg.reward.center_coefficient
            if center:
                pair_losses = pair_losses + center * (r[0::2] + r[1::2]) ** 2
            return pair_losses.sum() * pair_scale
        mask = mask[:, 1:]
        sums = self._row_logp_sums(ids, attn, mask, targets)
        if self._method == "dpo":
            with torch.no_grad(), self._model.disable_adapter():
                ref_sums = self._row_logp_sums(ids, attn, mask, targets)
            margin = (sums[0::2] - ref_sums[0::2]) - (sums[1::2] - ref_sums[1::2])
            return -F.logsigmoid(self._beta * margin).sum() * pair_scale
        if self._method == "orpo":
            avg = (sums / mask.sum(dim=1).clamp(min=1)).clamp(max=objectives.AVG_LOGP_MAX)
            log_odds = avg - torch.log(-torch.expm1(avg))
            odds_ratio_loss = -F.logsigmoid(log_odds[0::2] - log_odds[1::2]).sum()
            return -sums[0::2].sum() * token_scale + self._beta * odds_ratio_loss * pair_scale
        return -sums.sum() * token_scale

    @_say_which_op_is_not_deterministic
    def train_step(self, micro_batches: list[Batch], lr: float,
                   step_scales: tuple[float, float, int] | None = None) -> StepResult:
        self._model.train()
        for group in self._optimizer.param_groups:
            group["lr"] = lr
        token_scale, pair_scale, weight = (step_scales if step_scales is not None else objectives.step_scales(
            self._method, micro_batches, self._grpo.loss_type))
        tokens = sum(mb.num_target_tokens for mb in micro_batches)
        if weight == 0:
            raise ValueError("a training step with no target tokens: every loss_mask entry is 0 "
                             "(check data.mask_prompt and model.max_seq_length)")
        if self._world is not None and self._world.size > 1:
            return self._shared_step(micro_batches, token_scale, pair_scale, tokens)
        try:
            loss_sum = self._local_passes(micro_batches, token_scale, pair_scale)
            norm = self._clip()
            figures = [loss_sum, norm.float()]
            if self._kl_sums:
                figures += list(torch.stack(self._kl_sums).sum(dim=0))
            values = torch.stack(figures).tolist()  # the step's one host sync
            kl = objectives.mean_kl(values[2], values[3]) if len(values) > 2 else None
            self._apply(values[0], values[1])
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            message = _oom_message(exc)
        else:
            return self._result(values[0], tokens, values[1], kl)
        # Outside the except block: the traceback, and the activations its frames hold, are gone by now.
        self._recover_from_oom()
        raise OutOfMemory(f"out of memory in a step of {sum(mb.num_rows for mb in micro_batches)} rows in "
                          f"{len(micro_batches)} micro-batches: {message}")

    def _local_passes(self, micro_batches: list[Batch], token_scale: float, pair_scale: float) -> torch.Tensor:
        """Forward and backward of each micro-batch, gradients accumulated in .grad; returns the objective's sum
        (on the device: no host sync here)."""
        # Every upload is queued before any compute, so no copy waits on the GPU mid-step.
        inputs = [self._tensors(mb) for mb in micro_batches]
        loss_sum = torch.zeros((), dtype=torch.float32, device=self._device)
        self._kl_sums = [] if self._method == "grpo" else None
        for batch, tensors in zip(micro_batches, inputs):
            if batch.noise_seed is not None:  # this micro-batch's dropout masks, whichever rank runs it
                torch.manual_seed(batch.noise_seed)
            objective = self._objective(*tensors, token_scale, pair_scale)
            objective.backward()
            loss_sum += objective.detach()
            del objective
        return loss_sum

    def _clip(self) -> torch.Tensor:
        max_norm = self._cfg.train.max_grad_norm
        # max_norm 0 means no clipping; inf still yields the global norm and scales grads by exactly 1.
        return torch.nn.utils.clip_grad_norm_(self._params, max_norm if max_norm > 0 else math.inf)

    def _apply(self, loss_value: float, norm_value: float) -> None:
        if objectives.update_applies(loss_value, norm_value):  # a non-finite step is reported, never applied
            self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def _result(self, loss_value: float, tokens: int, norm_value: float, kl: float | None) -> StepResult:
        self._step_extras = {"kl": kl} if kl is not None else {}
        return StepResult(loss=loss_value, tokens=tokens, grad_norm=norm_value, extras=self._step_extras)

    def _flat_buffer(self, loss_sum: torch.Tensor | None, tokens: int, out_of_memory: bool) -> torch.Tensor:
        """The step's data-parallel buffer (src/backend/step_buffer.py): every LoRA gradient (zeros where a parameter
        has none, or after this rank ran out of memory), then the figures, as one float32 vector on the device."""
        dev = self._device
        grads = [torch.zeros(p.numel(), dtype=torch.float32, device=dev) if out_of_memory or p.grad is None
                 else p.grad.reshape(-1).float() for p in self._params]
        zero = torch.zeros((), dtype=torch.float32, device=dev)
        kl = torch.stack(self._kl_sums).sum(dim=0).float() if self._kl_sums and not out_of_memory \
            else torch.zeros(2, dtype=torch.float32, device=dev)
        figures = step_buffer.in_order(
            loss_sum=zero if loss_sum is None or out_of_memory else loss_sum.float(), kl_sum=kl[0], kl_tokens=kl[1],
            tokens=torch.tensor(float(tokens), dtype=torch.float32, device=dev),
            out_of_memory=torch.tensor(1.0 if out_of_memory else 0.0, dtype=torch.float32, device=dev))
        return torch.cat(grads + [torch.stack(figures)])

    def _shared_step(self, micro_batches: list[Batch], token_scale: float, pair_scale: float,
                     tokens: int) -> StepResult:
        """One step of a data-parallel job: the local passes, then ONE all-reduce (sum) of the flat buffer
        (_flat_buffer, laid out as src/backend/step_buffer.py says) — what DDP's no_sync accumulation ends with,
        summed rather than averaged because each rank's objective is already scaled by the whole step's 1/T — then
        the global clip and the step. Every rank takes part in that all-reduce even when it ran out of memory (its
        flag makes every rank raise OutOfMemory with the weights untouched), so no rank is left waiting in it."""
        world = self._world
        rank = f"rank {world.rank} of {world.size}"
        message = None
        loss_sum = None
        try:
            loss_sum = self._local_passes(micro_batches, token_scale, pair_scale)
            flat = self._flat_buffer(loss_sum, tokens, False)
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            message, flat = _oom_message(exc), None
        if flat is None:  # outside the except block, so the failed passes' activations are freed
            loss_sum = None
            self._recover_from_oom()
            try:
                flat = self._flat_buffer(None, tokens, True)
            except RuntimeError as exc:
                if not _is_oom(exc):
                    raise
                raise PeerLost(f"out of memory on {rank} even for the step's gradient exchange buffer, so this "
                               f"process leaves the job: {_oom_message(exc)}") from None
        summed = world.reduce_tensor(flat)  # raises PeerLost when a peer died or timed out
        del flat
        try:
            sizes = [param.numel() for param in self._params]
            for param, part in zip(self._params, step_buffer.gradient_slices(sizes)):
                param.grad = summed[part].view_as(param).to(param.dtype)  # views: no copy where the dtypes agree
            norm = self._clip()
            values = torch.cat([summed[step_buffer.figures_slice(sizes)],
                                norm.float().reshape(1).to(summed.device)]).tolist()  # the step's one host sync
            del summed
            figures, norm_value = step_buffer.read_figures(values[:-1]), values[-1]
            if figures.out_of_memory:
                self._recover_from_oom()
                what = message or "another process of this data-parallel job ran out of memory"
                raise OutOfMemory(f"out of memory in a step of {sum(mb.num_rows for mb in micro_batches)} rows in "
                                  f"{len(micro_batches)} micro-batches on {rank}: {what}")
            self._apply(figures.loss_sum, norm_value)
        except torch.distributed.DistError as exc:  # NCCL reports a failed all-reduce when its result is read
            raise PeerLost(f"another process of this data-parallel job stopped answering or died (the gradient "
                           f"all-reduce on {rank}): {_first_line(exc)}") from None
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            # After the all-reduce the ranks cannot agree on a retry any more (this one would split the step while
            # the others applied it): this process leaves the job, which resumes from its last checkpoint.
            text = _oom_message(exc)
            self._recover_from_oom()
            raise PeerLost(f"out of memory in the optimizer update on {rank}, after the gradients were shared: "
                           f"{text}") from None
        kl = figures.kl if self._method == "grpo" and self._grpo.beta > 0 else None
        return self._result(figures.loss_sum, figures.tokens, norm_value, kl)

    def _recover_from_oom(self) -> None:
        self._optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @_say_which_op_is_not_deterministic
    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        """(objective x weight, weight) with the batch's own normalisers; weight = target tokens (sft, cpt) or
        pairs (dpo, orpo), as src/backend/objectives.py defines."""
        self._model.eval()
        token_scale, pair_scale, _ = objectives.step_scales(self._method, [batch], self._grpo.loss_type)
        weight = objectives.eval_weight(self._method, batch)
        try:
            with torch.no_grad():
                value = self._objective(*self._tensors(batch), token_scale, pair_scale).item()
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            message = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        else:
            return value * weight, weight
        self._recover_from_oom()
        raise OutOfMemory(f"out of memory evaluating a batch of {batch.num_rows} rows: {message}")

    @_say_which_op_is_not_deterministic
    def sample(self, prompts, seeds: list[int], max_new_tokens: int, temperature: float,
               top_p: float, stop_ids: tuple[int, ...]) -> np.ndarray:
        """One sampled continuation per seed, all rows in one batch (src/backend/__init__.py), KV cache, adapter
        on, eval mode (no dropout). Each row draws from its own torch.Generator, once per token whatever the
        batch: Gumbel-max over the top-p set, an exact categorical draw whose noise depends on that row's seed
        and the token's index alone."""
        self._model.eval()
        n = len(seeds)
        rows, single = as_prompts(prompts)
        rows = rows * n if single else rows
        if len(rows) != n:
            raise ValueError(f"sample: {len(rows)} prompts for {n} seeds")
        if n == 0 or max_new_tokens <= 0:
            return np.full((n, max(0, int(max_new_tokens))), -1, dtype=np.int64)
        temperature, top_p, dev = float(temperature), float(top_p), self._device
        gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]  # generator_seed's range
        noise = None

        def draw(logits: torch.Tensor) -> torch.Tensor:
            nonlocal noise
            # x / 1.0 is x bit for bit: no (rows x vocab) pass at the default temperature. logits is only read below.
            scaled = logits / temperature if temperature != 1.0 else logits
            if top_p < 1.0:
                # The smallest set of most likely tokens whose probability reaches top_p (the first one always).
                order = torch.argsort(scaled, dim=-1, descending=True)
                probs = torch.softmax(scaled.gather(-1, order), dim=-1)
                drop_sorted = _probability_before(probs) >= round(top_p * _TOP_P_UNIT)
                drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
                scaled = scaled.masked_fill(drop, -math.inf)
            # In place in one buffer kept across tokens: the same values as torch.rand per row and
            # scaled.double() + gumbel, bit for bit, without four fresh (rows x vocab) float64 tensors per token
            # (on the CPU their page faults cost as much as the arithmetic).
            if noise is None or noise.shape != scaled.shape:
                noise = torch.empty(scaled.shape, dtype=torch.float64, device=dev)
            for row, g in zip(noise, gens):
                row.uniform_(generator=g)
            noise.clamp_(min=1e-300).log_().neg_().log_().neg_().add_(scaled)  # Gumbel noise + the logits
            return torch.argmax(noise, dim=-1)

        return self._decode(rows, int(max_new_tokens), as_stop_ids(stop_ids), draw, f"sampling {n} completions")

    def _decode(self, rows: list[np.ndarray], max_new_tokens: int, stop_ids: tuple[int, ...], choose,
                what: str) -> np.ndarray:
        """The rows' continuations in one batch: int64 (rows, max_new_tokens), each row's stop token kept and -1
        after it. ``choose(logits)`` picks every row's next token from its float32 logits (rows, vocab).

        Rows of one prompt are adjacent: each distinct prompt is prefilled once and its KV cache repeated for its
        rows. Prompts are left-padded, with an attention mask and position ids counted from each row's first real
        token, so a row computes what it would alone (up to the rounding of batched kernels). A row that has ended
        is still fed (its tokens are masked out): it never changes another row. Whether every row has ended is
        read back every _stop_check_every() tokens, not every token: on an accelerator each read waits for the
        device."""
        try:
            with torch.no_grad(), self._autocast():
                return self._decode_rows(rows, max_new_tokens, stop_ids, choose)
        except (RuntimeError, MemoryError) as exc:
            if not _is_oom(exc):
                raise
            message = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        self._recover_from_oom()
        raise OutOfMemory(f"out of memory {what}: {message}")

    def _stop_check_every(self) -> int:
        # On the CPU every op has already run when Python sees its result, so a per-token check costs nothing and
        # saves the forward passes a later check would run after the last row ended.
        if self._stop_every is not None:
            return self._stop_every
        return 1 if self._device.type == "cpu" else STOP_CHECK_EVERY

    def _step_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The decode steps' attention mask: (rows, 1, 1, keys), True where a row attends, the mask transformers'
        sdpa_mask builds for one new token, which transformers then takes as it is. Handed the 2-D padding mask
        instead, it reads back to the host at every token whether any key is padding (masking_utils
        _ignore_causal_mask_sdpa). Only under sdpa attention with no sliding-window layer (such a layer needs a
        mask of its own); other models get the 2-D mask."""
        config = getattr(self._model, "config", None)
        types = getattr(config, "layer_types", None)
        full = all(t == "full_attention" for t in types) if types else not getattr(config, "sliding_window", None)
        if not full or getattr(config, "_attn_implementation", None) != "sdpa":
            return mask
        return mask.bool()[:, None, None, :]

    def _decode_rows(self, rows, max_new_tokens, stop_ids, choose) -> np.ndarray:
        dev, n = self._device, len(rows)
        starts = [r for r in range(n) if r == 0 or not np.array_equal(rows[r], rows[r - 1])]
        owner = torch.as_tensor(np.repeat(np.arange(len(starts)), np.diff(starts + [n])), device=dev)
        width = max(len(rows[r]) for r in starts)
        ids = torch.zeros((len(starts), width), dtype=torch.long, device=dev)  # 0 on the padding: it is masked
        attn = torch.zeros_like(ids)
        for u, r in enumerate(starts):
            ids[u, width - len(rows[r]):] = torch.as_tensor(rows[r], device=dev)
            attn[u, width - len(rows[r]):] = 1
        # The head runs on the last position only: on a large vocabulary the prompt's other logits cost more
        # than the prompt itself.
        result = self._model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                             use_cache=True, logits_to_keep=1)
        # transformers 5 calls the KV cache `cache`; its old name still works but logs a deprecation on every run.
        cache_name = "cache" if "cache" in result else "past_key_values"
        past, logits = result[cache_name], result.logits[:, -1].float()
        if len(starts) < n:
            past.reorder_cache(owner)  # index_select on the batch: each prompt's keys and values for each of its rows
            logits = logits[owner]
        mask = torch.ones((n, width + max_new_tokens), dtype=torch.long, device=dev)
        mask[:, :width] = attn[owner]
        position = torch.as_tensor([len(r) for r in rows], dtype=torch.long, device=dev).view(n, 1)
        step_mask = self._step_mask(mask)
        stop = torch.as_tensor(stop_ids, dtype=torch.long, device=dev)
        out = torch.full((n, max_new_tokens), -1, dtype=torch.long, device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        every = self._stop_check_every()
        for t in range(max_new_tokens):
            token = choose(logits)
            out[:, t] = token.masked_fill(done, -1)
            if stop.numel():
                done |= torch.isin(token, stop)
            if t + 1 == max_new_tokens or (stop.numel() and (t + 1) % every == 0 and bool(done.all())):
                break
            result = self._model(input_ids=token.view(n, 1), attention_mask=step_mask[..., :width + t + 1],
                                 position_ids=position + t, use_cache=True, **{cache_name: past})
            past, logits = result[cache_name], result.logits[:, -1].float()
        return out.cpu().numpy()

    @_say_which_op_is_not_deterministic
    def token_logps(self, batch: Batch, adapter: bool = True) -> np.ndarray:
        self._model.eval()
        ids, attn, _, sel, _ = self._tensors(batch)
        with torch.no_grad(), (contextlib.nullcontext() if adapter else self._model.disable_adapter()):
            values = self._target_logps(ids, attn, sel)
        out = np.zeros(batch.loss_mask.shape, dtype=np.float32)
        rows, cols = np.nonzero(batch.loss_mask[:, 1:])
        out[rows, cols + 1] = values.float().cpu().numpy()
        return out

    @_say_which_op_is_not_deterministic
    def generate(self, prompts, max_new_tokens: int, stop_ids: tuple[int, ...]):
        """Greedy continuations, without the prompt, each ending before its first stop token (not included): one
        array for one prompt, a list for a list, decoded in one batch (src/backend/__init__.py)."""
        self._model.eval()
        rows, single = as_prompts(prompts)
        stop_ids = as_stop_ids(stop_ids)
        if not rows or max_new_tokens <= 0:
            answers = [np.zeros(0, dtype=np.int64) for _ in rows]
        else:
            out = self._decode(rows, int(max_new_tokens), stop_ids, lambda logits: torch.argmax(logits, dim=-1),
                               f"generating {len(rows)} answers")
            answers = [_until_stop(row, stop_ids) for row in out]
        return answers[0] if single else answers

    # ------------------------------------------------------------------ checkpoints

    def _peft_model(self):
        # torch.compile wraps the module in _orig_mod, whose state-dict keys PeftModel.from_pretrained cannot read.
        return getattr(self._model, "_orig_mod", self._model)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self._peft_model().save_pretrained(str(directory / "adapter"), safe_serialization=True)
        # PEFT writes target_modules from a set, so its order changes between processes; sort it so
        # the same adapter is the same bytes (the manifest and the crash tests compare bytes).
        config_path = directory / "adapter" / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        if isinstance(adapter_config.get("target_modules"), list):
            adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
        if self._score is not None:
            self._save_score_head(directory / "adapter", adapter_config)
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        give_default_modes(directory / "adapter")  # safetensors writes 0600; RUN_DIR/adapter/ is a copy of this
        torch.save(self._optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(
            {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            directory / "rng_torch.pt",
        )
        py_state = random.getstate()
        np_state = np.random.get_state()
        rng = {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        }
        (directory / "rng_state.json").write_text(json.dumps(rng))
        state = {
            "format": STATE_FORMAT,
            "optimizer": self._optimizer_name,
            "method": self._method,
            "quantization_bits": self._cfg.model.quantization.bits,
            "trainable": self._param_names,
        }
        (directory / "backend_state.json").write_text(json.dumps(state, indent=1))

    def _save_score_head(self, adapter_dir: Path, adapter_config: dict) -> None:
        """A reward run's adapter is PEFT's for AutoModelForSequenceClassification (task SEQ_CLS, the head in
        modules_to_save under PEFT's own key), so transformers + PEFT score with it as overnight does; the pad id
        (the score position's rule, objectives.py) is for the user to pass, recorded in reward_head.json: LoraConfig
        warns about every key of adapter_config.json it does not know."""
        from safetensors.torch import load_file, save_file

        path = adapter_dir / "adapter_model.safetensors"
        tensors = load_file(str(path))
        tensors[PEFT_SCORE_KEY] = self._score.weight.detach().float().cpu().contiguous()
        save_file(tensors, str(path) + ".tmp", metadata={"format": "pt"})
        os.replace(str(path) + ".tmp", path)
        adapter_config.update(task_type="SEQ_CLS", modules_to_save=["score"])
        (adapter_dir / REWARD_HEAD).write_text(reward_head_text("peft", self._pad_id), encoding="utf-8")

    def load(self, directory: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        state = json.loads((directory / "backend_state.json").read_text())
        if state["optimizer"] != self._optimizer_name:
            # bitsandbytes keeps state1/state2 where torch AdamW keeps exp_avg/exp_avg_sq (bitsandbytes #782).
            raise ConfigError(
                f"config key 'train.optimizer': the checkpoint in {directory} was trained with {state['optimizer']}, "
                f"this run asks for {self._optimizer_name}; optimizer state cannot move between the two"
            )
        if state["trainable"] != self._param_names:
            raise ValueError(f"the checkpoint in {directory} holds a different set of LoRA parameters than this model "
                             "(lora.rank, lora.layers or lora.targets changed?)")

        weights = load_file(str(directory / "adapter" / "adapter_model.safetensors"), device=str(self._device))
        head = weights.pop(PEFT_SCORE_KEY, None)
        if (head is None) != (self._score is None):
            raise ValueError(f"the checkpoint in {directory} {'lacks' if head is None else 'holds'} a reward score "
                             f"head and this run's method is {self._method}")
        if head is not None:
            with torch.no_grad():
                self._score.weight.copy_(head)
        result = set_peft_model_state_dict(self._peft_model(), weights)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"adapter in {directory} has tensors this model lacks: {unexpected[:5]}")
        missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
        if missing:
            raise ValueError(f"adapter in {directory} lacks LoRA tensors: {missing[:5]}")

        self._optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))
        self._match_optimizer_kernel()

        rng = json.loads((directory / "rng_state.json").read_text())
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np_state = rng["numpy"]
        np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
        torch_rng = torch.load(directory / "rng_torch.pt", map_location="cpu", weights_only=True)
        torch.set_rng_state(torch_rng["cpu"])
        if torch.cuda.is_available() and torch_rng["cuda"]:
            for index, cuda_state in enumerate(torch_rng["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, index)

    def _portable_keys(self) -> list[str]:
        # PEFT's lora_A (r, in), lora_B (out, r) and DoRA's magnitude (out,) are already the neutral layout: only
        # the names change.
        return [name if name == PORTABLE_SCORE_KEY else
                lora_init.neutral_module_name(name.split(".lora_")[0]) + _PORTABLE_SUFFIX[name.split(".lora_")[1][0]]
                for name in self._param_names]

    def portable_state(self) -> PortableState:
        keys = self._portable_keys()
        weights = {k: p.detach().float().cpu().numpy() for k, p in zip(keys, self._params)}
        meta = {"optimizer": self._optimizer_name}
        if self._optimizer_name != "adamw":  # bitsandbytes' 8-bit moments are quantized blocks, not AdamW's
            return PortableState(weights, meta=meta)
        states = [self._optimizer.state.get(p, {}) for p in self._params]
        steps = {int(s["step"].item()) if "step" in s else 0 for s in states}
        if len(steps) != 1:
            raise RuntimeError(f"AdamW step counts differ between LoRA parameters ({sorted(steps)})")

        def moment(name: str) -> dict[str, np.ndarray]:
            return {k: (s[name].detach().float().cpu().numpy() if name in s else np.zeros_like(weights[k]))
                    for k, s in zip(keys, states)}

        return PortableState(weights, moment("exp_avg"), moment("exp_avg_sq"), steps.pop(), meta)

    def init_lora(self, weights: dict[str, np.ndarray]) -> None:
        """lora.init_from: the adapter's weights instead of the seeded ones (Backend.init_lora); the optimizer has
        taken no step, so it starts as new."""
        with torch.no_grad():
            for key, param in zip(self._portable_keys(), self._params):
                param.copy_(torch.from_numpy(weights[key]).to(param.device, param.dtype))

    def load_portable(self, state: PortableState) -> None:
        if self._optimizer_name != "adamw":
            raise ConfigError(f"config key 'train.optimizer': {self._optimizer_name} keeps 8-bit moments that an "
                              "AdamW state from another backend cannot become; continue with train.optimizer=adamw")
        with torch.no_grad():
            for key, param in zip(self._portable_keys(), self._params):
                param.copy_(torch.from_numpy(state.weights[key]).to(param.dtype))
                self._optimizer.state[param] = {
                    "step": self._adam_step(float(state.adam_step), param),
                    "exp_avg": torch.from_numpy(state.exp_avg[key]).to(param.device, param.dtype),
                    "exp_avg_sq": torch.from_numpy(state.exp_avg_sq[key]).to(param.device, param.dtype),
                }
        # The other framework's RNG state cannot be carried: seed from the run's seed and step instead, so the
        # continued run is still reproducible (its dropout draws differ from an uninterrupted one's).
        _seed_everything(self._cfg.train.seed * 1_000_003 + state.adam_step)

    # ------------------------------------------------------------------ reporting

    def memory(self) -> dict[str, float]:
        import psutil

        mb = 1024.0 * 1024.0
        rss = psutil.Process().memory_info().rss / mb
        if self._device_is_cuda():
            # The peak since the last call (the loop asks once a step), not what is left allocated between steps:
            # the activations of the step are what runs out. The device's total is the limit the near-limit
            # warning and the swap watch compare it with; free counts other processes on the GPU too.
            device = getattr(self, "_device", None)
            peak = torch.cuda.max_memory_allocated(device) / mb
            torch.cuda.reset_peak_memory_stats(device)
            free, total = torch.cuda.mem_get_info(device)
            return {
                "memory_mb": peak,
                "peak_mb": peak,
                "allocated_mb": torch.cuda.memory_allocated(device) / mb,
                "reserved_mb": torch.cuda.memory_reserved(device) / mb,
                "free_mb": free / mb,
                "limit_mb": total / mb,
                "rss_mb": rss,
            }
        return {"memory_mb": rss, "rss_mb": rss}

    def _device_is_cuda(self) -> bool:
        device = getattr(self, "_device", None)
        return device.type == "cuda" if device is not None else torch.cuda.is_available()

    def versions(self) -> dict[str, str]:
        import peft
        import transformers

        out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
        bnb = _bnb_version()
        if bnb is not None:
            out["bitsandbytes"] = bnb
        return out


@contextlib.contextmanager
def _weights_read_not_mapped():
    """transformers 5 opens every weight shard memory-mapped and keeps them open until the whole model is loaded:
    each page it touches stays in this process's RSS, so a load peaks at the checkpoint's size plus the model it
    builds (measured: 1.8 GB over the tiny model for a 1.9 GB bf16 checkpoint loaded as 4-bit). safetensors' pread
    backend (what transformers itself uses on MPS and Windows) reads each tensor as it is asked for: the peak is the
    model plus one tensor. Only the mmap choice is replaced; a transformers without that call is left as it is."""
    import transformers.modeling_utils as loading

    opened = getattr(loading, "safe_open", None)
    if opened is None:
        yield
        return

    def read_not_mapped(*args, **kwargs):
        if kwargs.get("backend") == "mmap":
            kwargs["backend"] = "pread"
        return opened(*args, **kwargs)

    loading.safe_open = read_not_mapped
    try:
        yield
    finally:
        loading.safe_open = opened


def _meta_skeleton(model_dir: Path):
    """The causal LM built from model_dir's config on the meta device (no weights, no memory), or None for an
    architecture that cannot be built that way (its load reports what is wrong, in its own words)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001
        return None
    return skeleton


def _load_tokenizer(model_dir: Path):
    """The core's tokenizer (the one the data was encoded with), only to check the vocabulary against the model.
    Not transformers' AutoTokenizer: importing and loading it costs ~3 s of every start, for a number the core's
    tokenizer gives the same (its vocabulary with the added tokens: len(AutoTokenizer))."""
    from overnight.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(model_dir)
    except Exception as exc:
        raise ConfigError(f"config key 'model.path': cannot load a tokenizer from {model_dir}: {exc}") from None


def _check_vocabulary(model, tokenizer, model_dir: Path) -> None:
    embed_rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > embed_rows:
        raise ConfigError(
            f"config key 'model.path': the tokenizer in {model_dir} has {tokenizer.vocab_size} tokens but the "
            f"model's embedding has only {embed_rows} rows"
        )


def _start_dora_magnitudes_in_float32(model) -> None:
    """DoRA's m as lora_init.DORA starts it (and the mlx backend does): the float32 row norms of the dequantized base
    weight. PEFT computes that norm in the base weight's dtype and keeps it rounded so (to bfloat16 on a bf16 base,
    the GPU's compute dtype), while its forward's ||W + s*B*A|| comes out in float32 (the input cast to the adapter's
    float32, or CUDA autocast, which runs linalg norms in float32): every row of a new adapter would be scaled by
    m / n, up to 2^-9 off 1, so a new DoRA adapter would not be the base. Unchanged on a float32 base."""
    from peft.utils.integrations import dequantize_module_weight

    for module in model.modules():
        vectors = getattr(module, "lora_magnitude_vector", None)
        if not vectors:
            continue
        with torch.no_grad():
            norm = torch.linalg.norm(dequantize_module_weight(module.get_base_layer()).float(), dim=1)
            for vector in vectors.values():
                vector.weight.copy_(norm.to(vector.weight.device))


def _keep_4bit_weights_unpacked(model) -> None:
    """bitsandbytes' Linear4bit repacks its weight for a faster CPU kernel (AVX512-BF16) the first time it runs
    in eval mode without grad, and every later matmul then rounds differently. Whether an eval ran earlier in
    the process would change training numerics, so a resumed run would drift from an uninterrupted one: keep
    the one layout training uses, always."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def _fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: floating point, on a device its fused kernels cover
    (torch's own list: CUDA, and the CPU since torch 2.4, for every float dtype)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a private helper: a torch without it gets the kernel where every torch had it
        devices = {"cuda"}
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def _causal_mask_changes_nothing(attention: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> bool:
    """Whether a causal forward without this padding mask gives the values the mask would at the positions read
    ((rows, cols)): every row right-padded (its 1s, then its 0s) and every position read a real token, which sees
    only the real tokens before it either way. Then the model gets no mask and attention runs causal without one
    (SDPA's fastest kernels take no mask; transformers also stops checking the mask on the host each forward). A
    left-padded batch, or any other mask, keeps it."""
    attention = np.asarray(attention)
    if attention.ndim != 2 or not np.isin(attention, (0, 1)).all():
        return False
    if attention.shape[1] > 1 and (attention[:, 1:] > attention[:, :-1]).any():
        return False
    return bool(attention[rows, cols].all())


def _row_sums(values: torch.Tensor, sel: tuple[torch.Tensor, torch.Tensor], shape) -> torch.Tensor:
    """Per row, the sum of ``values`` (N,), each given at its own (row, column) of ``sel`` in a (B, T) grid: written
    into zeros at those distinct places, then summed along each row. No two values share a place, and a row's
    reduction adds in an order fixed by the shape and the device, so the same inputs give the same sums on every
    run without the global deterministic mode (index_add_ on CUDA adds with atomics, in whatever order the threads
    arrive). Its backward is a gather: deterministic too."""
    return values.new_zeros(tuple(shape)).index_put(tuple(sel), values).sum(dim=-1)


# top-p's probabilities in units of 2^-52: each is rounded by at most 2^-53, so a running sum is off by under
# vocabulary x 2^-53 (1e-11 at 128k tokens, below a float32 sum's own rounding), and the integer sums are exact;
# a row's total is about 2^52, far inside int64.
_TOP_P_UNIT = 2 ** 52


def _probability_before(probs: torch.Tensor) -> torch.Tensor:
    """Per row of sorted probabilities, the probability of the tokens before each one, as an int64 count of
    _TOP_P_UNIT. A float cumsum on CUDA adds in an order that can change from run to run (CUB's scan), and strict
    deterministic mode (train.deterministic) refuses it; the integer one is exact, so the same on every run and
    every device."""
    units = torch.round(probs.double() * _TOP_P_UNIT).long()
    return units.cumsum(dim=-1) - units


def _until_stop(row: np.ndarray, stop_ids: tuple[int, ...]) -> np.ndarray:
    """A decoded row up to its first stop token (not included), its -1 tail dropped."""
    row = row[row >= 0].astype(np.int64)
    hits = np.flatnonzero(np.isin(row, stop_ids))
    return row[: hits[0]] if hits.size else row


def _installed_older_than(distribution: str, minimum: str) -> str | None:
    """The installed version of ``distribution`` where it is older than ``minimum``; None where it is not (or it is
    not installed, or its version does not parse)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version

    try:
        installed = version(distribution)
        return installed if Version(installed) < Version(minimum) else None
    except (PackageNotFoundError, InvalidVersion):
        return None


def _load_out_of_memory(model_dir: Path, bits: int, device: torch.device, exc: BaseException) -> str:
    on_gpu = device.type == "cuda" and "can't allocate memory" not in str(exc) and not isinstance(exc, MemoryError)
    smaller = "model.quantization.bits=4, " if bits != 4 else ""
    where = (f"GPU memory ({device}): use {smaller}a smaller model or a GPU with more memory, and check that no other "
             "process holds this one (nvidia-smi)") if on_gpu else \
        f"host memory: use {smaller}a smaller model, or a machine (or container) with more RAM"
    return f"out of memory loading the base model {model_dir} ({_first_line(exc)}); it does not fit in {where}"


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:300] if text.strip() else exc.__class__.__name__


def _oom_message(exc: BaseException) -> str:
    return _first_line(exc) if str(exc).strip() else "CUDA out of memory"


# cuBLAS's reproducible workspace settings, the only values torch's deterministic mode accepts
# (aten/src/ATen/Context.cpp, checkCuBLASConfigDeterministic).
DETERMINISTIC_CUBLAS_WORKSPACES = (":4096:8", ":16:8")


def fix_cublas_workspace(environ=os.environ) -> None:
    """train.deterministic on CUDA: cuBLAS's workspace fixed (CUBLAS_WORKSPACE_CONFIG), read once by torch at its
    first cuBLAS handle (CublasHandlePool.cpp), so set before any matmul. Strict deterministic mode refuses every
    cuBLAS matmul while it is unset or set otherwise: a value of the user's that is not one of the two is refused here,
    before the model loads, rather than by the first step's matmul."""
    value = environ.get("CUBLAS_WORKSPACE_CONFIG")
    if value is None:
        environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS_WORKSPACES[0]
    elif value not in DETERMINISTIC_CUBLAS_WORKSPACES:
        raise ConfigError(
            f"config key 'train.deterministic': the environment sets CUBLAS_WORKSPACE_CONFIG={value!r}, and a "
            f"deterministic run needs {' or '.join(DETERMINISTIC_CUBLAS_WORKSPACES)} (cuBLAS's reproducible "
            "workspaces; torch refuses its matmuls otherwise) -> unset it (overnight then sets :4096:8), set one of "
            "those, or set train.deterministic=false")


# What follows ".lora_" in a PEFT parameter's name (lora_A, lora_B, lora_magnitude_vector) -> its portable suffix.
_PORTABLE_SUFFIX = {"A": ".A", "B": ".B", "m": lora_init.MAGNITUDE_SUFFIX}


def _lora_capable_paths(model) -> list[str]:
    """The paths of the modules PEFT's LoRA can wrap (bitsandbytes' 4- and 8-bit layers are nn.Linear)."""
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
             torch.nn.MultiheadAttention)
    return [name for name, module in model.named_modules()
            if name and (isinstance(module, kinds) or type(module).__name__ == "Conv1D")]


def _init_lora_a(model, seed: int) -> None:
    """Replace PEFT's lora_A draws with the framework-free ones (src/backend/lora_init.py), so torch and mlx start
    from the same adapter for the same seed; lora_B stays zero."""
    with torch.no_grad():
        for name, module in model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or "default" not in lora_a:
                continue
            weight = lora_a["default"].weight
            values = lora_init.lora_a(seed, lora_init.neutral_module_name(name), *weight.shape)
            weight.copy_(torch.from_numpy(values).to(weight.dtype))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
