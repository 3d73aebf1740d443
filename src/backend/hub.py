"""Where a model folder comes from: a local folder as given, or a Hugging Face hub id fetched once into the hub cache.
Both backends, `overnight fuse` and everything else that needs a model folder go through resolve_model_dir, so
they download the same files into the same place and fail with the same words.

What is downloaded is an allow-list decided from the repository's file list before anything is fetched: the
config, generation_config.json, the tokenizer and chat-template files, and transformers' weights
(``model*.safetensors`` with its index; ``pytorch_model*.bin`` only when the repository has no safetensors). Never
the duplicates many repositories carry beside them: ``consolidated.safetensors`` (+14.5 GB for Mistral-7B),
``original/``, GGUF, ONNX, other frameworks' weights.

On a RunPod pod (RUNPOD_POD_ID set) where the user has chosen no cache (HF_HOME, HF_HUB_CACHE), downloads go to the
persistent volume (``/workspace/.cache/huggingface/hub``): the container disk is lost when a spot pod is preempted,
and with it a 140 GB download. Only the cache folder moves (passed as ``cache_dir``, said once on stderr): HF_HOME
itself is left alone, so a token saved by ``hf auth login`` in its usual place is still found.

huggingface_hub is imported only when a hub id is resolved (it is not a core dependency, and a local folder
needs none of it).
"""
from __future__ import annotations

import fnmatch
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping

from overnight.backend import model_folder
from overnight.config import ConfigError

RUNPOD_VOLUME = Path("/workspace")
RUNPOD_HF_HOME = ".cache/huggingface"  # under the volume: the layout of the default ~/.cache/huggingface

# Top-level files a model folder needs besides its weights: config, generation defaults (its eos ids), tokenizer
# (tokenizer.json, tokenizer_config.json, tokenizer.model; vocab/merges of older BPE tokenizers, tiktoken files)
# and the chat template (chat_template.jinja / .json since transformers 4.43).
METADATA_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                     "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken", "tiktoken.model",
                     "chat_template*", "additional_chat_templates/*")
SAFETENSORS_PATTERNS = ("model*.safetensors", "model.safetensors.index.json")
BIN_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
LOGIN_HINT = "export HF_TOKEN=hf_... (a read token from https://huggingface.co/settings/tokens) or run " \
             "`hf auth login` (`huggingface-cli login` in older versions)"

_said_cache: set[str] = set()


def _matches(name: str, patterns: Iterable[str]) -> bool:
    # Top level only (but additional_chat_templates/): `original/` and other subfolders hold duplicates.
    if "/" in name and not name.startswith("additional_chat_templates/"):
        return False
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def download_patterns(repo_id: str, files: list[str] | None, backend: str = "torch") -> list[str]:
    """The allow_patterns for ``snapshot_download``, decided from the repository's file list (None when the hub
    could not be asked: the safetensors set, which the cache is checked against). ConfigError, before anything is
    fetched, when the repository has no weights ``backend`` can load."""
    if files is None:
        return [*METADATA_PATTERNS, *SAFETENSORS_PATTERNS]
    if not any(_matches(name, SAFETENSORS_PATTERNS) for name in files):
        if backend == "torch" and any(_matches(name, BIN_PATTERNS) for name in files):
            return [*METADATA_PATTERNS, *BIN_PATTERNS]
        weights = sorted(name for name in files
                         if name.rsplit(".", 1)[-1] in ("safetensors", "bin", "gguf", "pth", "pt", "h5", "onnx"))
        has = f"it has {', '.join(weights[:6])}{' ...' if len(weights) > 6 else ''}" if weights else \
            "it has no weight files at all"
        readable = ("transformers' model*.safetensors (or pytorch_model*.bin)" if backend == "torch"
                    else "mlx-lm's model*.safetensors (mlx-lm reads no .bin; convert it with `mlx_lm.convert`, or "
                         "train it with --backend torch)")
        raise ConfigError(f"config key 'model.path': the hub repository {repo_id} has no weights the {backend} "
                          f"backend can load: it needs {readable}; {has}. Give a repository with safetensors "
                          "weights (GGUF repositories are for llama.cpp), or a local model folder")
    if "config.json" not in files:
        raise ConfigError(f"config key 'model.path': the hub repository {repo_id} has no config.json, so it is not "
                          "a Hugging Face model repository: give the id of one, or a local model folder")
    return [*METADATA_PATTERNS, *SAFETENSORS_PATTERNS]


def runpod_cache_dir(env: Mapping[str, str] | None = None, volume: Path = RUNPOD_VOLUME) -> Path | None:
    """The hub cache on the persistent volume when this is a RunPod pod with the volume mounted and the user chose
    no cache location themselves; None otherwise (huggingface_hub's own default applies)."""
    env = os.environ if env is None else env
    if not env.get("RUNPOD_POD_ID") or not Path(volume).is_dir():
        return None
    if any(env.get(name) for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")):
        return None
    return Path(volume) / RUNPOD_HF_HOME / "hub"


def _say_cache_once(cache_dir: Path, say: Callable[[str], None]) -> None:
    if str(cache_dir) in _said_cache:
        return
    _said_cache.add(str(cache_dir))
    say(f"note: this is a RunPod pod and HF_HOME is not set: models download to {cache_dir} on the persistent "
        f"volume, not to the container disk a preempted pod loses (set HF_HOME to choose another place; "
        f"export HF_HOME={cache_dir.parent} makes other tools use the same cache)")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_model_dir(path: str, backend: str = "torch", say: Callable[[str], None] = _stderr,
                      env: Mapping[str, str] | None = None, volume: Path = RUNPOD_VOLUME) -> Path:
    """``model.path`` as a local folder: the folder itself (its config.json checked), or a hub id downloaded (or
    found in the cache) with the allow-list above. Every failure is a ConfigError (exit 2) that says what to do."""
    if not path:
        raise ConfigError("config key 'model.path' is empty: give a local model folder or a hub id")
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ConfigError(f"config key 'model.path': {local} is a file, not a model folder: give the folder "
                              "that holds config.json and the weight files")
        model_folder.read_config(local)  # a damaged config.json is said as such, not as a library's KeyError
        return local.resolve()
    if not _looks_like_repo_id(path):
        raise ConfigError(f"config key 'model.path': {path} is not a folder here (no such file or directory) and not "
                          "a hub id (organisation/model): check the path")
    cache_dir = runpod_cache_dir(env, volume)
    if cache_dir is not None:
        _say_cache_once(cache_dir, say)
    folder = Path(_download(path, backend, cache_dir))
    model_folder.read_config(folder)
    return folder


def _looks_like_repo_id(path: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def _download(repo_id: str, backend: str, cache_dir: Path | None) -> str:
    import huggingface_hub

    files = None
    try:
        files = huggingface_hub.list_repo_files(repo_id)
    except Exception as exc:  # noqa: BLE001 - offline, a timeout, a 5xx: the cache may still hold the model
        _raise_if_refused(repo_id, exc)
    if files is None:
        files = _cached_files(huggingface_hub, repo_id, cache_dir)
    patterns = download_patterns(repo_id, files, backend)
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - mapped to what the user can do; anything else is said as it is
        _raise_if_refused(repo_id, exc)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = ("HF_HUB_OFFLINE is set, so the hub was not asked" if offline else
               f"the hub could not be reached ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})")
        where = cache_dir or "the hub cache"
        raise ConfigError(
            f"config key 'model.path': {repo_id} is not a local folder and is not (completely) in {where}, and "
            f"{why}. Run once with network access, or download it where there is network (`hf download {repo_id}`) "
            "and give model.path as that folder") from None


def _cached_files(huggingface_hub, repo_id: str, cache_dir: Path | None) -> list[str] | None:
    """The file list a previous download cached (huggingface_hub >= 1.x keeps it), so an offline run asks the cache
    for exactly the files an online one fetched; None when there is none (the cache is then checked as it is)."""
    cached_tree = getattr(huggingface_hub, "get_cached_repo_tree", None)
    if cached_tree is None:
        return None
    try:
        return [entry.path for entry in cached_tree(repo_id, cache_dir=cache_dir)]
    except Exception:  # noqa: BLE001 - never downloaded, or an older cache layout
        return None


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _raise_if_refused(repo_id: str, exc: BaseException) -> None:
    """A gated, private, missing or unauthorised repository: a ConfigError naming the model and the way in."""
    from huggingface_hub import errors

    page = f"https://huggingface.co/{repo_id}"
    if isinstance(exc, errors.GatedRepoError):
        raise ConfigError(
            f"config key 'model.path': {repo_id} is a gated model on the Hugging Face hub and this machine has no "
            f"access to it ({_token_state()}): accept its license at {page} with your account, then {LOGIN_HINT}, "
            "and run the same command again") from None
    if isinstance(exc, errors.RepositoryNotFoundError):
        raise ConfigError(
            f"config key 'model.path': {repo_id} is not a folder here and was not found on the Hugging Face hub: "
            f"check the spelling (organisation/model, as on {page}); a private model needs a token with access to it "
            f"({_token_state()}: {LOGIN_HINT})") from None
    if isinstance(exc, errors.RevisionNotFoundError):
        raise ConfigError(f"config key 'model.path': {repo_id}: {str(exc).splitlines()[0]}") from None
    if _status(exc) in (401, 403):
        raise ConfigError(
            f"config key 'model.path': the Hugging Face hub refused access to {repo_id} (HTTP {_status(exc)}; "
            f"{_token_state()}): if it is gated or private, accept its license at {page} with an account that may "
            f"read it, then {LOGIN_HINT}") from None


def _token_state() -> str:
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # noqa: BLE001 - only a hint
        return "no token could be read"
    if not token:
        return "no token is set"
    source = "HF_TOKEN" if os.environ.get("HF_TOKEN") == token else "the saved login"
    return f"a token from {source} was sent"
