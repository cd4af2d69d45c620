"""Moving dash-shapes: seeded 8-frame clips of shapes that enter, move and leave, and one-word questions about them.

A clip is 1 to 3 shapes of distinct kinds (any colours) on a 64x64 background, 8 frames at 2 frames a second (the
rate qwen-vl-utils reads video at, so every frame is read). Each shape is on screen for 4 frames from its own first
frame (0, 2 or 4, distinct per shape: frame pairs are the Qwen towers' temporal patches), moving 4 pixels a frame in
one direction; shapes on screen together keep their boxes a pixel apart before rounding to pixels (after it, about 3%
of such pairs touch and 1% overlap by a pixel). Questions of three kinds:

- ``direction``: "where does the circle move ?" (up / down / left / right);
- ``order``: "which shape appears first ?" / "... last ?" (circle / square / triangle; clips of 2 or 3 shapes);
- ``count``: "how many shapes appear ?" / "how many red shapes appear ?" (0 to 3; shapes with first frames 0 and 4
  are never on screen together, so the count is across frames).

The test split is video files (lossless H.264 in MP4, exact through decord and PyAV) in ``tasks/dash_shapes_video``;
training renders clips in memory, skipping the test and validation (clip, question) pairs.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dash_vlm.resources import bundled
from dash_vlm.shapes.data import BACKGROUND, COLOURS, IMAGE_SIZE, SHAPES, distinct, draw_shape

FRAMES = 8
FRAME_RATE = 2
ON_SCREEN = 4  # frames each shape is visible
FIRST_FRAMES = (0, 2, 4)
STEP = 4  # pixels a frame
MARGIN = 10  # a shape's centre stays this far inside the frame
DIRECTIONS = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}
KINDS = ("direction", "order", "count")
ANSWERS = (*DIRECTIONS, *SHAPES, "0", "1", "2", "3")
WORDS = "does move up down which shape appears first last appear".split()  # new to the image task's vocabulary
SPLIT_SEEDS = {"train": 3_000_000_000, "validation": 4_000_000_000, "test": 5_000_000_000}
TEST_SIZE = 300
TASK_FOLDER = bundled("tasks") / "dash_shapes_video"
TEST_FILE = TASK_FOLDER / "test.parquet"


@dataclass(frozen=True)
class Mover:
    """One shape of a clip: what it is, when it enters, where it starts and which way it moves."""

    kind: str
    colour: str
    first_frame: int
    direction: str
    x: int  # centre on its first frame
    y: int
    size: int

    def centre(self, frame: int) -> tuple[int, int]:
        dx, dy = DIRECTIONS[self.direction]
        steps = frame - self.first_frame
        return self.x + dx * STEP * steps, self.y + dy * STEP * steps

    def visible(self, frame: int) -> bool:
        return self.first_frame <= frame < self.first_frame + ON_SCREEN


@dataclass(frozen=True)
class Clip:
    """A clip's frames and one question about it; the shapes drawn when generated, the file when read."""

    frames: tuple[Image.Image, ...]
    question: str
    answer: str
    kind: str
    movers: tuple[Mover, ...] = ()
    path: Path | None = None  # the clip's file, when read from the test split


def apart(a: Mover, b: Mover) -> bool:
    """Whether two shapes keep a pixel between their (unrounded) boxes on every frame both are on screen."""
    for frame in range(FRAMES):
        if a.visible(frame) and b.visible(frame):
            (ax, ay), (bx, by) = a.centre(frame), b.centre(frame)
            gap = (a.size + b.size) / 2 + 1
            if abs(ax - bx) < gap and abs(ay - by) < gap:
                return False
    return True


def random_mover(rng: random.Random, kind: str, first_frame: int) -> Mover:
    """A shape of ``kind`` entering at ``first_frame``, whose whole path stays inside the margins."""
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    travel = STEP * (ON_SCREEN - 1)
    # The start range is shortened by the travel along the motion.
    x_low, x_high = MARGIN + max(0, -dx) * travel, IMAGE_SIZE - MARGIN - max(0, dx) * travel
    y_low, y_high = MARGIN + max(0, -dy) * travel, IMAGE_SIZE - MARGIN - max(0, dy) * travel
    colour = rng.choice(list(COLOURS))
    return Mover(
        kind,
        colour,
        first_frame,
        direction,
        rng.randint(x_low, x_high),
        rng.randint(y_low, y_high),
        rng.randint(14, 19),
    )


def random_movers(rng: random.Random, minimum: int = 1) -> list[Mover]:
    """``minimum`` to 3 shapes of distinct kinds and first frames, placed so that none touch (a shape that cannot be
    placed in 20 tries is redrawn with the others)."""
    while True:
        count = rng.randint(minimum, 3)
        kinds, first_frames = rng.sample(SHAPES, count), rng.sample(FIRST_FRAMES, count)
        movers = []
        for kind, first_frame in zip(kinds, first_frames, strict=True):
            for _ in range(20):
                mover = random_mover(rng, kind, first_frame)
                if all(apart(mover, other) for other in movers):
                    movers.append(mover)
                    break
        if len(movers) == count:
            return movers


def render_clip(movers: list[Mover]) -> tuple[Image.Image, ...]:
    """The clip's frames: each shape drawn on the frames it is on screen."""
    frames = []
    for frame in range(FRAMES):
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for mover in movers:
            if mover.visible(frame):
                draw_shape(draw, mover.kind, mover.colour, *mover.centre(frame), mover.size)
        frames.append(image)
    return tuple(frames)


def ask(movers: list[Mover], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """A question of ``kind`` about the clip of ``movers`` and its answer, or ``None`` if it has none."""
    if kind == "direction":
        mover = rng.choice(movers)
        return f"where does the {mover.kind} move ?", mover.direction
    if kind == "order":
        if len(movers) < 2:
            return None
        which = rng.choice(("first", "last"))
        pick = min if which == "first" else max
        return f"which shape appears {which} ?", pick(movers, key=lambda m: m.first_frame).kind
    if rng.random() < 0.5:
        return "how many shapes appear ?", str(len(movers))
    colour = rng.choice(list(COLOURS))
    return f"how many {colour} shapes appear ?", str(sum(m.colour == colour for m in movers))


def make_clip(split: str, index: int) -> Clip:
    """Clip ``index`` of ``split``: kinds cycle so that every kind is equally frequent."""
    rng = random.Random(SPLIT_SEEDS[split] + index)
    kind = KINDS[index % len(KINDS)]
    movers = random_movers(rng, minimum=2 if kind == "order" else 1)
    question, answer = ask(movers, kind, rng)
    return Clip(render_clip(movers), question, answer, kind, tuple(movers))


def clip_key(frames: tuple[Image.Image, ...], question: str) -> str:
    """Identifies a (clip, question) pair across splits."""
    digest = hashlib.sha1()
    for frame in frames:
        digest.update(frame.tobytes())
    digest.update(question.encode())
    return digest.hexdigest()


def training_clip(index: int, exclude: set[str] = frozenset()) -> tuple[tuple[Image.Image, ...], list]:
    """Training clip ``index`` and one question of every kind it allows (in random order), with their answers, minus
    any (clip, question) pair whose key is in ``exclude`` (``held_out_keys()``)."""
    rng = random.Random(SPLIT_SEEDS["train"] + index)
    movers = random_movers(rng)
    frames = render_clip(movers)
    questions = [ask(movers, kind, rng) for kind in rng.sample(KINDS, len(KINDS))]
    return frames, [qa for qa in questions if qa is not None and clip_key(frames, qa[0]) not in exclude]


@lru_cache(maxsize=4)
def split_clips(split: str, size: int = TEST_SIZE) -> list[Clip]:
    """The clips ``0 .. size - 1`` of ``split`` (``test`` or ``validation``), without repeating a (clip, question) pair
    taken before by this split or, for validation, by the test split."""
    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    taken = set() if split == "test" else {clip_key(c.frames, c.question) for c in split_clips("test", size)}
    return distinct(partial(make_clip, split), lambda clip: clip_key(clip.frames, clip.question), size, taken)


def held_out_keys(size: int = TEST_SIZE) -> set[str]:
    """Keys of the validation and test clips, which training must not repeat."""
    return {clip_key(c.frames, c.question) for split in ("validation", "test") for c in split_clips(split, size)}


def write_video(frames: tuple[Image.Image, ...], path: Path) -> None:
    """``frames`` as lossless H.264 (RGB) in MP4 at ``FRAME_RATE`` frames a second."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=FRAME_RATE)
        stream.width, stream.height, stream.pix_fmt = IMAGE_SIZE, IMAGE_SIZE, "rgb24"
        stream.options = {"qp": "0", "preset": "veryslow"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


def read_video(path: Path) -> tuple[Image.Image, ...]:
    """Every frame of a video file (PyAV)."""
    import av

    with av.open(str(path)) as container:
        return tuple(frame.to_image() for frame in container.decode(video=0))


def write_test_split(folder: Path = TASK_FOLDER, size: int = TEST_SIZE) -> Path:
    """The test clips as ``clips/NNNN.mp4`` under ``folder`` and their questions in ``test.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    clips = split_clips("test", size)
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    names = []
    for number, clip in enumerate(clips):
        names.append(f"clips/{number:04d}.mp4")
        write_video(clip.frames, folder / names[-1])
    table = pa.table(
        {
            "video": names,
            "question": [c.question for c in clips],
            "answer": [c.answer for c in clips],
            "kind": [c.kind for c in clips],
        }
    )
    pq.write_table(table, folder / "test.parquet")
    return folder / "test.parquet"


def test_questions(path: Path = TEST_FILE) -> list[dict]:
    """The committed test split's rows (video file, question, answer, kind), without decoding the clips."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_test_split(path: Path = TEST_FILE) -> list[Clip]:
    """The committed test clips (frames decoded from their files) with their questions."""
    clips = []
    for row in test_questions(path):
        video = path.parent / row["video"]
        clips.append(Clip(read_video(video), row["question"], row["answer"], row["kind"], path=video))
    return clips


def frames_array(frames: tuple[Image.Image, ...]) -> np.ndarray:
    """``[frames, height, width, 3]`` uint8, the layout video processors take."""
    return np.stack([np.asarray(frame) for frame in frames])


if __name__ == "__main__":
    print(write_test_split())
