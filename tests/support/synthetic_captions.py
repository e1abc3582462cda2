"""Deterministic caption-like sentences: a test fixture, also used by the scoring benchmark.

Each image gets a scene (subject, action, place, details); its references and its
result describe that scene with different wording, so the scores look like a real
captioner's (CIDEr around 0.5-1), not like random text.
"""

from __future__ import annotations

import random

_SUBJECTS = [
    "man", "woman", "boy", "girl", "dog", "cat", "horse", "bird", "group of people", "child",
    "skateboarder", "surfer", "player", "cow", "giraffe", "elephant", "train", "bus", "plane", "truck",
]
_ADJECTIVES = ["young", "old", "small", "large", "brown", "white", "black", "red", "happy", "tall"]
_ACTIONS = [
    "is standing", "is sitting", "is walking", "is riding a bike", "is playing with a ball",
    "is eating", "is looking at the camera", "is running", "is holding an umbrella", "is parked",
    "is flying a kite", "is jumping", "is laying down", "is drinking water", "is crossing the street",
]
_PLACES = [
    "in a field", "on the beach", "in the kitchen", "on a city street", "next to a building",
    "in the snow", "near the water", "in a living room", "on a grassy hill", "at the park",
    "on the sidewalk", "in front of a house", "under a tree", "on a wooden table", "at the station",
]
_DETAILS = [
    "", "", "on a sunny day", "at night", "with a friend", "while people watch", "during the rain",
    "in the afternoon", "next to a red car", "with trees in the background",
]
_DETERMINERS = ["a", "the", "one"]


def _sentence(rng: random.Random, subject: str, adjective: str, action: str, place: str, detail: str) -> str:
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.6:
        words.append(adjective)
    words.append(subject)
    # paraphrase sometimes: change the action or the place, as annotators do
    words.append(action if rng.random() < 0.7 else rng.choice(_ACTIONS))
    words.append(place if rng.random() < 0.75 else rng.choice(_PLACES))
    if detail and rng.random() < 0.5:
        words.append(detail)
    text = " ".join(words)
    text = text[0].upper() + text[1:]
    return text + rng.choice([".", ".", "", " ."])


def synthetic_caption_set(
    images: int, references: int = 5, *, seed: int = 0
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(results, references) for `images` images, keyed by decimal COCO-like image ids."""
    rng = random.Random(seed)
    results: dict[str, str] = {}
    refs: dict[str, list[str]] = {}
    for i in range(images):
        key = str(100000 + i * 7)
        scene = (
            rng.choice(_SUBJECTS), rng.choice(_ADJECTIVES), rng.choice(_ACTIONS),
            rng.choice(_PLACES), rng.choice(_DETAILS),
        )
        refs[key] = [_sentence(rng, *scene) for _ in range(references)]
        # A captioner gets the scene partly wrong: another subject or place now and then.
        seen = list(scene)
        if rng.random() < 0.35:
            seen[0] = rng.choice(_SUBJECTS)
        if rng.random() < 0.5:
            seen[2] = rng.choice(_ACTIONS)
        if rng.random() < 0.5:
            seen[3] = rng.choice(_PLACES)
        results[key] = _sentence(rng, *seen).lower().rstrip(" .")
    return results, refs
