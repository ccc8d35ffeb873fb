"""A deterministic English-like corpus for tests that need text but must not depend on `../shared/data`.

`generated_corpus(num_chars)` writes play-like dialogue from a small seeded grammar: speaker lines, sentences with
agreement, punctuation and line breaks. It is learnable (a tiny model's held-out loss falls on it), repeatable
(the same characters for the same length on every machine), and written here, so it is not anybody's text.
"""

import random


SPEAKERS = ["MARCUS", "HELENA", "OLD GARDENER", "CAPTAIN", "FIRST WATCHMAN", "LADY ROSALIND", "THE FOOL", "MESSENGER"]
SUBJECTS = ["the king", "my lord", "the queen", "this good man", "the city", "our army", "the night", "my heart",
            "your brother", "the old wall", "the river", "her father"]  # fmt: skip
VERBS = ["keeps", "loves", "fears", "remembers", "forgets", "calls", "watches", "follows", "holds", "answers",
         "carries", "forgives"]  # fmt: skip
OBJECTS = ["the crown", "a letter", "the gate", "his word", "the ring", "our name", "the fire", "a sword", "the bread",
           "her promise", "the lamp", "the ship"]  # fmt: skip
ADVERBIALS = ["tonight", "at dawn", "in the garden", "before the bell", "with a heavy hand", "for ever", "in silence",
              "by the sea", "against my will", "without a word"]  # fmt: skip
EXCLAMATIONS = ["O heavens", "Alas", "Peace", "Hark", "Away", "Good morrow", "Fie", "Come, come"]
QUESTIONS = ["Who", "Why", "Where", "When"]


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    subject, verb, obj = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
    if kind < 0.15:
        return f"{rng.choice(EXCLAMATIONS)}! {subject.capitalize()} {verb} {obj}."
    if kind < 0.3:
        return f"{rng.choice(QUESTIONS)} {verb} {obj} {rng.choice(ADVERBIALS)}?"
    if kind < 0.45:
        return f"{subject.capitalize()} {verb} {obj}, and {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
    return f"{subject.capitalize()} {verb} {obj} {rng.choice(ADVERBIALS)}."


def generated_corpus(num_chars: int, seed: int = 0) -> str:
    """At least the first `num_chars` characters of the generated play, cut to exactly `num_chars`."""
    rng = random.Random(seed)
    parts, length = [], 0
    while length < num_chars:
        lines = [_sentence(rng) for _ in range(rng.randint(1, 4))]
        speech = f"{rng.choice(SPEAKERS)}:\n" + "\n".join(lines) + "\n\n"
        parts.append(speech)
        length += len(speech)
    return "".join(parts)[:num_chars]
