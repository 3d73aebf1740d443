"""`overnight fuse` for mlx runs: the adapter merged into the base as mlx-lm's own fuse does it (each LoRA layer's
``fuse()``: dequantize, add scale·(B·A)ᵀ, quantize again with the same bits and group size), saved as an MLX folder
that ``mlx_lm.load`` reads. Run by src/commands/fuse.py in a child process (the core imports no framework):

    python -m overnight.backends.mlx_export JOB.json

The adapter was trained on the base as the run saw it: a Hugging Face base that the run quantized in memory is
quantized here the same way first (mlx-lm's quantize_model, the run's bits and group size), so the fused model
keeps the quantization the adapter learned on; a pre-quantized MLX base is used as it is. ``--dequantize`` writes
full-precision weights instead (the base's float dtype), which is also the form mlx-lm's GGUF writer takes.

A reward run (job["reward"]) gives a sequence-classification folder for transformers instead (reward_export): the
same merge, always dequantized (transformers cannot read mlx's quantized layout; dequantize(quantize(W)) + the delta
is exactly the model the run trained), without the LM head, with the score head as ``score.weight``, and the config
the torch exporter writes.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from overnight.commands.fuse import ExportRefused, copy_base_files, run_export_job


def export(job: dict) -> dict:
    from mlx.utils import tree_flatten
    from mlx_lm.gguf import convert_to_gguf
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, quantize_model, save_config, save_model

    from overnight.backends.mlx_backend import _resolve_model_dir
    from overnight.backends.mlx_load import load_hf_model

    base_dir = _resolve_model_dir(job["base"])
    try:
        model, config = load_hf_model(base_dir)
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
    if job.get("reward"):
        return reward_export(job, model, config, Path(base_dir))
    model = load_adapters(model, job["adapter"])
    model.eval()
    rounding = merge(model, job["adapter"], base_dir, job["dequantize"])
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
    if rounding is not None:
        bits = (config.get("quantization") or {}).get("bits", "?")
        result["note"] = (f"the merged weights are quantized again to {bits} bits (as mlx-lm's fuse does), which "
                          f"rounds the adapter's change to them with an error of {100 * rounding:.0f}% of that change"
                          + (": most of what the run learned is lost in the rounding" if rounding > 0.5 else "")
                          + "; --dequantize writes a full-precision folder that keeps it exactly")
    if job["gguf"]:
        # After the tokenizer files are in place: the GGUF writer reads the vocabulary from the output folder.
        with contextlib.redirect_stdout(io.StringIO()):
            convert_to_gguf(output, dict(tree_flatten(model.parameters())), config, str(output / job["gguf_name"]))
        result["gguf"] = str(output / job["gguf_name"])
    return result


def merge(model, adapter: str, base_dir, dequantize: bool) -> float | None:
    """Each LoRA layer replaced by its own fuse() (mlx-lm's merge), in place. Returns, when merged weights were
    quantized again, the rounding error that costs as a fraction of the adapter's change to them (Frobenius norms
    over all merged layers), else None."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    fused, error, change = [], 0.0, 0.0
    for name, module in model.named_modules():
        if not hasattr(module, "fuse"):
            continue
        layer = module.fuse(dequantize=dequantize)
        if not dequantize and "scales" in module.linear and "scales" in layer:
            # what the run computed with (dequantized base + the adapter) against what the folder will hold
            exact, base = module.fuse(dequantize=True).weight, _dequantized(module.linear)
            error += float(mx.sum(mx.square(_dequantized(layer).astype(mx.float32) - exact.astype(mx.float32))))
            change += float(mx.sum(mx.square(exact.astype(mx.float32) - base.astype(mx.float32))))
        fused.append((name, layer))
    if not fused:
        raise ExportRefused(f"the adapter in {adapter} attached no LoRA layer to {base_dir}")
    model.update_modules(tree_unflatten(fused))
    return (error / change) ** 0.5 if change > 0 else None


def _dequantized(layer):
    import mlx.core as mx

    return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                         bits=layer.bits, mode=getattr(layer, "mode", "affine"))


def reward_export(job: dict, model, config: dict, base_dir: Path) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, make_shards

    from overnight.backend.adapter_formats import MLX_HEAD_WEIGHTS, MLX_SCORE_KEY, REWARD_HEAD, mlx_score_head
    from overnight.backends.torch_export import SCORE_WEIGHT, hf_weight_names, is_lm_head, \
        sequence_classifier_architecture
    from overnight.commands.fuse import sequence_classifier_config
    from overnight.errors import UsageError

    base_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    architecture = sequence_classifier_architecture(base_dir, base_config)
    adapter = Path(job["adapter"])
    try:
        head = mlx_score_head(adapter)
    except UsageError as exc:
        raise ExportRefused(str(exc)) from None
    if head is None:
        raise ExportRefused(f"{adapter}: the run trained a reward model, but its adapter has no score head "
                            f"({REWARD_HEAD} and {MLX_HEAD_WEIGHTS})")
    # read by mlx, as the run wrote it (float32): the bytes mlx_score_head checked
    score = mx.load(str(adapter / MLX_HEAD_WEIGHTS))[MLX_SCORE_KEY]
    model = load_adapters(model, str(adapter))
    model.eval()
    merge(model, job["adapter"], base_dir, dequantize=True)
    model = dequantize_model(model)
    tensors = {name: value for name, value in tree_flatten(model.parameters()) if not is_lm_head(name)}
    # transformers reads the folder by the Hugging Face checkpoint's names: an architecture whose mlx-lm module
    # names differ would load with random weights in their place, so it is refused rather than written.
    foreign = sorted(set(tensors) - hf_weight_names(base_dir))
    if foreign:
        raise ExportRefused(f"mlx-lm names weights of this {config.get('model_type')} model differently from its "
                            f"Hugging Face checkpoint ({', '.join(foreign[:3])}); a reward model fused here would not "
                            "open in transformers. Convert the adapter (overnight convert-adapter --to peft) and fuse "
                            "it on a machine with the torch backend")
    tensors[SCORE_WEIGHT] = score  # last: into the last shard
    output = Path(job["output"])
    shards = make_shards(tensors)
    pattern = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        name = pattern.format(number, len(shards))
        # format "pt": the folder is for transformers, whose safetensors loader checks it
        mx.save_safetensors(str(output / name), shard, metadata={"format": "pt"})
        weight_map |= {key: name for key in shard}
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config = sequence_classifier_config(base_config, architecture, head.pad_token_id)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for v in tensors.values()})
    return {"base_dir": str(base_dir), "format": f"Hugging Face {architecture} folder (one label) for "
            "AutoModelForSequenceClassification", "weights": f"{'/'.join(dtypes)}, full precision",
            "dtype": dtypes[0], "copied": copy_base_files(base_dir, output), "quantized": False}


if __name__ == "__main__":
    sys.exit(run_export_job(export, sys.argv[1:]))
