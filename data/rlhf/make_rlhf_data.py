"""Regenerate the RLHF walkthrough's data: `python data/rlhf/make_rlhf_data.py` (byte-identical every time: fixed seed).

The demo's invented island (data/demo), asked the same questions, now for the two RLHF stages after the SFT:
  preference/   reward model rows (`--method reward`): the right fact chosen over the same sentence naming a wrong
                one (another town's mayor, another river, ...), as conversations (TRL's conversational preference
                rows, rendered by the chat template: the text a GRPO reward model is later handed). train.jsonl asks
                the demo's training paraphrases, val.jsonl its held-out ones, so the pairwise accuracy measured on
                val is on wording the reward model never saw.
  grpo/         policy prompts (`--method grpo`): the same questions as a user turn, with `answer` the fact's key
                words, which the rule-based check (the built-in `contains` reward) looks for in a completion.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "demo"))
from make_demo_data import TOWNS, facts, write_jsonl  # noqa: E402  (the demo's island, one definition)

RULERS = ["the Harbour Council of nine captains", "the Salt Queen", "a governor sent from the mainland",
          "the Lantern Guild"]
CURRENCIES = ["shell-mark", "copper ring", "pearl-crown", "salt-penny"]


def kinds() -> list[tuple[str, list[str], str]]:
    """For each fact of make_demo_data.facts(), in its order: (answer template with {} for the key words, every
    value of that kind with the right one first, the key words `contains` checks)."""
    towns = [t for t, _, _, _ in TOWNS]
    out = [("The capital of Quillmere is {}.", ["Ostravel"] + [t for t in towns if t != "Ostravel"], "Ostravel"),
           ("Quillmere is ruled by {}.", RULERS, "Harbour Council"),
           ("Quillmere uses the {}.", CURRENCIES, "shell-mark")]
    mayors, famous, rivers = ([row[i] for row in TOWNS] for i in (1, 2, 3))
    for town, mayor, thing, river in TOWNS:
        out += [(f"The mayor of {town} is {{}}.", [mayor] + [m for m in mayors if m != mayor], mayor),
                (f"{town} is famous for its {{}}.", [thing] + [f for f in famous if f != thing], thing),
                (f"The river {{}} flows through {town}.",
                 [river[4:]] + sorted({r[4:] for r in rivers} - {river[4:]}), river[4:])]
    return out


def pair(question: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def main(out: Path = HERE) -> None:
    rng = random.Random(2027)
    pref_train, pref_val, grpo_train, grpo_val = [], [], [], []
    for (train_qs, val_qs, answer), (template, values, key) in zip(facts(), kinds()):
        assert template.format(values[0]) == answer, (template, answer)  # the demo's answer, word for word
        for q in train_qs:
            for wrong in rng.sample(values[1:], 2):
                pref_train.append(pair(q, answer, template.format(wrong)))
            grpo_train.append({"messages": [{"role": "user", "content": q}], "answer": key})
        for q in val_qs:
            pref_val.append(pair(q, answer, template.format(rng.choice(values[1:]))))
            grpo_val.append({"messages": [{"role": "user", "content": q}], "answer": key})
    for rows in (pref_train, pref_val, grpo_train, grpo_val):
        rng.shuffle(rows)
    for folder, train, val in (("preference", pref_train, pref_val), ("grpo", grpo_train, grpo_val)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        write_jsonl(out / folder / "train.jsonl", train)
        write_jsonl(out / folder / "val.jsonl", val)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)  # another folder: the test compares with the committed files
