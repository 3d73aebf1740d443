"""Reward functions in TRL's shape, used by the grpo tests and usable as examples.

    grpo.rewards: [data/grpo/rewards.py:even_tokens]
"""


def even_tokens(prompts, completions, completion_ids, **kwargs):
    """The share of completion tokens with an even id: about 0.5 for a random model, and learnable by
    moving probability towards half the vocabulary (the tests' reward a tiny random model can raise)."""
    return [sum(1 for t in ids if t % 2 == 0) / len(ids) if ids else 0.0 for ids in completion_ids]


def always_zero(prompts, completions, **kwargs):
    return [0.0 for _ in completions]


def fails_on_seven(prompts, completions, answer, **kwargs):
    """Raises on the rows whose answer is 7, to show how a failing reward stops a run."""
    out = []
    for a in answer:
        if a == "7":
            raise ValueError("cannot score answer 7")
        out.append(0.0)
    return out


def correct(prompts, completions, answer, **kwargs):
    """1.0 when the completion's first number is the answer (TRL-style accuracy reward)."""
    import re

    out = []
    for completion, expected in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        found = re.search(r"-?\d+", text)
        out.append(1.0 if found and found.group(0) == str(expected) else 0.0)
    return out


def starts_with_answer(prompts, completions, answer, **kwargs):
    """1.0 when the reply opens with the answer (case and surrounding punctuation ignored): a verifiable habit a
    chat model does not have at first ("The capital of France is Paris.") and GRPO can teach it."""
    out = []
    for completion, expected in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        out.append(1.0 if text.strip().strip("\"'*").lower().startswith(str(expected).lower()) else 0.0)
    return out


def mentions_answer(prompts, completions, answer, **kwargs):
    """1.0 when the reply names the answer anywhere (case ignored)."""
    out = []
    for completion, expected in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        out.append(1.0 if str(expected).lower() in text.lower() else 0.0)
    return out
