"""Synthetic image-instruction sources for the offline VLM demo (``kind:
synthetic_images``). SYNTHETIC DATA: simple pictures drawn with Pillow at run time,
reproducible from (task, ``data.seed``); they test the pipeline, not a model's vision.

Tasks (``SourceSpec.task``), each a 64×64 RGB picture and one question:

- ``count_shapes``: 1–5 filled shapes; "How many shapes are in the picture?" -> ``"3"``.
- ``name_colour``: one square of a named colour; "What colour is the square?" -> ``"red"``.
- ``read_digits``: three digits in the default bitmap font; "Read the digits." -> ``"472"``.
- ``spatial``: a circle and a square side by side or stacked; "Where is the circle
  relative to the square?" -> ``"left"`` / ``"right"`` / ``"above"`` / ``"below"``.
- ``name_shape``: one circle, square or triangle; "What shape is in the picture?"
  (the demo keeps it out of training as an out-of-mixture benchmark).

Examples per source: ``max_examples`` (default :data:`DEFAULT_EXAMPLES`). The PNG files
go to the image cache (content-addressed), so a rerun writes nothing new.
"""

from __future__ import annotations

import io
import random

from merit_core.config import SourceSpec
from merit_core.data.errors import DataError, where
from merit_core.data.images import IMAGE_PLACEHOLDER, _write_addressed
from merit_core.data.types import Example

DEFAULT_EXAMPLES = 64
SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 30),
           "purple": (140, 50, 180), "orange": (240, 130, 20)}
TASKS = ("count_shapes", "name_colour", "read_digits", "spatial", "name_shape")


def _canvas():
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (SIZE, SIZE), (250, 250, 250))
    return im, ImageDraw.Draw(im)


def _box(x: int, y: int, r: int) -> tuple[int, int, int, int]:
    return (x - r, y - r, x + r, y + r)


def _count_shapes(rng: random.Random) -> tuple[object, str, str]:
    im, d = _canvas()
    n = rng.randint(1, 5)
    cells = rng.sample([(x, y) for x in (10, 32, 54) for y in (10, 32, 54)], n)
    for x, y in cells:
        colour = rng.choice(list(COLOURS.values()))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(_box(x, y, 7), fill=colour)
    return im, "How many shapes are in the picture? Answer with a number.", str(n)


def _name_colour(rng: random.Random) -> tuple[object, str, str]:
    im, d = _canvas()
    name = rng.choice(sorted(COLOURS))
    x, y = rng.randint(18, 46), rng.randint(18, 46)
    d.rectangle(_box(x, y, rng.randint(8, 14)), fill=COLOURS[name])
    return im, "What colour is the square? Answer with one word.", name


def _read_digits(rng: random.Random) -> tuple[object, str, str]:
    im, d = _canvas()
    digits = "".join(rng.choice("0123456789") for _ in range(3))
    d.text((rng.randint(4, 30), rng.randint(4, 48)), digits, fill=(0, 0, 0))
    return im, "Read the digits in the picture.", digits


def _spatial(rng: random.Random) -> tuple[object, str, str]:
    im, d = _canvas()
    where_ = rng.choice(["left", "right", "above", "below"])
    near, far, across = rng.randint(10, 22), rng.randint(42, 54), rng.randint(12, 52)
    a, b = (near, across), (far, across)
    if where_ in ("above", "below"):
        a, b = (across, near), (across, far)
    circle, square = (a, b) if where_ in ("left", "above") else (b, a)
    d.ellipse(_box(*circle, rng.randint(5, 9)), fill=rng.choice(list(COLOURS.values())))
    d.rectangle(_box(*square, rng.randint(5, 9)), fill=rng.choice(list(COLOURS.values())))
    return im, "Where is the circle relative to the square? Answer left, right, above or below.", where_


def _name_shape(rng: random.Random) -> tuple[object, str, str]:
    im, d = _canvas()
    shape = rng.choice(["circle", "square", "triangle"])
    x, y, r = rng.randint(20, 44), rng.randint(20, 44), rng.randint(9, 16)
    colour = rng.choice(list(COLOURS.values()))
    if shape == "circle":
        d.ellipse(_box(x, y, r), fill=colour)
    elif shape == "square":
        d.rectangle(_box(x, y, r), fill=colour)
    else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    return im, "What shape is in the picture? Answer circle, square or triangle.", shape


_MAKERS = {"count_shapes": _count_shapes, "name_colour": _name_colour, "read_digits": _read_digits,
           "spatial": _spatial, "name_shape": _name_shape}


def generate(spec: SourceSpec, seed: int = 0) -> list[Example]:
    """The examples of a synthetic image source: ``spec.max_examples`` (default 64)
    pictures of ``spec.task`` from ``random.Random(f"{seed}:{task}")``.

    Raises:
        DataError: unknown task (names the source and the known tasks).
    """
    task = spec.task or ""
    if task not in _MAKERS:
        raise DataError(where(spec.name) + f"unknown synthetic image task {task!r} (known: {', '.join(TASKS)})")
    rng = random.Random(f"{seed}:{task}")
    out = []
    for _ in range(spec.max_examples or DEFAULT_EXAMPLES):
        im, question, answer = _MAKERS[task](rng)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        path = _write_addressed(buf.getvalue(), ".png")
        out.append(Example(prompt=f"{IMAGE_PLACEHOLDER}\n{question}", response=answer,
                           system=spec.system_prompt, images=(str(path),)))
    return out
