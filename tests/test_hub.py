"""Where model.path comes from (src/backend/hub.py): the allow-list a hub download fetches, the RunPod cache on the
persistent volume, and what a gated, missing or unreachable model says. No network: huggingface_hub's functions are
replaced in-process, or the real CLI runs with HF_HUB_OFFLINE=1 (and, for a gated model, a sitecustomize that makes
the hub answer as it answers a gated model without a token)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import DATA_DIR, ROOT, has
from overnight.backend import hub
from overnight.config import ConfigError

# A real Llama-3-style repository listing: the duplicates a download must leave behind sit beside what it needs.
LLAMA_FILES = [
    ".gitattributes", "LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
    "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors",
    "model-00004-of-00004.safetensors", "model.safetensors.index.json", "original/consolidated.00.pth",
    "original/params.json", "original/tokenizer.model", "special_tokens_map.json", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja",
]
MISTRAL_FILES = [
    "config.json", "consolidated.safetensors", "generation_config.json", "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors", "model.safetensors.index.json",
    "params.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer.model.v3",
    "tokenizer_config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
]
BIN_ONLY = ["config.json", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
            "flax_model.msgpack", "tf_model.h5", "training_args.bin"]


def fetched(files: list[str], backend: str = "torch") -> list[str]:
    """What snapshot_download fetches of ``files`` with the allow-list (huggingface_hub's own filter)."""
    from huggingface_hub.utils import filter_repo_objects

    patterns = hub.download_patterns("org/model", files, backend)
    return sorted(filter_repo_objects(files, allow_patterns=patterns))


def test_a_download_fetches_config_tokenizer_template_and_transformers_safetensors_only():
    assert fetched(LLAMA_FILES) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
        "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    got = fetched(MISTRAL_FILES)
    assert "consolidated.safetensors" not in got and not [name for name in got if name.endswith(".bin")]
    assert {"tokenizer.model", "model-00003-of-00003.safetensors", "model.safetensors.index.json"} <= set(got)
    assert fetched(MISTRAL_FILES, "mlx") == got


def test_pickled_weights_only_when_the_repository_has_no_safetensors():
    assert fetched(BIN_ONLY) == ["config.json", "merges.txt", "pytorch_model.bin", "tokenizer.json",
                                 "tokenizer_config.json", "vocab.json"]  # not training_args.bin, not tf/flax
    with pytest.raises(ConfigError, match=r"org/model has no weights the mlx backend can load: it needs mlx-lm's "
                                          r"model\*\.safetensors \(mlx-lm reads no \.bin"):
        hub.download_patterns("org/model", BIN_ONLY, "mlx")
    with pytest.raises(ConfigError, match=r"has no weights the torch backend can load.*it has model-q4_k_m\.gguf"):
        hub.download_patterns("org/model", ["README.md", "model-q4_k_m.gguf"], "torch")
    with pytest.raises(ConfigError, match="has no config.json, so it is not a Hugging Face model repository"):
        hub.download_patterns("org/model", ["model.safetensors", "tokenizer.json"], "torch")


def http_error(cls, status: int, message: str):
    # What huggingface_hub raises reads the status from a response object; a stand-in with the fields it reads.
    return cls(message, response=SimpleNamespace(status_code=status, headers={}, request=None))


@pytest.fixture
def fake_hub(monkeypatch, tiny_model_dir):
    """huggingface_hub's list_repo_files and snapshot_download replaced: ``listing`` is returned or raised by the
    first, ``download`` by the second (default: the tiny model's folder), and every call is recorded."""
    import huggingface_hub

    state = SimpleNamespace(listing=list(LLAMA_FILES), download=str(tiny_model_dir), calls=[])

    def answer(value):
        if isinstance(value, BaseException):
            raise value
        return value

    def list_repo_files(repo_id, **kwargs):
        state.calls.append(("list", repo_id, kwargs))
        return answer(state.listing)

    def snapshot_download(repo_id, **kwargs):
        state.calls.append(("download", repo_id, kwargs))
        return answer(state.download)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return state


def test_a_hub_id_downloads_with_the_allow_list_into_the_default_cache(fake_hub, tiny_model_dir, tmp_path):
    assert hub.resolve_model_dir("org/model", env={}, volume=tmp_path) == tiny_model_dir
    (_, repo, _), (_, again, kwargs) = fake_hub.calls
    assert repo == again == "org/model"
    assert kwargs["allow_patterns"] == hub.download_patterns("org/model", LLAMA_FILES)
    assert kwargs["cache_dir"] is None  # not RunPod: huggingface_hub's own default (HF_HOME, HF_HUB_CACHE)


@pytest.mark.parametrize("error, says", [
    ("gated", ["org/model is a gated model", "accept its license at https://huggingface.co/org/model",
               "export HF_TOKEN=", "`hf auth login`", "`huggingface-cli login`", "no token is set"]),
    ("401", ["refused access to org/model (HTTP 401", "export HF_TOKEN=", "`hf auth login`"]),
    ("403", ["refused access to org/model (HTTP 403", "export HF_TOKEN="]),
    ("missing", ["org/model is not a folder here and was not found on the Hugging Face hub", "check the spelling",
                 "a private model needs a token", "HF_TOKEN"]),
])
def test_a_gated_private_or_missing_model_names_the_model_and_the_way_in(fake_hub, error, says, monkeypatch,
                                                                         tmp_path):
    from huggingface_hub import errors

    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    raised = {"gated": http_error(errors.GatedRepoError, 401, "Access to model org/model is restricted."),
              "401": http_error(errors.HfHubHTTPError, 401, "401 Client Error"),
              "403": http_error(errors.HfHubHTTPError, 403, "403 Client Error"),
              "missing": http_error(errors.RepositoryNotFoundError, 404, "404 Repository Not Found")}[error]
    fake_hub.listing = raised
    with pytest.raises(ConfigError) as refused:
        hub.resolve_model_dir("org/model", env={}, volume=tmp_path)
    for part in says:
        assert part in str(refused.value), (part, str(refused.value))
    assert [call[0] for call in fake_hub.calls] == ["list"]  # refused before any download
    # The same words when only the download meets it (a listing that passed, a download that is refused).
    fake_hub.listing, fake_hub.calls = list(LLAMA_FILES), []
    fake_hub.download = raised
    with pytest.raises(ConfigError) as again:
        hub.resolve_model_dir("org/model", env={}, volume=tmp_path)
    assert str(again.value) == str(refused.value)


def test_with_a_token_the_hint_says_the_token_was_sent(fake_hub, monkeypatch, tmp_path):
    from huggingface_hub import errors

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_x")
    fake_hub.listing = http_error(errors.GatedRepoError, 403, "not in the authorized list")
    with pytest.raises(ConfigError, match="a token from HF_TOKEN was sent"):
        hub.resolve_model_dir("org/model", env={}, volume=tmp_path)


def test_offline_uses_the_cache_and_says_how_to_get_the_model_when_it_is_not_there(fake_hub, tiny_model_dir,
                                                                                    monkeypatch, tmp_path):
    from huggingface_hub import errors

    fake_hub.listing = errors.OfflineModeIsEnabled("offline mode is enabled")
    assert hub.resolve_model_dir("org/model", env={}, volume=tmp_path) == tiny_model_dir  # in the cache: fine
    fake_hub.download = errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as offline:
        hub.resolve_model_dir("org/model", env={}, volume=tmp_path)
    message = str(offline.value)
    assert "org/model is not a local folder and is not (completely) in the hub cache" in message
    assert "HF_HUB_OFFLINE is set" in message and "`hf download org/model`" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    fake_hub.listing = ConnectionError("Name or service not known")
    with pytest.raises(ConfigError, match=r"the hub could not be reached \(LocalEntryNotFoundError"):
        hub.resolve_model_dir("org/model", env={}, volume=tmp_path)


def test_on_runpod_the_cache_is_on_the_persistent_volume_said_once(fake_hub, tmp_path, monkeypatch):
    said = []
    volume = tmp_path / "workspace"
    volume.mkdir()
    monkeypatch.setattr(hub, "_said_cache", set())
    pod = {"RUNPOD_POD_ID": "pod123"}
    for _ in range(2):
        hub.resolve_model_dir("org/model", say=said.append, env=pod, volume=volume)
    assert fake_hub.calls[-1][2]["cache_dir"] == volume / ".cache" / "huggingface" / "hub"
    assert len(said) == 1 and f"models download to {volume}/.cache/huggingface/hub on the persistent volume" in said[0]
    assert "set HF_HOME to choose another place" in said[0]
    # The user's own choice, a pod without a volume, or not a pod: huggingface_hub's default, nothing said.
    for env, where in (({**pod, "HF_HOME": "/elsewhere"}, volume), ({**pod, "HF_HUB_CACHE": "/c"}, volume),
                       (pod, tmp_path / "no-volume"), ({}, volume)):
        hub.resolve_model_dir("org/model", say=said.append, env=env, volume=where)
        assert fake_hub.calls[-1][2]["cache_dir"] is None, env
    assert len(said) == 1


def test_local_paths_never_reach_the_hub(fake_hub, tiny_model_dir, tmp_path):
    fake_hub.listing = AssertionError("a local path must not ask the hub")
    assert hub.resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir.resolve()
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="weights.gguf is a file, not a model folder"):
        hub.resolve_model_dir(str(tmp_path / "weights.gguf"))
    with pytest.raises(ConfigError, match=r"is not a folder here \(no such file or directory\) and not a hub id"):
        hub.resolve_model_dir(str(tmp_path / "no" / "such" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        hub.resolve_model_dir(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="'model.path' is empty"):
        hub.resolve_model_dir("")
    assert fake_hub.calls == []


@pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="torch backend not installed")
def test_both_backends_and_the_torch_fuse_resolve_through_the_one_function(fake_hub, monkeypatch, tmp_path):
    from huggingface_hub import errors

    fake_hub.listing = http_error(errors.GatedRepoError, 401, "gated")
    resolvers = []
    from overnight.backends.torch_backend import TorchBackend
    from overnight.backends.torch_export import export

    resolvers += [lambda: TorchBackend._resolve_model_dir("meta-llama/Llama-3.1-8B"),
                  lambda: export({"base": "meta-llama/Llama-3.1-8B", "adapter": str(tmp_path),
                                  "output": str(tmp_path)})]
    if has("mlx", "mlx_lm"):
        from overnight.backends.mlx_backend import _resolve_model_dir

        resolvers.append(lambda: _resolve_model_dir("meta-llama/Llama-3.1-8B"))
    for resolve in resolvers:
        with pytest.raises(ConfigError, match="meta-llama/Llama-3.1-8B is a gated model"):
            resolve()


# -- the CLI, where the user meets it -------------------------------------------------------------------------

# Loaded by the CLI's Python (PYTHONPATH): the hub answers as it answers a gated model asked without a token.
GATED_HUB = '''
import huggingface_hub
from types import SimpleNamespace
from huggingface_hub import errors

def _gated(repo_id, **kwargs):
    raise errors.GatedRepoError(f"401 Client Error. Access to model {repo_id} is restricted.",
                                response=SimpleNamespace(status_code=401, headers={}, request=None))

huggingface_hub.list_repo_files = huggingface_hub.snapshot_download = _gated
'''


def train_cli(model: str, backend: str, out: Path, env: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "RUNPOD_POD_ID")} | env
    return subprocess.run([sys.executable, "-m", "overnight", "train", "--backend", backend, "--model", model,
                           "--data", str(DATA_DIR), "--output", str(out), "--max-steps", "2", "--quiet"],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300, cwd=ROOT)


@pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="torch backend not installed")
def test_cli_a_gated_model_exits_2_naming_the_model_and_the_token(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(GATED_HUB)
    result = train_cli("meta-llama/Llama-3.1-8B", "torch", tmp_path / "run",
                       {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
                        "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "meta-llama/Llama-3.1-8B is a gated model" in result.stderr
    assert "export HF_TOKEN=" in result.stderr and "hf auth login" in result.stderr


@pytest.mark.skipif(not has("mlx", "mlx_lm"), reason="mlx backend not installed")
def test_cli_an_offline_model_that_is_not_cached_exits_2_saying_what_to_do(tmp_path):
    result = train_cli("some-org/not-downloaded", "mlx", tmp_path / "run",
                       {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "some-org/not-downloaded is not a local folder and is not (completely) in the hub cache" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr and "hf download some-org/not-downloaded" in result.stderr
