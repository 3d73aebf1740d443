"""Library output that is not the user's business, filtered narrowly (one logger, one message, one bar), and
the few library warnings that are, said once in overnight's words. Each entry names where it comes from in
the versions installed here (bitsandbytes 0.50, transformers 5, peft 0.21); an unknown message passes
through unchanged.

Nothing here silences a library wholesale: other records of the same loggers, other warnings of the same
categories, and the hub's download bars (a real download is worth watching) are left alone.
"""
from __future__ import annotations

import importlib
import logging
import re
import sys
import warnings

# logger name -> message prefixes dropped (logging records, printed by logging's last-resort handler)
DROPPED_LOG_RECORDS = {
    # bitsandbytes/backends/cpu/ops.py, at import on CPUs with AVX512-BF16: an optional faster CPU kernel
    # from the `kernels` package, which import_bitsandbytes_without_hub_kernels keeps it from fetching.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # kernels/_internals/hf_hub.py (kernels 0.19, pulled in by transformers 5), on that same attempt when the hub is
    # offline (overnight's tests; a cached kernel): the trust check of bitsandbytes' own kernel repo is skipped.
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/",),
    # bitsandbytes/autograd/_functions.py, on every 8-bit matmul whose input is not fp16 (so every step on
    # CPU and with bf16): int8 quantization works in fp16 by design; nothing to change.
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast from",),
}

# logger name -> (message prefix, overnight's words): said once, the original dropped
REPHRASED_LOG_RECORDS = {
    # bitsandbytes/nn/modules.py, Linear4bit.set_compute_type, on every first forward of every layer.
    "bitsandbytes.nn.modules": (
        ("Input type into Linear4bit is torch.float16",
         "warning: the 4-bit layers get float16 inputs but compute in float32, which is slow; this GPU has no "
         "native bfloat16. A GPU with bfloat16 (Ampere or newer) trains several times faster"),
    ),
}

# (category, message regex) -> overnight's words, said once; the original warning dropped
REPHRASED_WARNINGS = [
    # torch's autograd fallback (C++), when bitsandbytes' inference-only 4-bit kernel runs with gradients on.
    # overnight keeps 4-bit weights in the training layout (_keep_4bit_weights_unpacked), so it should never
    # fire; if it does, the gradients through those layers are suspect, which the user must hear about once.
    (UserWarning, re.compile(r"bitsandbytes::gemv_4bit: an autograd kernel was not registered"),
     "warning: bitsandbytes ran its inference-only 4-bit kernel (gemv_4bit) with gradients on; the gradients "
     "through the 4-bit layers may be wrong. Please report this with your bitsandbytes version and CPU/GPU"),
]

# Deprecation notices the libraries raise about their own internals (the user calls none of these APIs).
LIBRARY_MODULES = r"(transformers|peft|bitsandbytes|accelerate)(\..*)?$"

_said: set[str] = set()


def import_bitsandbytes_without_hub_kernels() -> None:
    """Import bitsandbytes (where installed) with the `kernels` package hidden for the import. On a CPU with
    AVX512-BF16, bitsandbytes 0.50 (backends/cpu/ops.py) asks the Hugging Face hub for a faster 4-bit CPU kernel at
    import: a network call at run time, and a matmul whose rounding would then depend on whether the machine could
    reach the hub. Hidden, bitsandbytes falls back to its own kernel, as it does offline; nothing else is changed
    (`kernels` is importable again right after). CUDA machines never take that path."""
    if "bitsandbytes" in sys.modules:
        return
    missing = object()
    hidden = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError, which bitsandbytes catches
    try:
        importlib.import_module("bitsandbytes")
    except Exception:  # noqa: BLE001 - not installed, or no usable native library: the 4-bit setup says so later
        pass
    finally:
        if hidden is missing:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = hidden


def say_once(text: str) -> None:
    """Print above the progress bar (never through it), once per process."""
    if text in _said:
        return
    _said.add(text)
    try:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)
    except Exception:  # noqa: BLE001 - a warning about speed never stops training (SPEC §8)
        try:
            print(text, flush=True)
        except Exception:  # noqa: BLE001
            pass


class _LogFilter(logging.Filter):
    def __init__(self, dropped: tuple[str, ...] = (), rephrased: tuple[tuple[str, str], ...] = ()):
        super().__init__()
        self.dropped, self.rephrased = dropped, rephrased

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        if message.startswith(self.dropped):
            return False
        for prefix, words in self.rephrased:
            if message.startswith(prefix):
                say_once(words)
                return False
        return True


_original_showwarning = None


def _showwarning(message, category, filename, lineno, file=None, line=None):
    for wanted, pattern, words in REPHRASED_WARNINGS:
        if issubclass(category, wanted) and pattern.search(str(message)):
            say_once(words)
            return
    _original_showwarning(message, category, filename, lineno, file, line)


def install() -> None:
    """At backend import, before bitsandbytes is imported (its import logs the kernels-community line)."""
    global _original_showwarning
    for name in set(DROPPED_LOG_RECORDS) | set(REPHRASED_LOG_RECORDS):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LogFilter) for f in logger.filters):
            logger.addFilter(_LogFilter(DROPPED_LOG_RECORDS.get(name, ()), REPHRASED_LOG_RECORDS.get(name, ())))
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARY_MODULES)
    if _original_showwarning is None:
        _original_showwarning = warnings.showwarning
        warnings.showwarning = _showwarning


def hide_loading_bars() -> None:
    """transformers' "Loading weights" bar (transformers/core_model_loading.py): with stderr in a file it is a
    line of carriage returns, and on a terminal it shows a local folder being read. Only that bar: the
    hub's download bars stay (transformers.utils.logging.disable_progress_bar would hide those too)."""
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # noqa: BLE001
        return
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None or getattr(hf_logging, "_overnight_hook", False):
        return
    previous = None

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    previous = set_hook(hook)
    hf_logging._overnight_hook = True
