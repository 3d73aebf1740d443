"""`overnight fuse` for mlx runs: the adapter merged into the base as mlx-lm's own fuse does it (each LoRA layer's
``fuse()``: dequantize, add scale·(B·A)ᵀ, quantize again with the same bits and group size), saved as an MLX folder
that ``mlx_lm.load`` reads. Run by src/commands/fuse.py in a child process (the core imports no framework):

    python -m overnight.backends.mlx_export JOB.json

The adapter was trained on the base as the run saw it: a Hugging Face base that the run quantized in memory is
quantized here the same way first (mlx-lm's quantize_model, the run's bits and group size), so the fused model
keeps the quantization the adapter learned on; a pre-quantized MLX base is used as it is. ``--dequantize`` writes
full-precision weights instead (the base's float dtype), which is also the form mlx-lm's GGUF writer takes.
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from overnight.commands.fuse import ExportRefused, copy_base_files, run_export_job


def export(job: dict) -> dict:
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.gguf import convert_to_gguf
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, load_model, quantize_model, save_config, save_model

    from overnight.backends.mlx_backend import _resolve_model_dir

    base_dir = _resolve_model_dir(job["base"])
    try:
        model, config = load_model(Path(base_dir))
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt weight file fails deep inside mlx
        if isinstance(exc, MemoryError):
            raise
        raise ExportRefused(f"cannot load the base model {base_dir}: {exc.__class__.__name__}: {str(exc)[:300]}. "
                            "Check that its weight files are complete (re-copy the model), or pass --base "
                            "DIR") from None
    if config.get("quantization"):
        q = config["quantization"]
        weights = f"pre-quantized {q.get('bits')}-bit (group {q.get('group_size')}), kept"
    elif job["bits"]:
        with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints a summary line of its own
            model, config = quantize_model(model, config, group_size=job["group_size"], bits=job["bits"],
                                           mode="affine")
        weights = f"{job['bits']}-bit affine (group {job['group_size']}), as the run trained on it"
    else:
        weights = None
    model = load_adapters(model, job["adapter"])
    model.eval()
    fused = [(name, module.fuse(dequantize=job["dequantize"])) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if not fused:
        raise ExportRefused(f"the adapter in {job['adapter']} attached no LoRA layer to {base_dir}")
    model.update_modules(tree_unflatten(fused))
    if job["dequantize"]:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    float_dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(model.parameters())
                           if "float" in str(v.dtype)})
    dtype = float_dtypes[0] if len(float_dtypes) == 1 else "/".join(float_dtypes)
    if weights is None or job["dequantize"]:
        weights = f"{dtype}, full precision"

    output = Path(job["output"])
    save_model(output, model, donate_model=False)
    save_config(config, config_path=output / "config.json")
    copied = copy_base_files(Path(base_dir), output)
    result = {"base_dir": str(base_dir), "format": "MLX folder for mlx_lm.load", "weights": weights, "dtype": dtype,
              "copied": copied, "quantized": bool(config.get("quantization"))}
    if job["gguf"]:
        # After the tokenizer files are in place: the GGUF writer reads the vocabulary from the output folder.
        with contextlib.redirect_stdout(io.StringIO()):
            convert_to_gguf(output, dict(tree_flatten(model.parameters())), config, str(output / job["gguf_name"]))
        result["gguf"] = str(output / job["gguf_name"])
    return result


if __name__ == "__main__":
    sys.exit(run_export_job(export, sys.argv[1:]))
