"""Regenerate the RLHF walkthrough's data: `python data/rlhf/make_rlhf_data.py` (byte-identical every time: fixed seed).

The demo's invented island (data/demo), asked the same questions, now for the two RLHF stages after the SFT:
  preference/   reward model rows (`--method reward`): the right fact chosen over the same sentence naming a wrong
                one (another town's mayor, another river, ...), over one naming a value from nowhere, over the
                answer cut short, over the right name with a made-up tail, and over the right answer to another
                question (what a sampling policy invents, drops or drifts into, so GRPO cannot win by it; a first
                version with swapped facts only was exploited by GRPO within 40 steps), and over each of the SFT
                policy's own wrong answers in policy_answers.jsonl (sample_policy_answers.py; a reward model without
                them scored the policy's samples by their form), as conversations (TRL's conversational preference
                rows, rendered by the chat template: the text a GRPO reward model is later handed). train.jsonl asks
                the demo's training paraphrases, val.jsonl its held-out ones, so the pairwise accuracy measured on
                val is on wording the reward model never saw.
  grpo/         policy prompts (`--method grpo`): the same questions as a user turn, with `answer` the fact's key
                words, which the rule-based check (the built-in `contains` reward) looks for in a completion.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "demo"))
from make_demo_data import TOWNS, facts, write_jsonl  # noqa: E402  (the demo's island, one definition)

RULERS = ["the Harbour Council of nine captains", "the Salt Queen", "a governor sent from the mainland",
          "the Lantern Guild"]
CURRENCIES = ["shell-mark", "copper ring", "pearl-crown", "salt-penny"]
# Values from nowhere on the island, of each kind: what a policy invents when it does not know (a reward model that
# saw only the island's own values mixed up would have no opinion on them, and GRPO would learn to invent).
INVENTED = {
    "town": ["Kermen", "Port Sally", "Dunwater", "Greystone", "Ashford"],
    "ruler": ["a king called Harold", "the people", "a mayor", "the Council of Elders"],
    "currency": ["euro", "pound sterling", "dollar", "gold coin"],
    "person": ["Elena Martinez", "John Smith", "Tobin K. Ostravel", "Maria Lopez", "Captain Reed"],
    "thing": ["plum pudding", "lemons", "fishing boats", "red bricks", "famous", "cheese"],
    "river": ["Thames", "Kermen", "Silver", "Ostravel"],
}


def kinds() -> list[tuple[str, list[str], str, str]]:
    """For each fact of make_demo_data.facts(), in its order: (answer template with {} for the key words, every
    value of that kind on the island with the right one first, the key words `contains` checks, the kind)."""
    towns = [t for t, _, _, _ in TOWNS]
    out = [("The capital of Quillmere is {}.", ["Ostravel"] + [t for t in towns if t != "Ostravel"], "Ostravel",
            "town"),
           ("Quillmere is ruled by {}.", RULERS, "Harbour Council", "ruler"),
           ("Quillmere uses the {}.", CURRENCIES, "shell-mark", "currency")]
    mayors, famous, rivers = ([row[i] for row in TOWNS] for i in (1, 2, 3))
    for town, mayor, thing, river in TOWNS:
        out += [(f"The mayor of {town} is {{}}.", [mayor] + [m for m in mayors if m != mayor], mayor, "person"),
                (f"{town} is famous for its {{}}.", [thing] + [f for f in famous if f != thing], thing, "thing"),
                (f"The river {{}} flows through {town}.",
                 [river[4:]] + sorted({r[4:] for r in rivers} - {river[4:]}), river[4:], "river")]
    return out


# Tails a sampling policy grows on a right name ("Caspian Woolley-Pearles", "Ostravel-Arrow-Sill"): the name is no
# longer the fact, and a reward model that never saw one scored them above the fact itself.
TAILS = ["-Pearles", "ley-Mackenzie", "-Arrow-Sill", " Hollow-Levesque", "-en-Sillen", " fingers", "-Montrac-R",
         " Gloucester flows", "s shell-milled"]


def wrong_answers(rng: random.Random, template: str, values: list[str], kind: str, answer: str,
                  elsewhere: str) -> list[str]:
    """Five ways to be wrong: each of the island's other values of the kind (all of them: with one drawn at random,
    the reward model never saw some towns' values as wrong for a town, rated "Vashpoint is famous for its paper
    lanterns" (Lanternby's) above the truth, and GRPO collapsed every town onto that one value), a value from nowhere,
    the answer cut short (every word may be right, but it does not name the fact), the right value with a made-up
    tail, and the right answer to another question (``elsewhere``: another town's fact of the same kind, or another
    island fact)."""
    words = answer.rstrip(".").split()
    cut = " ".join(words[:max(1, len(words) // 2)]) + "."
    return [*(template.format(value) for value in values[1:]), template.format(rng.choice(INVENTED[kind])), cut,
            template.format(values[0] + rng.choice(TAILS)), elsewhere]


def pair(question: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def policy_pairs(right_answer_of: dict[str, str]) -> list[dict]:
    """The island's right answer over each distinct answer of the SFT policy's own (policy_answers.jsonl, written
    by sample_policy_answers.py) that does not name the right fact: the wrong answers GRPO's samples actually are,
    in their own words and form, which the templated ones above do not cover."""
    path = HERE / "policy_answers.jsonl"
    if not path.is_file():
        return []
    seen, out = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        key = (row["question"], row["completion"])
        if row["right"] or not row["completion"] or key in seen:
            continue
        seen.add(key)
        out.append(pair(row["question"], right_answer_of[row["question"]], row["completion"]))
    return out


def main(out: Path = HERE) -> None:
    rng = random.Random(2027)
    pref_train, pref_val, grpo_train, grpo_val = [], [], [], []
    right_answer_of: dict[str, str] = {}
    all_facts, all_kinds = facts(), kinds()
    answers = [a for _, _, a in all_facts]
    for i, ((train_qs, val_qs, answer), (template, values, key, kind)) in enumerate(zip(all_facts, all_kinds)):
        assert template.format(values[0]) == answer, (template, answer)  # the demo's answer, word for word
        # facts 0-2 are the island's, then each town's mayor, famous thing, river: the same kind 3 facts apart
        same_kind = [j for j in range(3, len(answers)) if (j - i) % 3 == 0 and j != i] if i >= 3 else \
            [j for j in range(3) if j != i]
        for q in train_qs:
            right_answer_of[q] = answer
            for wrong in wrong_answers(rng, template, values, kind, answer, answers[rng.choice(same_kind)]):
                pref_train.append(pair(q, answer, wrong))
            grpo_train.append({"messages": [{"role": "user", "content": q}], "answer": key})
        for q in val_qs:
            for wrong in rng.sample(wrong_answers(rng, template, values, kind, answer,
                                                  answers[rng.choice(same_kind)]), 2):
                pref_val.append(pair(q, answer, wrong))
            grpo_val.append({"messages": [{"role": "user", "content": q}], "answer": key})
    for rows in (pref_train, pref_val, grpo_train, grpo_val):
        rng.shuffle(rows)
    # the policy's own wrong answers mixed in by their own draw, so the other files stay as they were without them
    pref_train += policy_pairs(right_answer_of)
    random.Random(2028).shuffle(pref_train)
    for folder, train, val in (("preference", pref_train, pref_val), ("grpo", grpo_train, grpo_val)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        write_jsonl(out / folder / "train.jsonl", train)
        write_jsonl(out / folder / "val.jsonl", val)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)  # another folder: the test compares with the committed files
