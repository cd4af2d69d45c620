"""dash-shapes: seeded scenes of coloured shapes and one-word questions about them.

A scene is 1 to 3 shapes (circle, square, triangle; red, green, blue, yellow; each colour-shape pair at most once)
in distinct cells of a 3x3 grid on a 64x64 image. Questions of four kinds:

- ``colour``: "what colour is the circle?" (asked only of a shape that occurs once);
- ``count``: "how many red shapes are there?" / "how many circles are there?" (0 to 3);
- ``exist``: "is there a blue triangle?" (yes / no, balanced);
- ``position``: "where is the red circle relative to the blue square?" (left / right / above / below; the two
  shapes share a grid row or column, so exactly one answer holds).

Sample ``i`` of a split is a pure function of ``(split seed, i)``; the splits use disjoint seed ranges and the
training stream skips any (image, question) pair of the validation or test split.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TypeVar

from PIL import Image, ImageChops, ImageDraw

from dash_vlm.resources import bundled

IMAGE_SIZE = 64
GRID = 3
BACKGROUND = (245, 245, 245)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
KINDS = ("colour", "count", "exist", "position")
SPLIT_SEEDS = {"train": 0, "validation": 1_000_000_000, "test": 2_000_000_000}
TEST_SIZE = 1000
ANSWERS = (*COLOURS, "0", "1", "2", "3", "yes", "no", "left", "right", "above", "below")
WORDS = sorted(
    {
        *"what colour is the how many shapes are there where relative to".split(),
        *COLOURS,
        *SHAPES,
        *(f"{shape}s" for shape in SHAPES),
        *"yes no left right above below 0 1 2 3 4 ?".split(),
    }
)
TEST_FILE = bundled("tasks") / "dash_shapes" / "test.parquet"
T = TypeVar("T")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    row: int
    column: int
    size: int  # side of the bounding box in pixels
    dx: int  # jitter of the centre inside the grid cell
    dy: int


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    answer: str
    kind: str
    scene: tuple[Shape, ...] = ()  # the shapes drawn, when the sample was generated rather than read from a file


def random_scene(rng: random.Random) -> list[Shape]:
    pairs = rng.sample([(shape, colour) for shape in SHAPES for colour in COLOURS], rng.randint(1, 3))
    cells = rng.sample([(row, column) for row in range(GRID) for column in range(GRID)], len(pairs))
    return [
        Shape(kind, colour, row, column, rng.randint(14, 19), rng.randint(-1, 1), rng.randint(-1, 1))
        for (kind, colour), (row, column) in zip(pairs, cells, strict=True)
    ]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, colour: str, cx: float, cy: float, size: int) -> None:
    """One shape of bounding-box side ``size`` centred at ``(cx, cy)``."""
    half = size / 2
    box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    fill = COLOURS[colour]
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (round(cx), box[1])], fill=fill)


def render(scene: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = IMAGE_SIZE / GRID
    for shape in scene:
        cx, cy = (shape.column + 0.5) * cell + shape.dx, (shape.row + 0.5) * cell + shape.dy
        draw_shape(draw, shape.kind, shape.colour, cx, cy, shape.size)
    return image


def ask(scene: list[Shape], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """A question of ``kind`` about ``scene`` and its answer, or ``None`` if the scene has none of that kind."""
    if kind == "colour":
        unique = [s for s in scene if sum(other.kind == s.kind for other in scene) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        return f"what colour is the {shape.kind} ?", shape.colour
    if kind == "count":
        if rng.random() < 0.5:
            colour = rng.choice(list(COLOURS))
            return f"how many {colour} shapes are there ?", str(sum(s.colour == colour for s in scene))
        shape_kind = rng.choice(SHAPES)
        return f"how many {shape_kind}s are there ?", str(sum(s.kind == shape_kind for s in scene))
    if kind == "exist":
        present = {(s.colour, s.kind) for s in scene}
        if rng.random() < 0.5:
            colour, shape_kind = rng.choice(sorted(present))
        else:
            absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
            colour, shape_kind = rng.choice(absent)
        return f"is there a {colour} {shape_kind} ?", "yes" if (colour, shape_kind) in present else "no"
    pairs = [(a, b) for a in scene for b in scene if a is not b and (a.row == b.row or a.column == b.column)]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    if a.row == b.row:
        answer = "left" if a.column < b.column else "right"
    else:
        answer = "above" if a.row < b.row else "below"
    return f"where is the {a.colour} {a.kind} relative to the {b.colour} {b.kind} ?", answer


def make_sample(split: str, index: int) -> Sample:
    """Sample ``index`` of ``split``: kinds cycle so that every kind is equally frequent."""
    rng = random.Random(SPLIT_SEEDS[split] + index)
    kind = KINDS[index % len(KINDS)]
    while True:
        scene = random_scene(rng)
        qa = ask(scene, kind, rng)
        if qa is not None:
            return Sample(render(scene), qa[0], qa[1], kind, tuple(scene))


def training_scene(index: int, exclude: set[str] = frozenset()) -> tuple[Image.Image, list[tuple[str, str]]]:
    """Training scene ``index`` and one question of every kind it allows (in random order), with their answers,
    minus any (image, question) pair whose key is in ``exclude`` (``held_out_keys()``)."""
    rng = random.Random(SPLIT_SEEDS["train"] + index)
    scene = random_scene(rng)
    image = render(scene)
    questions = [ask(scene, kind, rng) for kind in rng.sample(KINDS, len(KINDS))]
    return image, [qa for qa in questions if qa is not None and sample_key(image, qa[0]) not in exclude]


def shape_mask(shape: Shape) -> Image.Image:
    """Where ``shape`` is drawn, as a 1-bit image of the scene's size."""
    drawn = render([shape]).convert("RGB")
    background = Image.new("RGB", drawn.size, BACKGROUND)
    return ImageChops.difference(drawn, background).convert("L").point(lambda value: 255 if value else 0).convert("1")


def asked_about(scene: tuple[Shape, ...], question: str) -> list[Shape]:
    """The shapes of ``scene`` a question names: "<colour> <shape>" names one, "<colour> shapes" every shape of the
    colour, a bare "<shape>" or "<shape>s" every shape of the kind."""
    words = question.split()
    named = []
    for i, word in enumerate(words):
        kind = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
        colour = words[i - 1] if i and words[i - 1] in COLOURS else None
        if kind in SHAPES:
            named += [s for s in scene if s.kind == kind and colour in (None, s.colour)]
        elif word == "shapes" and colour is not None:
            named += [s for s in scene if s.colour == colour]
    return list(dict.fromkeys(named))


def sample_key(image: Image.Image, question: str) -> str:
    return hashlib.sha1(image.tobytes() + question.encode()).hexdigest()


def held_out_keys(size: int = TEST_SIZE) -> set[str]:
    """Keys of the validation and test samples, which training must not repeat."""
    return {sample_key(s.image, s.question) for split in ("validation", "test") for s in split_samples(split, size)}


@lru_cache(maxsize=4)
def split_samples(split: str, size: int = TEST_SIZE) -> list[Sample]:
    """The samples ``0 .. size - 1`` of ``split`` (``test`` or ``validation``) that repeat no (image, question) pair
    taken before, by this split or, for validation, by the test split; so the two splits share none."""
    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    taken = set() if split == "test" else {sample_key(s.image, s.question) for s in split_samples("test", size)}
    return distinct(partial(make_sample, split), lambda sample: sample_key(sample.image, sample.question), size, taken)


def distinct(make: Callable[[int], T], key: Callable[[T], str], size: int, taken: set[str]) -> list[T]:
    """``make(0) .. make(size - 1)`` minus any whose key is in ``taken`` or repeats an earlier one's."""
    taken, kept = set(taken), []
    for index in range(size):
        item = make(index)
        if (item_key := key(item)) not in taken:
            taken.add(item_key)
            kept.append(item)
    return kept


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_test_split(path: Path = TEST_FILE, size: int = TEST_SIZE) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = split_samples("test", size)
    table = pa.table(
        {
            "image": [png_bytes(s.image) for s in samples],
            "question": [s.question for s in samples],
            "answer": [s.answer for s in samples],
            "kind": [s.kind for s in samples],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_test_split(path: Path = TEST_FILE) -> list[Sample]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [
        Sample(Image.open(io.BytesIO(r["image"])).convert("RGB"), r["question"], r["answer"], r["kind"]) for r in rows
    ]


if __name__ == "__main__":
    print(write_test_split())
