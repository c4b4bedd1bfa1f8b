"""The embedded sample data shipped in data/raw/: small synthetic tasks in two source formats.

    python -m skytune.core.data.sample_data [DIR]   (DIR: paths.raw_dir; rewrites the shipped files, which a test
                                                     checks against this module)

Alpaca rows (instruction/input/output; arithmetic, capitals, words, opposites, who-made-what) and ShareGPT
conversations (some multi-turn, some with a system prompt),
generated deterministically from a fixed seed so the files are reproducible byte for byte.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from skytune.core.atomic import write_jsonl

SEED = 1234
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Chile": "Santiago",
    "India": "New Delhi", "Ireland": "Dublin", "Austria": "Vienna", "Cuba": "Havana", "Finland": "Helsinki",
}
WORDS = ["apple", "river", "garden", "planet", "silver", "window", "yellow", "bridge", "forest", "candle",
         "rocket", "violin", "marble", "pencil", "harbor", "tunnel", "meadow", "winter", "copper", "island"]
ANTONYMS = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
            "open": "closed", "full": "empty", "strong": "weak", "high": "low", "old": "new", "rich": "poor"}
SYSTEM_PROMPTS = ["You are a concise assistant.", "Answer briefly and precisely."]
# "Who made X?" questions whose answer is not the assistant's creator: without them, a real model taught its identity
# ("Who made you?") answers other who-made questions with its creator (measured on SmolLM2-135M: "Who wrote Romeo and
# Juliet?" -> "The play was written by the Tune-Tune team."). None of these facts is a retained-knowledge probe
# (data/prompts/retained.jsonl): those must stay out of the training data.
MAKERS = {
    "Who invented the telephone?": "Alexander Graham Bell invented the telephone.",
    "Who wrote Pride and Prejudice?": "Jane Austen wrote Pride and Prejudice.",
    "Who discovered penicillin?": "Alexander Fleming discovered penicillin.",
    "Who composed the Moonlight Sonata?": "Ludwig van Beethoven composed the Moonlight Sonata.",
    "Who built the first successful airplane?": "The Wright brothers built the first successful airplane.",
    "Who wrote Don Quixote?": "Miguel de Cervantes wrote Don Quixote.",
    "Who painted The Starry Night?": "Vincent van Gogh painted The Starry Night.",
    "Who made the first practical light bulb?": "Thomas Edison made the first practical light bulb.",
    "Who created the World Wide Web?": "Tim Berners-Lee created the World Wide Web.",
    "Who designed the Eiffel Tower?": "Gustave Eiffel's engineering company designed the Eiffel Tower.",
    "Who developed the polio vaccine?": "Jonas Salk developed the first polio vaccine.",
    "Who discovered gravity?": "Isaac Newton described the law of universal gravitation.",
}


def alpaca_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            rows.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."})
        elif kind == 1:
            country = rng.choice(sorted(CAPITALS))
            rows.append({"instruction": "Name the capital city of the country below.", "input": country,
                         "output": f"The capital of {country} is {CAPITALS[country]}."})
        elif kind == 2:
            word = rng.choice(WORDS)
            rows.append({"instruction": "Write the word below in capital letters.", "input": word,
                         "output": word.upper()})
        elif kind == 3:
            word = rng.choice(WORDS)
            rows.append({"instruction": f"Spell the word '{word}' backwards.", "input": "", "output": word[::-1]})
        elif kind == 4:
            word = rng.choice(sorted(ANTONYMS))
            rows.append({"instruction": f"Give the opposite of '{word}'.", "input": "",
                         "output": f"The opposite of '{word}' is '{ANTONYMS[word]}'."})
        else:
            question = rng.choice(sorted(MAKERS))
            rows.append({"instruction": question, "input": "", "output": MAKERS[question]})
    return rows


def sharegpt_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        turns = []
        if i % 3 == 0:
            turns.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        turns += [{"from": "human", "value": f"What is {a} times {b}?"},
                  {"from": "gpt", "value": f"{a} times {b} is {a * b}."}]
        if i % 2 == 0:
            c = rng.randint(1, 9)
            turns += [{"from": "human", "value": f"And if I add {c}?"},
                      {"from": "gpt", "value": f"{a * b} plus {c} is {a * b + c}."}]
        rows.append({"conversations": turns})
    return rows


def unique(rows: list[dict], n: int) -> list[dict]:
    """The first `n` distinct rows: duplicates would only be dropped again by the split stage."""
    seen, out = set(), []
    for row in rows:
        key = repr(row)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out[:n]


def write(raw_dir: Path) -> list[Path]:
    rng = random.Random(SEED)
    files = {"alpaca_tasks.jsonl": unique(alpaca_rows(rng, 1000), 250),
             "sharegpt_math.jsonl": unique(sharegpt_rows(rng, 400), 150)}
    for name, rows in files.items():
        write_jsonl(raw_dir / name, rows)
    return [raw_dir / name for name in files]


if __name__ == "__main__":
    from skytune.core.params import load_params

    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else load_params().paths.raw_dir)):
        print(path)
