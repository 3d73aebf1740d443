"""lora.targets: every named target must match a module in the blocks that get LoRA, by the one rule both backends
call (src/backend/lora_targets.py). The backends' own tests check that each of them goes through it."""
from __future__ import annotations

import pytest

from overnight.backend import lora_targets
from overnight.config import ConfigError

BLOCK = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]
MODEL = ["model.embed_tokens", "lm_head"] + [f"model.layers.{i}.{p}" for i in range(4) for p in BLOCK]


def test_targets_by_last_part_or_longer_path_give_block_paths():
    assert lora_targets.resolve(["q_proj", "mlp.down_proj"], MODEL, [2, 3]) == ["mlp.down_proj", "self_attn.q_proj"]
    with pytest.raises(ConfigError, match="proj matches no module"):  # a part of a name is not a name
        lora_targets.resolve(["proj"], MODEL, [3])


def test_one_target_that_matches_nothing_is_refused_naming_it_and_what_exists():
    with pytest.raises(ConfigError) as caught:
        lora_targets.resolve(["q_proj", "vproj"], MODEL, range(4))
    message = str(caught.value)
    assert message.startswith("config key 'lora.targets': vproj matches no module")
    assert "q_proj matches" not in message
    assert "self_attn.v_proj" in message and "mlp.down_proj" in message  # what there is
    assert "did you mean v_proj?" in message


def test_a_target_must_match_inside_the_blocks_that_get_lora():
    # lm_head exists, but outside the blocks: mlx-lm cannot put LoRA there and PEFT would, so both refuse it.
    with pytest.raises(ConfigError, match="lm_head matches no module of the blocks that get LoRA"):
        lora_targets.resolve(["q_proj", "lm_head"], MODEL, range(4))
    # A module only some blocks have (a hybrid model) must be in one of the last lora.layers blocks.
    hybrid = MODEL + ["model.layers.0.mixer.in_proj"]
    assert lora_targets.resolve(["in_proj"], hybrid, range(4)) == ["mixer.in_proj"]
    with pytest.raises(ConfigError, match=r"in_proj matches no module of the blocks that get LoRA \(blocks 2-3\)"):
        lora_targets.resolve(["in_proj"], hybrid, [2, 3])


@pytest.mark.parametrize("blocks, layers, expected", [(4, -1, [0, 1, 2, 3]), (4, 1, [3]), (4, 2, [2, 3]),
                                                      (4, 16, [0, 1, 2, 3])])
def test_lora_blocks_are_the_last_n(blocks, layers, expected):
    assert lora_targets.lora_blocks(blocks, layers) == expected


@pytest.mark.parametrize("blocks, layers, note", [
    (2, 16, "lora.layers=16 but the model has 2 blocks; using all"),
    (30, 16, None), (16, 16, None), (4, -1, None),
])
def test_more_lora_layers_than_blocks_is_a_note_not_silence(blocks, layers, note):
    assert lora_targets.lora_blocks_note(blocks, layers) == note
