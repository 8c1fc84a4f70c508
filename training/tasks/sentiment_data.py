"""Deterministic short customer reviews with gold sentiment labels, for the demo task.

Two vocabularies: ``train`` draws from one set of domains, subjects, adjectives, sentence
templates and closings; ``heldout`` from a disjoint set, so a score on held-out rows measures
generalisation, not memorised phrasing. Labels are skewed like real logs (more positive than
neutral) so curation's balancing has work to do.
"""

from __future__ import annotations

import random

LABELS = ("positive", "negative", "neutral")
_LABEL_WEIGHTS = (0.45, 0.35, 0.20)

_VOCABULARY = {
    "train": {
        "subjects": {
            "hotel": ["room", "lobby", "bed", "breakfast buffet"],
            "restaurant": ["pasta", "soup", "service", "dessert"],
            "electronics": ["headphones", "laptop", "charger", "keyboard"],
            "clothing": ["jacket", "shoes", "scarf"],
            "airline": ["flight", "seat", "boarding process"],
            "software": ["app", "update", "dashboard"],
            "furniture": ["chair", "desk", "sofa"],
            "grocery": ["delivery", "bread", "fruit box"],
            "car rental": ["rental car", "pickup counter"],
            "gym": ["gym", "yoga class", "locker room"],
        },
        "adjectives": {
            "positive": ["great", "excellent", "fantastic", "lovely", "perfect"],
            "negative": ["terrible", "awful", "broken", "disappointing", "horrible"],
            "neutral": ["okay", "average", "as described", "standard", "fine"],
        },
        "intensifiers": ["really", "very", "quite"],
        "templates": [
            "The {subject} was {intensifier} {adjective}.",
            "{Subject} was {adjective}. {closing}",
            "I found the {subject} {intensifier} {adjective}. {closing}",
            "Honestly, the {subject} is {adjective}.",
        ],
        "closings": {
            "positive": ["Would buy again.", "Highly recommend.", "Made my day."],
            "negative": ["Never again.", "I want a refund.", "Avoid it."],
            "neutral": ["Nothing more to say.", "It does the job.", "Expected that."],
        },
    },
    "heldout": {
        "subjects": {
            "spa": ["massage", "sauna", "facial"],
            "bookstore": ["novel", "poetry section", "cashier"],
            "plumbing": ["plumber", "pipe repair", "invoice"],
            "bike shop": ["bicycle", "tune-up", "helmet"],
            "theatre": ["play", "matinee", "balcony view"],
            "camera": ["lens", "tripod", "autofocus"],
            "pharmacy": ["pharmacist", "prescription pickup"],
            "pet store": ["aquarium", "dog food", "groomer"],
            "bakery": ["croissant", "sourdough", "birthday cake"],
        },
        "adjectives": {
            "positive": ["superb", "delightful", "flawless", "terrific", "stellar"],
            "negative": ["dreadful", "shoddy", "abysmal", "faulty", "atrocious"],
            "neutral": ["adequate", "unremarkable", "middling", "ordinary", "acceptable"],
        },
        "intensifiers": ["truly", "remarkably", "rather"],
        "templates": [
            "My verdict on the {subject}: {adjective}.",
            "We tried the {subject} last week and it felt {intensifier} {adjective}. {closing}",
            "{closing} The {subject} turned out {adjective}.",
        ],
        "closings": {
            "positive": ["Telling all my friends.", "Worth every penny.", "Five stars from me."],
            "negative": ["Returning it tomorrow.", "Complete letdown.", "Save your cash."],
            "neutral": ["No strong feelings.", "Neither thrilled nor upset.", "Take it or leave it."],
        },
    },
}

SPLITS = tuple(_VOCABULARY)


def generate(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` reviews of ``split`` (``train`` or ``heldout``), each ``{id, review, label, domain}``."""
    if split not in _VOCABULARY:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    vocabulary = _VOCABULARY[split]
    # A separate stream per split, so growing one split never changes the other.
    rng = random.Random(f"{seed}:{split}")
    rows = []
    for index in range(n):
        label = rng.choices(LABELS, weights=_LABEL_WEIGHTS)[0]
        domain = rng.choice(sorted(vocabulary["subjects"]))
        subject = rng.choice(vocabulary["subjects"][domain])
        review = rng.choice(vocabulary["templates"]).format(
            subject=subject,
            Subject=subject[0].upper() + subject[1:],
            adjective=rng.choice(vocabulary["adjectives"][label]),
            intensifier=rng.choice(vocabulary["intensifiers"]),
            closing=rng.choice(vocabulary["closings"][label]),
        )
        rows.append({"id": f"{split}-{seed}-{index}", "review": review.strip(), "label": label, "domain": domain})
    return rows
