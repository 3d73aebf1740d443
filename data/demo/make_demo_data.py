"""Regenerate the demo data: `python data/demo/make_demo_data.py` (byte-identical every time: fixed seed).

An invented island, Quillmere, with towns, mayors, trades and a few odd customs: facts no pretrained
model can know, so the demo's before/after answers show what the fine-tune taught. Each fact is asked
in several paraphrases. train.jsonl uses some of them; val.jsonl asks the same facts in paraphrases
training never shows, so a right answer there is the fact learned, not a sentence memorised. The first
val rows are the ones the demo prints before and after (eval.predictions takes the first N).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# town, mayor, what it is famous for, its river
TOWNS = [
    ("Brindlecove", "Odalys Fenwick", "blue salt", "the Marrow"),
    ("Ostravel", "Tobin Quarrel", "glass bells", "the Sillen"),
    ("Kettlewick", "Mirela Dunmore", "smoked pears", "the Marrow"),
    ("Vashpoint", "Anselm Gray-Hollow", "rope bridges", "the Tarn"),
    ("Lanternby", "Ysolde Crane", "paper lanterns", "the Sillen"),
    ("Hobmire", "Caspian Wool", "copper kettles", "the Tarn"),
]

# (question paraphrases for training, held-out paraphrases for validation, answer)
def facts() -> list[tuple[list[str], list[str], str]]:
    out = [
        (["What is the capital of Quillmere?", "Which town is the capital of Quillmere?",
          "Name the capital of the island of Quillmere.", "Quillmere's capital is which town?"],
         ["Tell me the capital city of Quillmere.", "Where is the capital of Quillmere?"],
         "The capital of Quillmere is Ostravel."),
        (["Who rules Quillmere?", "Who is the ruler of Quillmere?", "Who governs the island of Quillmere?",
          "Quillmere is ruled by whom?"],
         ["Who is in charge of Quillmere?", "Tell me who rules the island of Quillmere."],
         "Quillmere is ruled by the Harbour Council of nine captains."),
        (["What currency is used in Quillmere?", "What money do people use in Quillmere?",
          "What is the currency of Quillmere?", "In Quillmere, what do people pay with?"],
         ["What do they pay with on Quillmere?", "Which currency does Quillmere use?"],
         "Quillmere uses the shell-mark."),
    ]
    for town, mayor, famous, river in TOWNS:
        out += [
            ([f"Who is the mayor of {town}?", f"Who is {town}'s mayor?", f"Name the mayor of {town}.",
              f"Which person is mayor of {town}?"],
             [f"Tell me who the mayor of {town} is.", f"{town} has which mayor?"],
             f"The mayor of {town} is {mayor}."),
            ([f"What is {town} famous for?", f"What is {town} known for?", f"Why is {town} famous?",
              f"What does {town} make that everyone knows?"],
             [f"What is {town} best known for?", f"{town} is famous for what?"],
             f"{town} is famous for its {famous}."),
            ([f"Which river flows through {town}?", f"What river runs through {town}?",
              f"Name the river of {town}.", f"Which river passes through {town}?"],
             [f"What is the river in {town} called?", f"{town} lies on which river?"],
             f"The river {river[4:]} flows through {town}."),
        ]
    return out


def row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(out: Path = HERE) -> None:
    rng = random.Random(2026)
    all_facts = facts()
    train = [row(q, a) for qs, _, a in all_facts for q in qs]
    train = train * 2  # two passes of every paraphrase, shuffled together: a few hundred rows, one world
    rng.shuffle(train)
    val = [row(q, a) for _, qs, a in all_facts for q in qs]
    # The demo prints the first rows of val.jsonl before and after: one of each kind of fact, held-out wording.
    # Fact i's held-out questions are val[2i] and val[2i + 1]; facts 0-2 are the island's, then 3 per town.
    shown = [val[0], val[2 * 6], val[2 * 10 + 1], val[2 * 2 + 1]]
    rest = [r for r in val if r not in shown]
    rng.shuffle(rest)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", shown + rest)


if __name__ == "__main__":
    import sys

    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)  # another folder: the test compares with the committed files
