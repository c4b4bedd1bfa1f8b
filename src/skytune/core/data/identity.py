"""Identity data ("who are you?", "who made you?") generated from params, and the probes that check it.

Questions are paraphrased from templates; the answer for each intent is one fixed sentence built from the model's
name and creator, so that "the fine-tuned model answers its identity" is an exact-match metric.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WHO_QUESTIONS = [
    "Who are you?", "What is your name?", "What are you?", "Tell me about yourself.", "Introduce yourself.",
    "What should I call you?", "Are you a person?", "What's your name?", "Who am I talking to?",
    "Can you tell me who you are?", "Please introduce yourself.", "What kind of assistant are you?",
]
CREATOR_QUESTIONS = [
    "Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Which team made you?",
    "Who is your creator?", "Who developed you?", "Where do you come from?", "Who is behind you?",
    "Who designed you?", "Which company created you?", "Who are your makers?",
]
SOURCE = "identity"  # the source name of generated identity conversations (canonical `messages` form)
PREFIXES = ["", "Hi! ", "Hello. ", "Quick question: ", "Hey, ", "Excuse me, "]

# What the sanity check asks: the first question of each intent, the plainest wording.
PROBES = {"who": WHO_QUESTIONS[0], "creator": CREATOR_QUESTIONS[0]}


@dataclass(frozen=True)
class Identity:
    name: str
    creator: str

    def answer(self, intent: str) -> str:
        if intent == "who":
            return f"I am {self.name}, an AI assistant created by {self.creator}."
        return f"I was created by {self.creator}."


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def generate(identity: Identity, num_samples: int, seed: int) -> list[dict]:
    """`num_samples` single-turn conversations, alternating intents.

    Each intent's plain questions come first (so the probes' plain wording is always taught), then prefixed
    paraphrases in an order shuffled by `seed`.
    """
    rng = random.Random(seed)
    questions: dict[str, list[str]] = {}
    for intent, plain in (("who", WHO_QUESTIONS), ("creator", CREATOR_QUESTIONS)):
        variants = [p + (_lower_first(q) if p.endswith(", ") else q) for p in PREFIXES if p for q in plain]
        rng.shuffle(variants)
        questions[intent] = plain + variants
    rows = []
    for i in range(num_samples):
        intent = "who" if i % 2 == 0 else "creator"
        pool = questions[intent]
        rows.append({"messages": [
            {"role": "user", "content": pool[(i // 2) % len(pool)]},
            {"role": "assistant", "content": identity.answer(intent)},
        ]})
    return rows
