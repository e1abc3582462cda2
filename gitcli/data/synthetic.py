"""A seeded synthetic captioning/VQA set: rendered scenes of coloured shapes.

Each scene has one to three shapes, each in its own column (left, middle, right), of a
colour and a kind. Captions describe the shapes from left to right; questions ask about
colour, shape, count, position and presence, with one-word answers. Everything follows
from `(seed, index)`, so a set of any size is reproducible without files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from gitcli.config import TINY_VOCABULARY

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (230, 210, 40), "purple": (140, 60, 180), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
COLUMNS = ("left", "middle", "right")
NUMBERS = ("zero", "one", "two", "three")
IMAGE_SIZE = 64
BACKGROUND = (60, 60, 60)


@dataclass
class Shape:
    color: str
    kind: str
    column: int  # 0 left, 1 middle, 2 right


@dataclass
class Scene:
    shapes: list[Shape]
    image: Image.Image
    captions: list[str]  # references; the first is the canonical one
    qa: list[tuple[str, str]] = field(default_factory=list)  # (question, answer)


def _phrase(s: Shape) -> str:
    where = "in the middle" if s.column == 1 else f"on the {COLUMNS[s.column]}"
    return f"a {s.color} {s.kind} {where}"


def _captions(shapes: list[Shape]) -> list[str]:
    ordered = sorted(shapes, key=lambda s: s.column)
    canonical = " and ".join(_phrase(s) for s in ordered)
    if len(ordered) == 1:
        s = ordered[0]
        where = "in the middle" if s.column == 1 else f"on the {COLUMNS[s.column]}"
        return [canonical, f"one {s.color} {s.kind} {where}"]
    count = NUMBERS[len(ordered)]
    listing = " and ".join(f"a {s.color} {s.kind}" for s in ordered)
    return [canonical, f"{count} shapes {listing}"]


def _questions(shapes: list[Shape], rng: random.Random) -> list[tuple[str, str]]:
    qa = [("how many shapes are there?", NUMBERS[len(shapes)])]
    for s in shapes:
        if sum(t.kind == s.kind for t in shapes) == 1:
            qa.append((f"what color is the {s.kind}?", s.color))
        qa.append((f"what shape is on the {COLUMNS[s.column]}?", s.kind))
        qa.append((f"where is the {s.color} {s.kind}?", COLUMNS[s.column]))
    # presence: one true, one false question
    s = rng.choice(shapes)
    qa.append((f"is there a {s.color} {s.kind}?", "yes"))
    while True:
        color, kind = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if not any(t.color == color and t.kind == kind for t in shapes):
            qa.append((f"is there a {color} {kind}?", "no"))
            break
    return qa


def _draw(shapes: list[Shape], rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = IMAGE_SIZE / 3
    for s in shapes:
        r = rng.uniform(cell * 0.28, cell * 0.45)
        cx = cell * s.column + cell / 2 + rng.uniform(-cell * 0.05, cell * 0.05)
        cy = rng.uniform(r + 2, IMAGE_SIZE - r - 2)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def make_scene(seed: int, index: int) -> Scene:
    rng = random.Random(f"{seed}:{index}")
    n = rng.randint(1, 3)
    columns = sorted(rng.sample(range(3), n))
    shapes = [Shape(rng.choice(list(COLORS)), rng.choice(SHAPES), c) for c in columns]
    image = _draw(shapes, rng)
    return Scene(shapes, image, _captions(shapes), _questions(shapes, rng))


class SyntheticSet:
    """`size` scenes from `seed`; scene i is the same whenever it is asked for."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Scene:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return make_scene(self.seed, index)


def vocabulary() -> list[str]:
    """Every word a synthetic caption, question or answer can contain: the tiny preset's
    vocabulary (gitcli.config.TINY_VOCABULARY), which the scenes' words must stay within."""
    return sorted(TINY_VOCABULARY)
