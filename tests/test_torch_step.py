"""The torch step's speed choices and what keeps them exact: per-row sums without atomics, train.deterministic,
fused AdamW, no padding mask for right-padded batches (issue 29, item 1). In process on the tiny model, CPU."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import has
from test_torch_backend import make_backend, make_config, preference_batch, sft_batch

pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="needs torch, transformers and peft"),
]


def _grpo_batch(model_dir: Path):
    batch = sft_batch(model_dir)
    batch.advantages = np.random.default_rng(0).normal(size=batch.num_rows).astype(np.float32)
    batch.old_logp = None
    return batch


# --------------------------------------------------------------------------- per-row sums


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_the_per_row_sums_add_without_atomic_accumulation(tiny_model_dir, method):
    """index_add / scatter_add add with atomics on CUDA, in the order threads arrive: the step's own code uses none
    (they forced the global deterministic mode for exact losses). Every torch call of a training step is watched."""
    import torch
    from torch.overrides import TorchFunctionMode

    from overnight.backend import objectives

    class Watch(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            if any(word in name for word in ("index_add", "scatter_add", "scatter_reduce", "index_reduce")):
                self.seen.add(name)
            return func(*args, **(kwargs or {}))

    backend, _ = make_backend(tiny_model_dir, data__method=method, grpo__beta=0.05)
    batch = _grpo_batch(tiny_model_dir) if method == "grpo" else sft_batch(tiny_model_dir)
    token_scale, pair_scale, _ = objectives.step_scales(method, [batch])
    with Watch() as watch:
        loss = backend._local_passes([batch], token_scale, pair_scale)
    assert torch.isfinite(loss) and not watch.seen, watch.seen


def test_row_sums_are_the_per_row_totals():
    import torch

    from overnight.backends.torch_backend import _row_sums

    rows, cols = torch.tensor([0, 0, 2, 2, 2]), torch.tensor([1, 3, 0, 1, 4])
    values = torch.tensor([1.5, 2.0, -1.0, 0.25, 4.0], requires_grad=True)
    sums = _row_sums(values, (rows, cols), (3, 5))
    assert sums.tolist() == [3.5, 0.0, 3.25]
    (sums * torch.tensor([1.0, 10.0, 100.0])).sum().backward()
    assert values.grad.tolist() == [1.0, 1.0, 100.0, 100.0, 100.0]


# --------------------------------------------------------------------------- train.deterministic


@pytest.mark.parametrize("deterministic", [True, False])
def test_train_deterministic_sets_the_global_mode_on_cuda_only_when_true(tiny_model_dir, monkeypatch, deterministic):
    """The device pick with CUDA present (simulated: the decision, not a kernel): the global mode, and cuBLAS's
    fixed workspace, only with train.deterministic=true; a CPU setup never sets it (its kernels need no mode)."""
    import torch

    from overnight.backends.torch_backend import TorchBackend

    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "restored-after-the-test")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    try:
        backend, _ = make_backend(tiny_model_dir, train__deterministic=deterministic)
        assert not torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(not deterministic)  # the opposite, so the pick is seen to set it
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        cuda = TorchBackend()
        cuda._read_config(make_config(tiny_model_dir, train__deterministic=deterministic))
        cuda._pick_device()
        assert cuda._device.type == "cuda"
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        # strict: with warn_only torch keeps flash and memory-efficient attention's backward non-deterministic
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (":4096:8" if deterministic else None)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def test_a_cublas_workspace_deterministic_mode_refuses_is_refused_before_loading():
    """CUBLAS_WORKSPACE_CONFIG: set to :4096:8 when unset, a user's :16:8 kept (the two values torch's strict mode
    accepts), anything else refused by the key and the variable's name (torch would refuse the first matmul)."""
    from overnight.backends.torch_backend import fix_cublas_workspace
    from overnight.config import ConfigError

    unset: dict = {}
    fix_cublas_workspace(unset)
    assert unset == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    small = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    fix_cublas_workspace(small)
    assert small == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    for value in (":0:0", ":4096:2", "4096:8", ""):
        with pytest.raises(ConfigError, match="train.deterministic.*CUBLAS_WORKSPACE_CONFIG.*:4096:8 or :16:8"):
            fix_cublas_workspace({"CUBLAS_WORKSPACE_CONFIG": value})


def test_an_op_without_a_deterministic_kernel_is_said_as_the_config_key():
    """Strict mode raises torch's own RuntimeError for such an op (put_ does on the CPU too): every backend call
    that runs the model says it as train.deterministic, naming the op; other errors pass unchanged."""
    import torch

    from overnight.backends.torch_backend import TorchBackend, _say_which_op_is_not_deterministic
    from overnight.config import ConfigError

    for name in ("train_step", "eval_loss", "sample", "generate", "token_logps", "reward_scores"):
        assert getattr(getattr(TorchBackend, name), "__wrapped__", None) is not None, name

    class Calls:
        @_say_which_op_is_not_deterministic
        def put(self):
            torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))

        @_say_which_op_is_not_deterministic
        def other(self):
            raise RuntimeError("shape mismatch")

    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(ConfigError, match=r"'train.deterministic': this model runs put_, .*"
                                              r"train.deterministic=false"):
            Calls().put()
        with pytest.raises(RuntimeError, match="shape mismatch"):
            Calls().other()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


# aten ops CUDA's strict deterministic mode refuses (torch.use_deterministic_algorithms' list), with the condition
# under which it does; none may run in overnight's own steps, evals and sampling.
def _refused_on_cuda(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in ("cumsum", "cumsum_"):
        return args[0].is_floating_point() or args[0].is_complex()
    if name == "bincount":
        return len(args) > 1 and args[1] is not None or kwargs.get("weights") is not None
    if name == "nll_loss2d_forward":
        return args[3] != 0  # reduction other than none
    if name == "median":
        return func.__name__ != "median.default"  # with indices
    return name in ("histc", "put", "put_", "_ctc_loss_backward", "grid_sampler_2d_backward", "max_unpool2d",
                    "max_unpool3d", "avg_pool3d_backward", "adaptive_avg_pool2d_backward",
                    "adaptive_avg_pool3d_backward", "adaptive_max_pool2d_backward", "fractional_max_pool2d_backward",
                    "fractional_max_pool3d_backward", "upsample_linear1d_backward", "upsample_bilinear2d_backward",
                    "upsample_bicubic2d_backward", "upsample_trilinear3d_backward", "reflection_pad1d_backward",
                    "reflection_pad2d_backward", "reflection_pad3d_backward")


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo", "reward"])
def test_no_step_eval_or_sampling_runs_an_op_cuda_deterministic_mode_refuses(tiny_model_dir, method):
    """Under train.deterministic CUDA raises at any op without a deterministic kernel (a float cumsum among them:
    top-p sampling took one): every aten op of a training step, an eval, and for grpo nucleus sampling, watched
    on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refused = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if _refused_on_cuda(func, args, kwargs or {}):
                self.refused.add(func.__name__)
            return func(*args, **(kwargs or {}))

    backend, _ = make_backend(tiny_model_dir, data__method=method, grpo__beta=0.05)
    batch = _grpo_batch(tiny_model_dir) if method == "grpo" else \
        sft_batch(tiny_model_dir) if method == "sft" else preference_batch(tiny_model_dir)
    with Watch() as watch:
        backend.train_step([batch], 1e-2)
        backend.eval_loss(batch)
        if method == "grpo":
            samples = backend.sample(batch.input_ids[0, :4], [1, 2, 3], 6, 0.9, 0.5, ())
    assert not watch.refused, watch.refused
    if method == "grpo":
        assert samples.shape == (3, 6)


def test_without_deterministic_mode_two_runs_give_the_same_losses(tiny_model_dir):
    """train.deterministic=false on the default path (4-bit, dropout on): the same seed gives the same losses bit
    for bit, the sums being deterministic by construction."""
    runs = []
    for _ in range(2):
        backend, _ = make_backend(tiny_model_dir, bits=4, seed=3, lora__dropout=0.05, train__deterministic=False)
        batch = sft_batch(tiny_model_dir)
        runs.append([backend.train_step([keyed], 1e-2).loss for keyed in _keyed(batch, 3)])
    assert runs[0] == runs[1]


def _keyed(batch, steps: int):
    """The batch once per step with its own dropout key, as the loop hands micro-batches."""
    for step in range(steps):
        batch.noise_seed = 1000 + step
        yield batch


def test_train_deterministic_is_not_compared_on_resume(tmp_path):
    """Either value trains the same model: a resume with the other one is accepted (it is not a training key)."""
    from overnight.config import Config
    from overnight.runs import fingerprint

    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a"}\n')
    on, off = Config(), Config()
    off.train.deterministic = False
    assert on.train.deterministic is True
    assert fingerprint.differences(fingerprint.compute(on, train, None), fingerprint.compute(off, train, None)) == []


# --------------------------------------------------------------------------- fused AdamW


def test_adamw_is_fused_and_matches_the_default_kernel_across_a_resume(tiny_model_dir, tmp_path, monkeypatch):
    """Fused by default where torch has the kernel (the CPU too, in torch 2.13); the same losses as torch's default
    AdamW to float tolerance; a checkpoint of the default kernel (a run from before) resumes into the fused one,
    which keeps its kernel and the state's format."""
    import torch

    from overnight.backends import torch_backend

    fused, info = make_backend(tiny_model_dir, bits=4)
    assert fused._optimizer.param_groups[0]["fused"] is True and info.details["adamw_fused"] is True
    monkeypatch.setattr(torch_backend, "_fused_adamw_supported", lambda params: False)
    default, _ = make_backend(tiny_model_dir, bits=4)
    assert not default._optimizer.param_groups[0]["fused"]
    batch = sft_batch(tiny_model_dir)
    for _ in range(3):
        a, b = fused.train_step([batch], 1e-2).loss, default.train_step([batch], 1e-2).loss
        assert a == pytest.approx(b, rel=1e-5)
    for p, q in zip(fused._params, default._params):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)
    default.save(tmp_path)
    fused.load(tmp_path)
    assert fused._optimizer.param_groups[0]["fused"] is True
    state = fused._optimizer.state[fused._params[0]]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["step"].dtype == torch.float32
    assert float(state["step"]) == 3.0
    for _ in range(2):
        assert fused.train_step([batch], 1e-2).loss == pytest.approx(default.train_step([batch], 1e-2).loss, rel=1e-5)


# --------------------------------------------------------------------------- no mask for right padding


def _objective_and_grads(backend, batch, method):
    import torch

    from overnight.backend import objectives

    backend._model.train()
    backend._optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks both ways
    token_scale, pair_scale, _ = objectives.step_scales(method, [batch])
    loss = backend._local_passes([batch], token_scale, pair_scale).item()
    return loss, [p.grad.detach().clone() for p in backend._params]


@pytest.mark.parametrize("method", ["sft", "dpo", "reward"])
def test_right_padded_batches_train_without_the_mask_to_the_same_values(tiny_model_dir, monkeypatch, method):
    """The default path (4-bit, dropout on) with LoRA and the score head moved off zero: the objective and every
    gradient with the padding mask and without it agree to float rounding, and right-padded rows get none."""
    import torch

    from overnight.backends import torch_backend

    batch = sft_batch(tiny_model_dir) if method == "sft" else preference_batch(tiny_model_dir)
    assert (batch.attention_mask == 0).any()  # rows of several lengths: padding to mask
    backend, _ = make_backend(tiny_model_dir, bits=4, lora__dropout=0.05, data__method=method)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in backend._params:
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
    assert backend._tensors(batch)[1] is None
    without = _objective_and_grads(backend, batch, method)
    monkeypatch.setattr(torch_backend, "_causal_mask_changes_nothing", lambda *args: False)
    assert backend._tensors(batch)[1] is not None
    masked = _objective_and_grads(backend, batch, method)
    assert without[0] == pytest.approx(masked[0], rel=1e-6, abs=1e-6)
    for a, b in zip(without[1], masked[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_left_padded_and_other_masks_are_kept(tiny_model_dir):
    from overnight.backend import Batch
    from overnight.backends.torch_backend import _causal_mask_changes_nothing

    backend, _ = make_backend(tiny_model_dir)
    right = sft_batch(tiny_model_dir)
    width = right.attention_mask.shape[1]
    left = Batch(*(np.stack([np.roll(row, width - int(n)) for row, n in zip(a, right.attention_mask.sum(1))])
                   for a in (right.input_ids, right.loss_mask, right.attention_mask)), right.pad_id)
    assert left.attention_mask[:, -1].all() and not left.attention_mask[:, 0].all()
    assert backend._tensors(left)[1] is not None
    assert backend._tensors(right)[1] is None
    rows, cols = np.nonzero(right.loss_mask[:, 1:])
    assert _causal_mask_changes_nothing(right.attention_mask, rows, cols)
    # a target read at a padded position, or a mask that is not 0/1 (segment ids), keeps the mask
    padded = right.attention_mask.copy()
    padded[rows[-1], cols[-1]:] = 0
    assert not _causal_mask_changes_nothing(padded, rows, cols)
    assert not _causal_mask_changes_nothing(right.attention_mask * 2, rows, cols)


# --------------------------------------------------------------------------- CUDA only


@pytest.mark.cuda
def test_cuda_step_without_deterministic_mode_is_fused_unmasked_and_reproducible(tiny_model_dir, tmp_path):
    """On a GPU, train.deterministic=false: the global mode stays off, the same weights give the same loss bit for
    bit (the sums no longer need the mode), AdamW is fused with its step counts on the GPU, where a checkpoint and
    a portable state put them back."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        backend, info = make_backend(tiny_model_dir, bits=4, train__deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled() and info.details["adamw_fused"] is True
        batch = sft_batch(tiny_model_dir)
        assert backend._tensors(batch)[1] is None
        assert len({backend.eval_loss(batch)[0] for _ in range(3)}) == 1
        backend.train_step([batch], 1e-2)

        def steps_on_gpu() -> bool:
            return all(backend._optimizer.state[p]["step"].device.type == "cuda" for p in backend._params)

        assert steps_on_gpu()
        backend.save(tmp_path)
        backend.load(tmp_path)
        assert steps_on_gpu()
        backend.load_portable(backend.portable_state())
        assert steps_on_gpu()
        assert np.isfinite(backend.train_step([batch], 1e-2).loss)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
