"""A reward model as a GRPO reward (src/methods/reward_model.py, backends/*_reward_model.py): both backends score as
transformers (+ PEFT) does with TRL's inputs, for a sequence classifier folder and a SEQ_CLS adapter; a GRPO run
through the CLI combines one with a function reward; what is not a one-label classifier is refused (exit 2) naming
it; a changed reward model is a changed fingerprint."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_DIR, ROOT, has
from overnight.backend.objectives import score_positions
from overnight.config import Config, ConfigError
from overnight.methods import reward_model as rm
from overnight.methods import rewards as rw
from overnight.runs.rundir import read_metrics

needs_torch = pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="needs the torch backend")
needs_mlx = pytest.mark.skipif(not has("mlx", "mlx_lm"), reason="needs the mlx backend")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _quiet_load(base: Path, labels: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the causal LM's lm_head unused and a new score head: expected here
    return AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=labels)


def build_classifier(base: Path, out: Path, labels: int = 1, seed: int = 1) -> Path:
    """A LlamaForSequenceClassification of the tiny model with a random (non-zero) head and rope_theta 100000, saved
    with its tokenizer."""
    import torch

    torch.manual_seed(seed)
    model = _quiet_load(base, labels)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(out))
    # transformers 5 writes rope_theta only inside rope_parameters (as in the SmolLM2 folder, whose 100000 mlx-lm
    # would read as its default 10000): a theta other than the default shows whether both backends read it
    config = json.loads((out / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 100000.0
    (out / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(base / name, out / name)
    return out


def build_adapter(base: Path, out: Path, seed: int = 2) -> Path:
    """A PEFT SEQ_CLS LoRA adapter over the tiny causal LM, LoRA B and the head non-zero, base recorded as ``base``."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_quiet_load(base, 1), LoraConfig(
        task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or ("score" in name and parameter.requires_grad):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def reward_models(tiny_model_dir, tmp_path_factory):
    if not has("torch", "transformers", "peft"):
        pytest.skip("building the test reward models needs transformers and peft")
    root = tmp_path_factory.mktemp("reward-models")
    classifier = build_classifier(tiny_model_dir, root / "classifier")
    # pad == eos, as many chat models ship: a row ending in eos is scored at the token before it
    eos_pad = root / "eos-pad"
    shutil.copytree(classifier, eos_pad)
    for name, key in (("tokenizer_config.json", "pad_token"), ("special_tokens_map.json", "pad_token")):
        data = json.loads((eos_pad / name).read_text())
        (eos_pad / name).write_text(json.dumps({**data, key: "<|eos|>"}))
    config = json.loads((eos_pad / "config.json").read_text())
    (eos_pad / "config.json").write_text(json.dumps({**config, "pad_token_id": 2}))
    adapter = build_adapter(tiny_model_dir, root / "adapter")
    return {"classifier": classifier, "eos_pad": eos_pad, "adapter": adapter,
            "mlx_adapter": as_mlx_reward_adapter(adapter, root / "mlx-adapter")}


def as_mlx_reward_adapter(peft_dir: Path, out: Path) -> Path:
    """The same reward adapter in the mlx backend's layout (mlx-lm's adapters.safetensors with the LoRA tensors only,
    the head as score.weight in score_head.safetensors, reward_head.json), written by hand so the layout is pinned
    here."""
    from safetensors.numpy import load_file, save_file

    config = json.loads((peft_dir / rm.ADAPTER_CONFIG).read_text())
    tensors, head = {}, {}
    for key, value in load_file(str(peft_dir / rm.ADAPTER_WEIGHTS)).items():
        if key == rm.PEFT_HEAD:
            head["score.weight"] = value
        else:
            module, kind = key[len("base_model.model."):].rsplit(".", 2)[:2]
            tensors[f"{module}.{kind.lower()}"] = np.ascontiguousarray(value.T)
    out.mkdir()
    save_file(tensors, str(out / rm.MLX_ADAPTER_WEIGHTS))
    save_file(head, str(out / "score_head.safetensors"))
    (out / "reward_head.json").write_text(json.dumps({"num_labels": 1, "pad_token_id": 0,
                                                      "score_file": "score_head.safetensors",
                                                      "score_key": "score.weight"}))
    (out / rm.ADAPTER_CONFIG).write_text(json.dumps({
        "fine_tune_type": "lora", "model": config["base_model_name_or_path"], "num_layers": -1,
        "lora_parameters": {"rank": config["r"], "scale": config["lora_alpha"] / config["r"], "dropout": 0.0,
                            "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]},
        "overnight": {"method": "reward"}}))
    return out


PLAIN_PROMPTS = ["What is 2 + 2?", "Name the capital of France.", "Hi", "Say hello"]
PLAIN_COMPLETIONS = [" 4", " The capital of France is Paris, a city on the Seine.", " there<|eos|>", ""]
CHAT_PROMPTS = [[{"role": "user", "content": "What is 6 + 3?"}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Japan?"}]]
CHAT_COMPLETIONS = [[{"role": "assistant", "content": "9"}],
                    [{"role": "assistant", "content": "The capital of Japan is Tokyo."}]]


def transformers_scores(model_dir: Path, adapter: Path | None, prompts, completions) -> np.ndarray:
    """TRL 1.16's GRPOTrainer._calculate_rewards on a reward model, in float32."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = _quiet_load(model_dir, 1).float()
    model.config.pad_token_id = tok.pad_token_id
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    if isinstance(prompts[0], list):
        texts = [tok.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    else:
        texts = [p + c for p, c in zip(prompts, completions)]
    inputs = tok(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.inference_mode():
        return model(**inputs).logits[:, 0].double().numpy()


def bound(path: Path, backend: str) -> rm.RewardModel:
    reward = rw.load_reward(f"reward_model={path}")
    if backend == "torch":
        import torch

        fake = types.SimpleNamespace(name="torch", placement=(torch.device("cpu"), torch.float32))
    else:
        fake = types.SimpleNamespace(name="mlx")
    reward.bind(fake)
    return reward


@needs_torch
@pytest.mark.parametrize("backend, kind", [
    *[pytest.param(b, k, marks=marks) for k in ("classifier", "eos_pad", "adapter")
      for b, marks in (("torch", [pytest.mark.torch]), ("mlx", [needs_mlx, pytest.mark.mlx]))],
    *[pytest.param(b, "mlx_adapter", marks=marks) for b, marks in (("torch", [pytest.mark.torch]),
                                                                     ("mlx", [needs_mlx, pytest.mark.mlx]))]])
def test_scores_equal_transformers_with_trls_inputs(backend, kind, reward_models, tiny_model_dir):
    """Plain rows of different lengths (one empty completion, one ending in the eos token, which is the pad token of
    eos_pad) and chat rows through the reward model's chat template score as transformers (+ PEFT) scores TRL's
    right-padded batch, to 1e-4; and one row alone scores as in the batch. mlx_adapter: the PEFT adapter's weights in
    the mlx reward adapter's layout (an mlx reward run's) score as the PEFT adapter does, on both backends."""
    path = reward_models[kind]
    reward = bound(path, backend)
    model_dir, adapter = (tiny_model_dir, reward_models["adapter"]) if "adapter" in kind else (path, None)
    for prompts, completions in ((PLAIN_PROMPTS, PLAIN_COMPLETIONS), (CHAT_PROMPTS, CHAT_COMPLETIONS)):
        ours = np.array(reward(prompts=prompts, completions=completions, completion_ids=[[]] * len(prompts)))
        expected = transformers_scores(model_dir, adapter, prompts, completions)
        assert np.abs(ours - expected).max() < 1e-4, (ours, expected)
        assert np.ptp(expected) > 0.1  # the rows score differently: a position or padding mistake would show
    alone = reward(prompts=PLAIN_PROMPTS[2:3], completions=PLAIN_COMPLETIONS[2:3])
    assert abs(alone[0] - ours_row(reward, 2)) < 1e-5
    if kind == "eos_pad":
        ids = reward.tok.encode(PLAIN_PROMPTS[2] + PLAIN_COMPLETIONS[2], add_special_tokens=False)
        assert ids[-1] == reward.pad_id == 2 and score_positions(np.array([ids]), 2)[0] == len(ids) - 2


def ours_row(reward, i: int) -> float:
    return reward(prompts=PLAIN_PROMPTS, completions=PLAIN_COMPLETIONS)[i]


def test_out_of_memory_scores_in_parts_with_the_same_values():
    from overnight.backend import OutOfMemory

    class Scorer:
        calls = []

        def score(self, ids, mask, positions):
            self.calls.append(len(ids))
            if len(ids) > 2:
                raise OutOfMemory("too big")
            return ids[np.arange(len(ids)), positions].astype(np.float64)

    reward = object.__new__(rm.RewardModel)
    reward._scorer, reward.pad_id, reward._chunk = Scorer(), 0, 0
    rows = [[3], [4, 5], [6, 7, 8], [9], [1, 2]]
    assert reward.score_rows(rows).tolist() == [3, 5, 8, 9, 2]
    assert Scorer.calls == [5, 2, 2, 1]  # halved once, kept so


# -- what PATH may be, and what is refused -----------------------------------------------------------------------

def test_a_reward_run_directory_resolves_to_its_adapter_on_the_runs_base(reward_models, tiny_model_dir, tmp_path):
    run = tmp_path / "rm-run"
    shutil.copytree(reward_models["adapter"], run / "adapter")
    config = json.loads((run / "adapter" / rm.ADAPTER_CONFIG).read_text())
    (run / "adapter" / rm.ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": "gone/base"}))
    (run / "config.yaml").write_text(f"model:\n  path: {tiny_model_dir}\ndata:\n  method: reward\n")
    loc = rm.locate(str(run))
    assert (loc.kind, loc.model_dir, loc.adapter_dir, loc.label) == ("run", tiny_model_dir.resolve(),
                                                                     run / "adapter", "rm-run")
    (run / "config.yaml").write_text(f"model:\n  path: {tiny_model_dir}\ndata:\n  method: dpo\n")
    with pytest.raises(ConfigError, match="trained method 'dpo', not a reward model"):
        rm.locate(str(run))
    (run / "config.yaml").write_text(f"model:\n  path: {tiny_model_dir}\ndata:\n  method: reward\n")
    shutil.rmtree(run / "adapter")
    (run / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="has no final adapter yet"):
        rm.locate(str(run))


def _edited(src: Path, dst: Path, name: str, **changes) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / name).read_text())
    (dst / name).write_text(json.dumps({**data, **changes}))
    return dst


def test_bad_folders_are_config_errors_naming_them(reward_models, tiny_model_dir, tmp_path):
    cases = [
        (tmp_path / "nope", "no such folder"),
        (tiny_model_dir, "is not a sequence classifier (config.json architectures: ['LlamaForCausalLM'])"),
        (_edited(reward_models["adapter"], tmp_path / "causal-adapter", rm.ADAPTER_CONFIG, task_type="CAUSAL_LM"),
         "task_type 'CAUSAL_LM', not a sequence classifier"),
        (_edited(reward_models["adapter"], tmp_path / "orphan", rm.ADAPTER_CONFIG,
                 base_model_name_or_path=str(tmp_path / "no-base")), "which is not a local model folder"),
        (_edited(reward_models["classifier"], tmp_path / "labels", "config.json",
                 id2label={"0": "bad", "1": "good"}), "a classifier with 2 labels"),
    ]
    causal_mlx = tmp_path / "causal-mlx"  # an mlx-lm adapter of a causal LM: no reward_head.json
    shutil.copytree(reward_models["mlx_adapter"], causal_mlx)
    (causal_mlx / "reward_head.json").unlink()
    (causal_mlx / "score_head.safetensors").unlink()
    headless = tmp_path / "headless"
    shutil.copytree(reward_models["mlx_adapter"], headless)
    (headless / "score_head.safetensors").unlink()
    cases += [
        (_edited(reward_models["mlx_adapter"], tmp_path / "mlx-labels", "reward_head.json", num_labels=2),
         "reward_head.json: num_labels is 2"),
        (causal_mlx, "is an mlx-lm adapter without a score head (no reward_head.json and score_head.safetensors)"),
        (headless, "reward_head.json names a score head in score_head.safetensors, which is missing"),
    ]
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(reward_models["classifier"], no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    cases.append((no_tokenizer, "has no tokenizer.json"))
    for path, words in cases:
        with pytest.raises(ConfigError) as info:
            rw.load_rewards(_cfg(f"reward_model={path}"))
        assert words in str(info.value) and str(path.resolve() if path.exists() else path) in str(info.value)


def _cfg(*specs: str) -> Config:
    cfg = Config()
    cfg.data.method = "grpo"
    cfg.grpo.rewards = list(specs)
    return cfg


def test_the_fingerprint_tells_a_changed_reward_model_from_a_moved_one(reward_models, tmp_path):
    from overnight.runs import fingerprint as fp

    data = DATA_DIR / "grpo" / "train.jsonl"
    folder = tmp_path / "rm"
    shutil.copytree(reward_models["classifier"], folder)
    # a copy is the same model (by content, not by path)
    assert rm.identity(rm.locate(str(folder))) == rm.identity(rm.locate(str(reward_models["classifier"])))
    cfg = _cfg(f"reward_model={folder}", "contains")
    cfg.model.path = str(reward_models["classifier"])
    before = fp.compute(cfg, data, None)
    assert fp.differences(before, fp.compute(cfg, data, None)) == []
    retrained = build_classifier(reward_models["classifier"], tmp_path / "retrained", seed=7)  # the same shapes
    for name in ("model.safetensors", "config.json"):
        shutil.copy(retrained / name, folder / name)
    assert fp.differences(before, fp.compute(cfg, data, None)) == [
        f"grpo.rewards: the reward model of reward_model={folder} changed (its config, tokenizer or weights)"]


# -- as a user meets it ------------------------------------------------------------------------------------------

def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL, timeout=300)


def grpo_args(backend: str, model: Path, out: Path, rewards: str, *extra: str) -> list[str]:
    return ["train", "--backend", backend, "--model", str(model), "--data", str(DATA_DIR / "grpo"), "--method",
            "grpo", "--output", str(out), "--max-steps", "2", "--batch-size", "2", "--quiet",
            "--set", f"grpo.rewards=[{rewards}]", "--set", "grpo.max_new_tokens=6", "--set", "grpo.group_size=2",
            "--set", "model.max_seq_length=64", "--set", "train.report_every=1", "--set", "lora.rank=4",
            "--set", "eval.every_steps=1000", "--set", "checkpoint.every_steps=1000",
            "--set", "grpo.log_completions_every=1", "--set", "grpo.eval_prompts=2", *extra]


@needs_torch
@pytest.mark.parametrize("backend", [pytest.param("torch", marks=pytest.mark.torch),
                                     pytest.param("mlx", marks=[needs_mlx, pytest.mark.mlx])])
def test_a_grpo_run_scores_with_a_reward_model_beside_a_function_reward(backend, reward_models, tiny_model_dir,
                                                                        tmp_path):
    """Defaults otherwise (4-bit on torch, dropout on): the reward model's scores are in metrics.jsonl and
    completions.jsonl under its folder's name, weighted with the function reward into the total."""
    out = tmp_path / "run"
    result = cli(grpo_args(backend, tiny_model_dir, out, f"reward_model={reward_models['classifier']},contains",
                           "--set", "grpo.reward_weights=[0.5,1.0]"))
    assert result.returncode == 0, result.stdout + result.stderr
    train = [r for r in read_metrics(out) if r["event"] == "train"]
    assert len(train) == 2
    for event in train:
        assert np.isfinite(event["rewards/classifier/mean"]) and event["rewards/classifier/std"] > 0
        assert "rewards/contains/mean" in event
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    for line in lines:
        weighted = 0.5 * line["rewards"]["classifier"] + line["rewards"]["contains"]
        assert abs(line["reward"] - weighted) < 1e-9
    # each is the reward model's score of the row's prompt text + the completion text (prompt rows: TRL
    # concatenates them; the policy saw the prompt through its chat template, the reward model does not)
    rows = [json.loads(x)["prompt"] for x in (DATA_DIR / "grpo" / "train.jsonl").read_text().splitlines()]
    prompts = [next(p for p in rows if p in line["prompt"]) for line in lines[:4]]
    again = bound(reward_models["classifier"], "torch")(prompts=prompts, completions=[x["completion"] for x in lines[:4]])
    assert np.allclose(again, [x["rewards"]["classifier"] for x in lines[:4]], atol=1e-4)


@needs_torch
@pytest.mark.parametrize("case", ["missing", "causal", "two_labels"])
def test_the_cli_refuses_what_is_not_a_one_label_classifier(case, reward_models, tiny_model_dir, tmp_path):
    path = {"missing": lambda: tmp_path / "no-such-rm", "causal": lambda: tiny_model_dir,
            "two_labels": lambda: build_classifier(tiny_model_dir, tmp_path / "two", labels=2)}[case]()
    result = cli(grpo_args("torch", tiny_model_dir, tmp_path / "run", f"reward_model={path},contains"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(path) in result.stderr and "Traceback" not in result.stderr
    assert {"missing": "no such folder", "causal": "is not a sequence classifier",
            "two_labels": "2 labels"}[case] in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
