"""The MLX backend's base model: read lazily, quantized as it is read, evaluated one block at a time, so the peak is
about the quantized model plus one full-precision block (a 70B in bf16, 140 GB, loads as 4-bit on a 128 GB Mac),
as mlx_lm.convert does it; and the quantized weights kept in the overnight cache, so the next start on the same
model (a resume, a supervised relaunch, the next run) reads them instead of the full-precision files.

The cache, CACHE_DIR/mlx-quantized/<model>-<bits>bit-g<group>-<key>/ (model.safetensors, config.json,
manifest.json), holds the CACHE_KEEP most recently used entries; models whose weight files add up to less than
CACHE_MIN_BYTES are never cached (they quantize in about a second). An entry's key is the model's content as it can
be told apart cheaply, the quantization and the mlx and mlx-lm versions (see content_key). An entry appears whole or
not at all (written in a temporary folder, fsynced, renamed), and is used only when its manifest's key is this
model's and every file's size and sha256 match; anything else is removed and quantized again. The cache is not
critical: failing to write it is a note in the setup details, never a failed run.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from overnight.config import ConfigError
from overnight.errors import TrainingError
from overnight.fsutil import atomic_write_text, fsync_dir, fsync_file, pid_alive, sha256_file
from overnight.models.provided import cache_dir

CACHE_FOLDER = "mlx-quantized"
# Below this the quantization takes about a second and a cached copy would only cost disk (and write the test
# suite's tiny models into the user's cache).
CACHE_MIN_BYTES = 1 << 30
CACHE_KEEP = 2  # entries kept, most recently used first: the model of this run and the one before
ENTRY_FORMAT = 1
# What the cache may leave free on its disk at the least: checkpoints and the fused model go on the same disk often.
KEEP_FREE_BYTES = 2 << 30
KEEP_FREE_SHARE = 0.05
_GIB = float(1 << 30)


def load_base(model_dir: Path, quantization: Any, details: dict[str, Any],
              is_oom: Callable[[BaseException], bool], dtype: Any = None) -> nn.Module:
    """The base model, quantized when model.quantization.bits asks and the folder is not quantized already; says
    which in details["quantization"] and where the weights came from in details["base_weights"]. ``dtype`` (an mx
    dtype; None keeps the checkpoint's) is what the floating weights that stay unquantized are cast to: before they
    are evaluated where nothing is quantized (so a big bf16 model is never held in two dtypes), after quantizing
    otherwise (the cache holds the checkpoint's dtype; what is cast then is small: norms, scales). A model that does
    not fit is TrainingError, said with what to change: a supervised run would otherwise be relaunched into the
    same failure."""
    try:
        return _load_base(model_dir, quantization, details, is_oom, dtype)
    except Exception as exc:  # noqa: BLE001 - anything but an out of memory passes unchanged
        if not is_oom(exc):
            raise
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
        smaller = "model.quantization.bits=4, " if quantization.bits != 4 else ""
        raise TrainingError(f"out of memory loading the base model {model_dir} ({text}); it does not fit in this "
                            f"machine's memory: use {smaller}a smaller model, or close what else holds memory") \
            from None


def _load_base(model_dir: Path, quantization: Any, details: dict[str, Any],
               is_oom: Callable[[BaseException], bool], dtype: Any = None) -> nn.Module:
    from mlx_lm.utils import quantize_model

    bits, group_size = quantization.bits, quantization.group_size
    with _source_errors(model_dir, is_oom):
        # lazy: reads the safetensors headers only; the weights are read when evaluated below
        model, model_config = _lazy_load(model_dir)
    if model_config.get("quantization"):
        q = model_config["quantization"]
        details["quantization"] = (
            f"pre-quantized {q.get('bits')}-bit {q.get('mode', 'affine')} (group {q.get('group_size')}), used as is"
        )
        with _source_errors(model_dir, is_oom):
            evaluate_by_block(_cast(model, dtype))
        return model
    if not bits:
        details["quantization"] = "none"
        with _source_errors(model_dir, is_oom):
            evaluate_by_block(_cast(model, dtype))
        return model

    details["quantization"] = f"{bits}-bit affine (group {group_size}), quantized in memory"
    entry, problem = CacheEntry.for_model(model_dir, bits, group_size), None
    if entry is None:
        details["base_weights"] = (f"quantized as read (models under {CACHE_MIN_BYTES / _GIB:.0f} GiB are not cached)")
    else:
        cached, problem = entry.read(is_oom)
        if cached is not None:
            details["base_weights"] = f"{bits}-bit weights read from the quantized-weight cache: {entry.path}"
            evaluate_by_block(_cast(cached, dtype))
            return cached
    # quantize_model prints its own summary; the run's output stays ours.
    with contextlib.redirect_stdout(io.StringIO()):
        model, quantized_config = quantize_model(model, model_config, group_size=group_size, bits=bits, mode="affine")
    with _source_errors(model_dir, is_oom):
        evaluate_by_block(model)
    if entry is not None:
        said = entry.write(model, quantized_config)
        details["base_weights"] = f"quantized as read; {said}" + (f" ({problem})" if problem else "")
    evaluate_by_block(_cast(model, dtype))
    return model


def _cast(model: nn.Module, dtype: Any) -> nn.Module:
    if dtype is not None:  # floating parameters only (mlx's default predicate): quantized codes stay uint32
        model.set_dtype(dtype)
    return model


def _lazy_load(model_dir: Path) -> tuple[nn.Module, dict]:
    return load_hf_model(model_dir, lazy=True)


def load_hf_model(model_dir: Path, **kwargs) -> tuple[nn.Module, dict]:
    """mlx_lm.utils.load_model(model_dir, **kwargs), reading the RoPE settings of a config.json saved by transformers 5
    (rope_overrides); the config it returns carries them at the top level, where mlx-lm (and a folder saved from
    this config) reads them."""
    from mlx_lm.utils import load_model

    return load_model(Path(model_dir), model_config={**rope_overrides(model_dir), **kwargs.pop("model_config", {})},
                      **kwargs)


def rope_overrides(model_dir: Path) -> dict:
    """What mlx-lm 0.32 misses in a config.json saved by transformers 5, which moves rope_theta (and a scaling) into
    ``rope_parameters``: mlx-lm's ModelArgs read only the top-level keys and fall back to rope_theta 10000, so
    SmolLM2 (100000) ran with other positions than torch gives it. Empty when the top-level keys are there."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in config:
        return {}
    out = {"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {}
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def evaluate_by_block(model: nn.Module) -> None:
    """Evaluate a lazily loaded (and lazily quantized) model one block at a time: each block's full-precision
    weights are read, quantized and released before the next block is read; then the rest (embeddings, final
    norm, head) one tensor at a time, since an embedding and an untied head are each the size of several blocks."""
    for block in getattr(model, "layers", None) or []:
        mx.eval(block.parameters())
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)


@contextlib.contextmanager
def _source_errors(model_dir: Path, is_oom: Callable[[BaseException], bool]):
    """A truncated or corrupt weight file fails deep inside mlx (and, read lazily, only when evaluated): said as the
    user's model folder, not as a traceback."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc):
            raise
        raise ConfigError(
            f"config key 'model.path': cannot load the model in {model_dir}: {exc.__class__.__name__}: "
            f"{str(exc)[:300]}. Check that the weight files are complete (re-download or re-copy the model)"
        ) from None


# -- the quantized-weight cache ----------------------------------------------------------------------------------

def _safetensors_header(path: Path) -> bytes | None:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size <= 100 << 20:
            return None
        header = handle.read(size)
    return header if len(header) == size else None


def content_key(model_dir: Path) -> tuple[dict, int] | None:
    """What tells this model's weights apart, without reading 140 GB: for every weight file mlx-lm loads
    (model*.safetensors), its name, size, the sha256 of its header (every tensor's name, dtype, shape and offsets)
    and either the hub's sha256 of its content (a file in the Hugging Face cache is a link to blobs/<sha256>) or
    its modification time; and the sha256 of config.json. Headers and sizes alone are not enough: a fine-tune of a
    base saved the same way has the same header and size. Returns the key and the weight files' total size, or
    None when the folder has no readable weight files (loading it then says what is wrong)."""
    files = sorted(Path(model_dir).glob("model*.safetensors"))
    if not files or not (Path(model_dir) / "config.json").is_file():
        return None
    described, total = [], 0
    try:
        for path in files:
            real = path.resolve()
            stat = real.stat()
            header = _safetensors_header(real)
            if header is None:
                return None
            hub_sha = real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name)
            described.append({"name": path.name, "size": stat.st_size,
                              "header_sha256": hashlib.sha256(header).hexdigest(),
                              "content": f"sha256:{real.name}" if hub_sha else f"mtime_ns:{stat.st_mtime_ns}"})
            total += stat.st_size
        config_sha = sha256_file(Path(model_dir) / "config.json")
    except OSError:
        return None
    return {"weights": described, "config_sha256": config_sha}, total


def _versions() -> dict[str, str]:
    import mlx_lm

    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}


def _label(model_dir: Path) -> str:
    """A readable name for the entry: the folder's, or the repository's for a hub snapshot (.../models--org--name/
    snapshots/<commit>)."""
    model_dir = Path(model_dir)
    name = model_dir.parent.parent.name if model_dir.parent.name == "snapshots" else model_dir.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:60] or "model"


class CacheEntry:
    """One model's quantized weights in the cache (see the module docstring)."""

    def __init__(self, root: Path, name: str, key: dict, source: Path):
        self.root, self.name, self.key, self.source = root, name, key, source
        self.path = root / name

    @classmethod
    def for_model(cls, model_dir: Path, bits: int, group_size: int) -> "CacheEntry | None":
        found = content_key(model_dir)
        if found is None or found[1] < CACHE_MIN_BYTES:
            return None
        key = {"format": ENTRY_FORMAT, "model": found[0], "bits": int(bits), "group_size": int(group_size),
               "mode": "affine", "versions": _versions()}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        root = cache_dir() / CACHE_FOLDER
        # The folder's name is only a label for whoever lists the cache: a copy of the model under another name
        # (same content, same key) finds the entry its first name made.
        same = sorted(p.name for p in root.glob(f"*-{digest}") if not p.name.startswith(".")) if root.is_dir() else []
        name = same[0] if same else f"{_label(model_dir)}-{bits}bit-g{group_size}-{digest}"
        return cls(root, name, key, Path(model_dir))

    # -- reading

    def read(self, is_oom: Callable[[BaseException], bool]) -> tuple[nn.Module | None, str | None]:
        """The cached model (lazily read, then evaluated block by block while its sha256 is checked on another
        thread), or None and why not when the entry is missing or unusable (an unusable one is removed)."""
        if not self.path.is_dir():
            return None, None
        self._touch()  # first: another run making room in the cache removes the least recently used entries
        try:
            problem = self._check_files()
        except OSError as exc:
            problem = f"{exc.__class__.__name__}: {exc}"
        model = None
        if problem is None:
            weights = self.path / "model.safetensors"
            digest: dict[str, str] = {}
            hasher = threading.Thread(target=lambda: digest.update(sha256=sha256_file(weights)),
                                      name="overnight-cache-check", daemon=True)
            hasher.start()
            try:
                model, _ = _lazy_load(self.path)
                evaluate_by_block(model)
            except Exception as exc:  # noqa: BLE001 - anything wrong with a cached copy means: quantize again
                if is_oom(exc):
                    raise
                problem, model = f"{exc.__class__.__name__}: {str(exc)[:200]}", None
            hasher.join()
            if problem is None and digest.get("sha256") != self._manifest["files"]["model.safetensors"]["sha256"]:
                problem, model = "model.safetensors does not match its sha256", None
        if problem is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return None, f"the cached copy {self.path} was unusable ({problem}), so it was replaced"
        return model, None

    def _check_files(self) -> str | None:
        """Why the entry cannot be used, from its manifest, its files' sizes and config.json's sha256 (the weights'
        sha256 is checked while they load); None when it may be."""
        try:
            manifest = json.loads((self.path / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            return f"no readable manifest.json: {exc.__class__.__name__}"
        if not isinstance(manifest, dict) or manifest.get("key") != self.key:
            return "its manifest is for another model or quantization"
        files = manifest.get("files")
        if not isinstance(files, dict) or set(files) != {"model.safetensors", "config.json"}:
            return "its manifest lists other files"
        for name, recorded in files.items():
            path = self.path / name
            if not path.is_file() or path.stat().st_size != recorded.get("size"):
                return f"{name} is missing or has the wrong size"
        if sha256_file(self.path / "config.json") != files["config.json"].get("sha256"):
            return "config.json does not match its sha256"
        self._manifest = manifest
        return None

    def _touch(self) -> None:
        # The order of use only decides what is removed first. The time is given, not left to the kernel: file
        # times come from its coarse clock, one tick of which can hold a write and the next entry's use.
        now = time.time_ns()
        with contextlib.suppress(OSError):
            os.utime(self.path / "manifest.json", ns=(now, now))

    # -- writing

    def write(self, model: nn.Module, config: dict) -> str:
        """Store the evaluated quantized model; returns what happened, for the setup details. Never raises for a
        full disk, a read-only cache or a failed write: the run goes on without it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._sweep()
            weights = dict(tree_flatten(model.parameters()))
            needed = sum(v.nbytes for v in weights.values()) + (1 << 20)
            usage = shutil.disk_usage(self.root)
            keep_free = max(KEEP_FREE_BYTES, int(usage.total * KEEP_FREE_SHARE))
            if usage.free - needed < keep_free:
                return (f"not cached: {usage.free / _GIB:.1f} GiB free in {self.root}, the copy takes "
                        f"{needed / _GIB:.1f} GiB and {keep_free / _GIB:.1f} GiB stay free")
            self._write_entry(weights, config)
        except Exception as exc:  # noqa: BLE001 - the cache is not critical (SPEC §8)
            return f"not cached: {getattr(exc, 'strerror', None) or exc} ({self.root})"
        return f"cached in {self.path} for the next start ({needed / _GIB:.2f} GiB)"

    def _write_entry(self, weights: dict[str, mx.array], config: dict) -> None:
        tmp = self.root / f".{self.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            files = {}
            for name in ("model.safetensors", "config.json"):
                fsync_file(tmp / name)
                # read back: the hash is of what reached the disk, and a later start checks against it
                files[name] = {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
            manifest = {"key": self.key, "files": files, "source": str(self.source), "created": time.time()}
            atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
            fsync_dir(tmp)
            try:
                os.rename(tmp, self.path)
            except OSError:
                if not self.path.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process (a data-parallel rank) wrote it first
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _sweep(self) -> None:
        """Make room before writing: remove what a killed writer left (its pid is gone) and all but the
        CACHE_KEEP - 1 most recently used other entries."""
        entries = []
        for path in self.root.iterdir():
            match = re.fullmatch(r"\..+\.tmp-(\d+)-[0-9a-f]+", path.name)
            if match:
                if not pid_alive(int(match.group(1))):
                    shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir() and path.name != self.name:
                try:  # another process may be removing it right now
                    used = (path / "manifest.json").stat().st_mtime
                except OSError:
                    used = 0.0
                entries.append((used, path))
        for _, path in sorted(entries, reverse=True)[max(0, CACHE_KEEP - 1):]:
            shutil.rmtree(path, ignore_errors=True)
