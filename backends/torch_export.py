"""`overnight fuse` for torch runs: the PEFT adapter merged into the full-precision base, saved as a Hugging Face
folder that transformers loads on its own. Run by src/commands/fuse.py in a child process (the core imports no framework):

    python -m overnight.backends.torch_export JOB.json

The base is always loaded unquantized, also for a QLoRA run: merging into 4-bit weights would round the merged
weights to 4 bits (and bitsandbytes' merge is lossy), so the fused model is base + B·A·scale in the dtype the
base checkpoint was saved in. The merge itself runs in that dtype too: loading a bf16 70B base in float32 would
double the memory for one rounding step (PEFT computes the LoRA delta in float32 on CPU either way).
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

from overnight.backends import noise
from overnight.commands.fuse import ExportRefused, copy_base_files, run_export_job

_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def checkpoint_dtype(base_dir: Path) -> str:
    """The dtype the base was saved in: config.json's dtype (torch_dtype before transformers 5), else the dtype of
    the floating tensors in its first weight file."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or {}
    named = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    if isinstance(named, str) and named in _SAFETENSORS_DTYPES.values():
        return named
    for weights in sorted(base_dir.glob("*.safetensors")):
        with open(weights, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        dtypes = [meta["dtype"] for name, meta in header.items() if name != "__metadata__"]
        for dtype in dtypes:
            if dtype in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[dtype]
    return "float32"


def export(job: dict) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from overnight.backends.torch_backend import TorchBackend

    noise.install()
    noise.hide_loading_bars()
    base_dir = TorchBackend._resolve_model_dir(job["base"])
    base_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if base_config.get("quantization_config"):
        method = base_config["quantization_config"].get("quant_method", "quantized")
        raise ExportRefused(f"the base model {base_dir} is saved pre-quantized ({method}); fuse merges into a "
                            "full-precision base only: give the unquantized original with --base DIR")
    dtype_name = checkpoint_dtype(base_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=getattr(torch, dtype_name))
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt weight file raises SafetensorError, not OSError
        if isinstance(exc, MemoryError):
            raise
        raise ExportRefused(f"cannot load the base model {base_dir}: {exc.__class__.__name__}: {str(exc)[:300]}. "
                            "Check that its weight files are complete (re-copy the model), or pass --base "
                            "DIR") from None
    adapter = Path(job["adapter"])
    model = PeftModel.from_pretrained(model, str(adapter))
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: a non-finite merged weight is an error
    output = Path(job["output"])
    merged.save_pretrained(str(output), safe_serialization=True)
    copied = copy_base_files(base_dir, output)
    return {"base_dir": str(base_dir), "format": "Hugging Face folder for transformers",
            "weights": f"{dtype_name}, full precision", "dtype": dtype_name, "copied": copied}


if __name__ == "__main__":
    sys.exit(run_export_job(export, sys.argv[1:]))
