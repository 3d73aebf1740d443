"""The framework-free LoRA init both backends load (src/backend/lora_init.py)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import has
from overnight.backend.lora_init import lora_a, neutral_module_name


def test_neutral_names_agree_across_peft_and_mlx_lm():
    assert neutral_module_name("base_model.model.model.layers.3.self_attn.q_proj") == "layers.3.self_attn.q_proj"
    assert neutral_module_name("model.layers.3.self_attn.q_proj") == "layers.3.self_attn.q_proj"
    assert neutral_module_name("language_model.model.layers.10.mlp.down_proj") == "layers.10.mlp.down_proj"
    with pytest.raises(ValueError, match="numbered transformer block"):
        neutral_module_name("lm_head")


def test_draws_are_keyed_by_seed_and_module_and_follow_the_kaiming_law():
    a = lora_a(0, "layers.0.self_attn.q_proj", 8, 256)
    assert a.shape == (8, 256) and a.dtype == np.float32
    assert np.array_equal(a, lora_a(0, "layers.0.self_attn.q_proj", 8, 256))
    assert not np.array_equal(a, lora_a(1, "layers.0.self_attn.q_proj", 8, 256))
    assert not np.array_equal(a, lora_a(0, "layers.0.self_attn.k_proj", 8, 256))
    bound = 1 / np.sqrt(256)  # PEFT's kaiming_uniform(a=sqrt(5)) on (r, in) and mlx-lm's U(-1/sqrt(in), 1/sqrt(in))
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert abs(a.mean()) < 0.05 * bound and a.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)


@pytest.mark.torch
@pytest.mark.mlx
@pytest.mark.skipif(not has("torch", "peft", "mlx", "mlx_lm"), reason="needs both backends")
def test_both_backends_start_from_the_same_adapter(tiny_model_dir):
    from mlx.utils import tree_flatten

    from overnight.backends.mlx_backend import MLXBackend
    from overnight.backends.torch_backend import TorchBackend
    from overnight.config import build_config

    cfg = build_config(None, {}, [f"model.path={tiny_model_dir}", "model.quantization.bits=0", "lora.rank=4",
                                  "lora.layers=-1", "lora.targets=[q_proj, v_proj, down_proj]"])
    torch_backend, mlx_backend = TorchBackend(), MLXBackend()
    torch_backend.setup(cfg, 5)
    mlx_backend.setup(cfg, 5)
    torch_a = {neutral_module_name(name.split(".lora_A")[0]): p.detach().numpy()
               for name, p in torch_backend._model.named_parameters() if ".lora_A." in name}
    mlx_a = {neutral_module_name(name.rsplit(".lora_a", 1)[0]): np.array(v).T
             for name, v in tree_flatten(mlx_backend.model.trainable_parameters()) if name.endswith("lora_a")}
    assert sorted(torch_a) == sorted(mlx_a) and len(torch_a) == 6
    for name, value in torch_a.items():
        assert np.array_equal(mlx_a[name], value), name
    assert all(not np.array(v).any() for name, v in tree_flatten(mlx_backend.model.trainable_parameters())
               if name.endswith("lora_b"))
