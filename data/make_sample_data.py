"""Regenerate the bundled sample data: `python data/make_sample_data.py`.

Everything comes from a fixed seed, so running it again writes byte-identical files. The SFT set is
templated on purpose: a tiny random model picks up the answer shapes within a few dozen steps, which
makes a falling loss visible in the demo. The tiny model's tokenizer is trained on these files, so a
change here changes the tiny model too.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Egypt", "Cairo"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Cuba", "Havana"), ("Russia", "Moscow"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Australia", "Canberra"), ("Argentina", "Buenos Aires"),
]

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"),
    ("light", "dark"), ("old", "new"), ("open", "closed"), ("early", "late"), ("full", "empty"),
    ("hard", "soft"), ("high", "low"), ("long", "short"), ("rich", "poor"), ("wet", "dry"),
    ("strong", "weak"), ("loud", "quiet"), ("near", "far"), ("first", "last"), ("left", "right"),
]

WORDS = [
    "red", "blue", "green", "cat", "dog", "bird", "tree", "river", "stone", "cloud", "apple", "bread",
    "milk", "house", "road", "train", "book", "lamp", "chair", "door", "moon", "star", "sun", "rain",
]

SYSTEM = "You are a short and exact assistant."


def chat_row(rng: random.Random) -> dict:
    kind = rng.randrange(4)
    if kind == 0:
        country, capital = rng.choice(CAPITALS)
        q, a = f"What is the capital of {country}?", f"The capital of {country} is {capital}."
    elif kind == 1:
        x, y = rng.randrange(20), rng.randrange(20)
        q, a = f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."
    elif kind == 2:
        words = rng.sample(WORDS, 3)
        q, a = "Reverse the words: " + " ".join(words), " ".join(reversed(words))
    else:
        word, opposite = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            word, opposite = opposite, word
        q, a = f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if rng.random() < 0.2:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def preference_row(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        x, y = rng.randrange(20), rng.randrange(20)
        wrong = x + y + rng.choice([-3, -2, -1, 1, 2, 3])
        return {"prompt": f"What is {x} plus {y}?\n", "chosen": f"{x} plus {y} is {x + y}.",
                "rejected": f"{x} plus {y} is {wrong}."}
    (country, capital), (_, other) = rng.sample(CAPITALS, 2)
    rejected = rng.choice([f"The capital of {country} is {other}.", "I do not know."])
    return {"prompt": f"What is the capital of {country}?\n", "chosen": f"The capital of {country} is {capital}.",
            "rejected": rejected}


ANIMALS = ["cat", "dog", "fox", "horse", "bird", "owl", "mouse", "goat"]
PLACES = ["the garden", "the river", "the old house", "the forest", "the hill", "the market", "the village"]
ACTIONS = ["sat quietly", "ran fast", "looked around", "slept all day", "sang a song", "waited for rain"]
WEATHER = ["The sun was warm.", "It was cold and windy.", "Rain fell all morning.", "The sky was clear.",
           "Clouds covered the moon.", "Snow lay on the road."]


def text_row(rng: random.Random) -> dict:
    sentences = []
    for _ in range(rng.randint(2, 7)):
        r = rng.random()
        if r < 0.4:
            sentences.append(f"The {rng.choice(ANIMALS)} {rng.choice(ACTIONS)} near {rng.choice(PLACES)}.")
        elif r < 0.6:
            sentences.append(rng.choice(WEATHER))
        elif r < 0.8:
            country, capital = rng.choice(CAPITALS)
            sentences.append(f"{capital} is the capital of {country}.")
        else:
            x, y = rng.randrange(20), rng.randrange(20)
            sentences.append(f"{x} and {y} make {x + y}.")
    return {"text": " ".join(sentences)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(1234)
    write_jsonl(HERE / "train.jsonl", [chat_row(rng) for _ in range(400)])
    write_jsonl(HERE / "val.jsonl", [chat_row(rng) for _ in range(48)])
    write_jsonl(HERE / "preference" / "train.jsonl", [preference_row(rng) for _ in range(200)])
    write_jsonl(HERE / "preference" / "val.jsonl", [preference_row(rng) for _ in range(32)])
    write_jsonl(HERE / "text" / "train.jsonl", [text_row(rng) for _ in range(240)])
    write_jsonl(HERE / "text" / "val.jsonl", [text_row(rng) for _ in range(32)])


if __name__ == "__main__":
    main()
