"""GRPO rewards (src/methods/rewards.py): loading by name, TRL's calling convention, None handling, advantages, and the
errors a user meets: named, with the row, never a silent 0."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import DATA_DIR
from overnight.methods import rewards as rw
from overnight.config import Config, ConfigError


def cfg_with(*specs: str, weights=()) -> Config:
    cfg = Config()
    cfg.grpo.rewards, cfg.grpo.reward_weights = list(specs), list(weights)
    return cfg


def call(reward, completions, **fields):
    return reward.func(prompts=["p"] * len(completions), completions=completions,
                       completion_ids=[[1]] * len(completions), **fields)


def test_builtins_score_text_and_chat_completions():
    exact, contains, regex, length = rw.load_rewards(cfg_with("exact_match", "contains=solution", r"regex=^\d+$",
                                                              "length_penalty=4"))
    assert call(exact, [" 7 ", "8", [{"role": "assistant", "content": "7"}]], answer=["7", "7", "7"]) == [1.0, 0.0, 1.0]
    assert exact.field == "answer" and contains.field == "solution" and regex.field is None
    assert call(contains, ["it is 12.", "no"], solution=["12", "12"]) == [1.0, 0.0]
    assert call(regex, ["42", "4 2"]) == [1.0, 0.0]
    assert call(length, ["abcd", "abcdefgh"]) == [0.0, -1.0]
    assert [r.key for r in (exact, contains, regex, length)] == ["exact_match", "contains=solution", r"regex=^\d+$",
                                                                  "length_penalty=4"]


def test_trl_style_file_and_module_rewards_load(tmp_path, monkeypatch):
    (reward,) = rw.load_rewards(cfg_with(f"{DATA_DIR / 'grpo' / 'rewards.py'}:even_tokens"))
    assert reward.key == "even_tokens"
    assert reward.func(prompts=["a", "a"], completions=["x", "y"], completion_ids=[[2, 4, 5], []]) == [2 / 3, 0.0]
    (tmp_path / "my_rewards_mod.py").write_text("def short(prompts, completions, **kw):\n"
                                                "    return [1.0 if len(c) < 3 else None for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (reward,) = rw.load_rewards(cfg_with("my_rewards_mod:short"))
    assert call(reward, ["ab", "abcd"]) == [1.0, None]


@pytest.mark.parametrize("spec, words", [
    ("no_such_builtin", "neither a built-in"),
    ("missing/file.py:f", "no such file"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    (f"{DATA_DIR / 'grpo' / 'rewards.py'}:nope", "has no function 'nope' (functions there: always_zero"),
    ("regex=([", "not a valid regular expression"),
    ("length_penalty=-3", "positive number of characters"),
])
def test_a_reward_that_cannot_load_is_a_config_error_naming_it(spec, words):
    with pytest.raises(ConfigError, match="grpo.rewards") as info:
        rw.load_rewards(cfg_with(spec))
    assert words in str(info.value)


def test_config_refuses_grpo_without_rewards_and_mismatched_weights():
    from overnight.config import build_config

    with pytest.raises(ConfigError, match="grpo.rewards"):
        build_config(sets=["data.method=grpo"])
    with pytest.raises(ConfigError, match="reward_weights"):
        build_config(sets=["data.method=grpo", "grpo.rewards=[exact_match, contains]", "grpo.reward_weights=[1.0]"])
    with pytest.raises(ConfigError, match="group_size"):
        build_config(sets=["data.method=grpo", "grpo.rewards=[exact_match]", "grpo.group_size=1"])
    with pytest.raises(ConfigError, match="loss_type"):
        build_config(sets=["grpo.loss_type=ppo"])


def _reward(name, func, weight=1.0):
    return rw.Reward(name, func, weight, None, name)


def test_score_weights_rewards_and_leaves_none_out_like_trl():
    a = _reward("a", lambda prompts, completions, **kw: [1.0, None, 0.0, 2.0], 0.5)
    b = _reward("b", lambda prompts, completions, **kw: [None, None, 1.0, 1.0], 2.0)
    scored = rw.score([a, b], ["p"] * 4, ["c"] * 4, [[1]] * 4, {}, lambda g: f"row{g}", 2, 2)
    assert scored.total.tolist() == [0.5, 0.0, 2.0, 3.0]
    stats = rw.stats([a, b], [scored])
    assert stats["rewards/a/mean"] == pytest.approx(1.0) and stats["rewards/b/mean"] == 1.0
    assert stats["reward"] == pytest.approx(5.5 / 4)


def test_a_raising_reward_names_the_function_and_the_row():
    def picky(prompts, completions, answer, **kw):
        if "7" in answer:
            raise ValueError("cannot score 7")
        return [0.0] * len(completions)

    reward = _reward("rewards.py:picky", picky)
    with pytest.raises(rw.RewardError) as info:
        rw.score([reward], ["p"] * 6, ["c"] * 6, [[1]] * 6, {"answer": ["1", "1", "7", "7", "2", "2"]},
                 lambda g: f"train.jsonl:{g + 10}", 3, 2)
    text = str(info.value)
    assert "rewards.py:picky raised ValueError: cannot score 7 on row train.jsonl:11" in text
    assert "never scored 0" in text


@pytest.mark.parametrize("returned, words", [(None, "not a list"), ([1.0], "returned 1 values for 2"),
                                             (["x", 1.0], "must be a finite number"),
                                             ([float("nan"), 1.0], "must be a finite number")])
def test_a_reward_returning_garbage_fails_loudly(returned, words):
    reward = _reward("bad", lambda prompts, completions, **kw: returned)
    with pytest.raises(rw.RewardError, match=words):
        rw.score([reward], ["p"] * 2, ["c"] * 2, [[1]] * 2, {}, lambda g: "f:1", 1, 2)


def test_advantages_grpo_and_dr_grpo():
    total = np.array([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    grpo = rw.advantages(total, 4, "grpo")
    std = np.std([1.0, 0.0, 0.0, 1.0], ddof=1)  # TRL: torch's (unbiased) std of the group
    assert np.allclose(grpo[:4], (np.array([1, 0, 0, 1]) - 0.5) / (std + 1e-4))
    assert np.all(grpo[4:] == 0)  # a group whose completions all score the same teaches nothing
    assert np.allclose(rw.advantages(total, 4, "dr_grpo")[:4], [0.5, -0.5, -0.5, 0.5])


# -- a reward's own failures, shown where they happen ------------------------------------------------------

USER_REWARD = '''import sys


def _parse(text):
    return int(text)  # line 5: the user's bug


def scores(prompts, completions, **kw):
    return [float(_parse(c)) for c in completions]  # line 9


def quits(prompts, completions, **kw):
    sys.exit(3)


def interrupts(prompts, completions, **kw):
    raise KeyboardInterrupt


def huge(prompts, completions, **kw):
    return [1e31 if c == "big" else 0.0 for c in completions]


def spread(prompts, completions, **kw):
    return [1e30 if c == "big" else -1e30 for c in completions]


async def async_scores(prompts, completions, **kw):
    return [float(_parse(c)) for c in completions]


def lazy_scores(prompts, completions, **kw):
    for c in completions:
        yield float(_parse(c))


def text(prompts, completions, **kw):
    return "10"
'''


def _user_reward(tmp_path, name: str, weight: float = 1.0) -> rw.Reward:
    (tmp_path / "user_rewards.py").write_text(USER_REWARD)
    (reward,) = rw.load_rewards(cfg_with(f"{tmp_path / 'user_rewards.py'}:{name}", weights=[weight]))
    return reward


def _score(reward, completions):
    return rw.score([reward], ["p"] * len(completions), completions, [[1]] * len(completions), {},
                    lambda g: f"train.jsonl:{g + 1}", len(completions) // 2, 2)


def test_a_raising_reward_shows_the_users_own_lines_not_overnights(tmp_path):
    with pytest.raises(rw.RewardError) as info:
        _score(_user_reward(tmp_path, "scores"), ["1", "2", "x", "3"])
    text, path = str(info.value), tmp_path / "user_rewards.py"
    assert "reward " in text and ":scores raised ValueError: invalid literal" in text
    assert "on row train.jsonl:2" in text  # the group that raises alone
    assert f"{path}:9 in scores: return [float(_parse(c)) for c in completions]" in text
    assert text.rstrip().endswith(f"{path}:5 in _parse: return int(text)  # line 5: the user's bug")
    assert "methods/rewards.py" not in text and "Traceback" not in text


@pytest.mark.parametrize("name, words", [("quits", "SystemExit (sys.exit(3) ends the process"),
                                         ("interrupts", "raised KeyboardInterrupt on row train.jsonl:1")])
def test_sys_exit_or_keyboard_interrupt_in_a_reward_is_that_rewards_failure(name, words, tmp_path):
    with pytest.raises(rw.RewardError) as info:
        _score(_user_reward(tmp_path, name), ["a", "b"])
    assert f":{name} raised" in str(info.value) and words in str(info.value)
    assert "user_rewards.py:" in str(info.value)


def test_rewards_beyond_1e30_or_with_no_finite_group_spread_are_refused_by_name(tmp_path):
    with pytest.raises(rw.RewardError, match=r":huge returned 1e\+31 for completion 2 of row train.jsonl:1; "
                                             r"a reward must be a finite number within \+-1e\+30"):
        _score(_user_reward(tmp_path, "huge"), ["a", "big", "c", "d"])
    assert _score(_user_reward(tmp_path, "spread"), ["big", "c"]).total.tolist() == [1e30, -1e30]
    # Each value within the limit, but weighted so the group's std overflows: no advantage can come from it.
    with pytest.raises(rw.RewardError, match=r"rewards \(.*:spread x 1e\+170\) of row train.jsonl:2 .* their "
                                             r"spread \(the group's std"):
        _score(_user_reward(tmp_path, "spread", 1e170), ["c", "d", "big", "c"])
    with pytest.raises(rw.RewardError, match="their sum or their spread"):  # the weighted sum itself overflows
        _score(_user_reward(tmp_path, "spread", 1e300), ["c", "d", "c", "d"])


def test_a_reward_file_that_exits_on_import_is_a_config_error_with_its_line(tmp_path):
    (tmp_path / "exits.py").write_text("import sys\n\nsys.exit('no GPU here')\n")
    with pytest.raises(ConfigError) as info:
        rw.load_rewards(cfg_with(f"{tmp_path / 'exits.py'}:f"))
    assert "importing" in str(info.value) and "SystemExit" in str(info.value)
    assert f"{tmp_path / 'exits.py'}:3 in <module>: sys.exit('no GPU here')" in str(info.value)


@pytest.mark.parametrize("name", ["async_scores", "lazy_scores"])
def test_async_and_generator_rewards_score_and_fail_as_the_users_own(name, tmp_path):
    """TRL's GRPOTrainer awaits an `async def` reward; a generator's body runs as its values are read. Either way
    the values are scored, and what the body raises is that reward's failure with the row and the user's lines
    (not an escaped ValueError, a 'returned coroutine', nor asyncio's frames)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would be a RuntimeWarning
        assert _score(_user_reward(tmp_path, name), ["1", "2", "3", "4"]).total.tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(rw.RewardError) as info:
        _score(_user_reward(tmp_path, name), ["1", "2", "x", "3"])
    text, path = str(info.value), tmp_path / "user_rewards.py"
    assert f":{name} raised ValueError: invalid literal" in text and "on row train.jsonl:2" in text
    assert text.rstrip().endswith(f"{path}:5 in _parse: return int(text)  # line 5: the user's bug")
    assert "asyncio" not in text and "methods/rewards.py" not in text


def test_a_reward_returning_a_string_is_named_as_such(tmp_path):
    with pytest.raises(rw.RewardError, match=r":text returned str, not a list with one number"):
        _score(_user_reward(tmp_path, "text"), ["a", "b"])
