"""The synthetic coloured-shapes dataset: scenes, questions, rendering, and the files (mp4, png, jsonl splits, meta.json)."""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
from PIL import Image

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "orange": (250, 140, 20),
}
# Four shapes a frozen *random* tower tells apart. Its CLS weighs how much of each colour a frame
# holds, so shapes of similar area get confused (a diamond with the triangle, a thick ring with
# it too: docs/findings.md). The thin ring gives four distinct areas: 1.00 (square), 0.79
# (circle), 0.50 (triangle) and 0.34 (ring) of the bounding box.
SHAPES = ("circle", "square", "triangle", "ring")
RING_INNER = 0.75   # inner radius of the ring, as a fraction of its outer radius
MOTIONS = ("left", "right", "up", "down", "still")
KINDS = ("single", "appear", "leave", "sequence")
# Training videos draw "sequence" (two objects on screen in every frame: colour, shape and
# motion must be bound per object) four times as often as each other kind, the others being
# learnt from far fewer examples; test videos draw all four kinds alike.
TRAIN_KIND_WEIGHTS = {"single": 1, "appear": 1, "leave": 1, "sequence": 4}
POSITIONS = ("left", "right", "top", "bottom", "centre")
BACKGROUND = (40, 40, 40)

OBJECT_FRACTION = 0.36  # object diameter as a fraction of the frame size
PATH_START, PATH_END = 0.2, 0.8  # moving objects travel between these fractions of the frame
SINGLE_JITTER = 0.08  # fixed-coordinate jitter for single-object videos, fraction of size
IMAGE_JITTER = 0.06
HELD_OUT_FRACTION = 0.1
NOVEL_TEST_FRACTION = 0.3
MAX_PLACEMENT_TRIES = 1000

TEST_CATEGORY_ORDER = ("colour", "shape", "direction", "count", "order", "caption")
HELD_OUT_PHRASING_PROBABILITY = 0.5
# Question forms: each has a category and two fixed template sets. Training words every question from
# "seen"; a test record draws its set (and says which: "phrasing"), so the test also asks known kinds of
# question in wordings training never showed. Placeholders: {shape} {colour} (one attribute of the
# object asked about), {object} ("red circle"), {media} ("video" / "image"). The answers never depend on
# the wording. The caption forms' seen prompts are the three this generator always had. Held-out
# wordings use only words of the seen ones, in new orders: a model that learns all its language from
# this data cannot know what a word it never read means, so a new word would measure luck.
PHRASINGS = {
    "colour": {"category": "colour", "seen": [
        "What colour is the {shape}?", "What is the colour of the {shape}?",
        "Which colour does the {shape} have?", "Tell me the colour of the {shape}."],
        "held_out": ["Which colour is the {shape}?", "Tell me what colour the {shape} is."]},
    "shape": {"category": "shape", "seen": [
        "What shape is the {colour} object?", "What is the shape of the {colour} object?",
        "Which shape is the {colour} object?", "Tell me the shape of the {colour} object."],
        "held_out": ["What shape does the {colour} object have?", "Tell me what shape the {colour} object is."]},
    "direction": {"category": "direction", "seen": [
        "Which way does the {object} move?", "In which direction does the {object} move?",
        "Which way is the {object} moving?", "What direction does the {object} move in?"],
        "held_out": ["In which direction is the {object} moving?", "Which direction does the {object} move in?"]},
    "count": {"category": "count", "seen": [
        "How many shapes are in the {media}?", "How many objects are there?",
        "How many shapes does the {media} show?", "Count the shapes in the {media}."],
        "held_out": ["How many objects does the {media} show?", "Count the objects in the {media}."]},
    "order_presence": {"category": "order", "seen": [
        "Does the {object} appear or leave?", "Is the {object} appearing or leaving?",
        "Does the {object} enter or leave the scene?", "Does the {object} come into view or leave?"],
        "held_out": ["Is the {object} appearing in the scene or leaving?", "Does the {object} come into the scene or leave?"]},
    "order_first": {"category": "order", "seen": [
        "Which shape moves first?", "Which shape starts moving first?",
        "What is the first shape to move?", "Which object moves first?"],
        "held_out": ["Which object starts moving first?", "What is the first object to move?"]},
    "position": {"category": "position", "seen": [
        "Where is the {object}?", "Where is the {object} in the image?",
        "In which part of the image is the {object}?", "What is the position of the {object}?"],
        "held_out": ["Where in the image is the {object}?", "What part of the image is the {object} in?"]},
    "video_caption": {"category": "caption", "seen": [
        "Describe the video.", "What happens in the video?", "Give a short caption."],
        "held_out": ["Describe what happens in the video.", "Give a short caption of the video."]},
    "image_caption": {"category": "caption", "seen": [
        "Describe the image.", "What is in the image?", "Give a short caption."],
        "held_out": ["Describe what is in the image.", "Give a short caption of the image."]},
}
CAPTION_FORMS = ("video_caption", "image_caption")
IMAGE_POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# Pairs far enough apart for two objects; only these are used in two-object images.
OPPOSITE_POSITIONS = (("left", "right"), ("top", "bottom"))
TWO_OBJECT_IMAGE_FRACTION = 0.75
IMAGE_POSITION_CENTRES = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}

# Separate random streams per purpose and per item, so results do not depend on worker
# scheduling and changing e.g. the prompt sampling does not move any object.
STREAM_HELD_OUT, STREAM_TRAIN_SCENE, STREAM_TEST_SCENE, STREAM_IMAGE_SCENE = 0, 1, 2, 3
STREAM_TRAIN_TEXT, STREAM_IMAGE_TEXT, STREAM_TEST_SPLIT = 4, 5, 6
# The question wordings (synthetic_temporal.py's streams are 20-26). Training wordings have streams of
# their own, so the caption prompts and question orders drawn from 4 and 5 stay what they were.
STREAM_TEST_TEXT, STREAM_TRAIN_WORDING, STREAM_IMAGE_WORDING = 7, 8, 9


def item_rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------- scene description


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    motion: str
    start: tuple[float, float]  # (x, y) centre in pixels
    end: tuple[float, float]
    move_frames: tuple[int, int]  # progress goes 0 -> 1 between these frames, rests outside
    visible_frames: tuple[int, int]  # inclusive

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.motion)

    def centre_at(self, frame: int) -> tuple[float, float]:
        first, last = self.move_frames
        steps = max(last - first, 1)
        done = min(max(frame - first, 0), steps)
        # Weighted sum with integer weights: a reversed path hits bit-identical positions.
        return (
            (self.start[0] * (steps - done) + self.end[0] * done) / steps,
            (self.start[1] * (steps - done) + self.end[1] * done) / steps,
        )

    def visible_at(self, frame: int) -> bool:
        return self.visible_frames[0] <= frame <= self.visible_frames[1]


@dataclass(frozen=True)
class VideoScene:
    name: str
    kind: str
    objects: tuple[SceneObject, ...]  # objects[0] is the primary object P
    first_mover: int | None = None  # index into objects, only for "sequence"
    subset: str | None = None  # only for test videos


@dataclass(frozen=True)
class ImageObject:
    colour: str
    shape: str
    position: str  # one of POSITIONS
    centre: tuple[float, float]


@dataclass(frozen=True)
class ImageScene:
    name: str
    objects: tuple[ImageObject, ...]  # objects[0] is the one the questions ask about


@dataclass(frozen=True)
class RenderSettings:
    size: int
    frames: int
    fps: int
    codec: str


def all_combos() -> list[tuple[str, str, str]]:
    return list(itertools.product(COLOURS, SHAPES, MOTIONS))


def choose_held_out(seed: int) -> list[tuple[str, str, str]]:
    """Pick ~10% of combos to hold out so that each held-out triple is novel only as a whole.

    Besides every colour, shape and motion, each pair inside a held-out triple must still occur
    in training, otherwise the test would ask for an unseen pair rather than an unseen triple.
    """
    combos = all_combos()
    n_held_out = round(HELD_OUT_FRACTION * len(combos))
    rng = item_rng(seed, STREAM_HELD_OUT)
    while True:
        chosen = rng.choice(len(combos), size=n_held_out, replace=False)
        held_out = sorted(combos[i] for i in chosen)
        remaining = [c for c in combos if c not in set(held_out)]
        if held_out_is_learnable(held_out, remaining):
            return held_out


def held_out_is_learnable(held_out, remaining, axes=(COLOURS, SHAPES, MOTIONS)) -> bool:
    """Every value and every pair of values inside a held-out triple still occurs in training."""
    for axis, values in enumerate(axes):
        if {c[axis] for c in remaining} != set(values):
            return False
    for pair_axes in ((0, 1), (0, 2), (1, 2)):
        seen_pairs = {tuple(c[a] for a in pair_axes) for c in remaining}
        if any(tuple(c[a] for a in pair_axes) not in seen_pairs for c in held_out):
            return False
    return True


def motion_endpoints(motion: str, fixed: float, size: int) -> tuple[tuple[float, float], tuple[float, float]]:
    low, high = PATH_START * size, PATH_END * size
    if motion == "right":
        return (low, fixed), (high, fixed)
    if motion == "left":
        return (high, fixed), (low, fixed)
    if motion == "down":
        return (fixed, low), (fixed, high)
    if motion == "up":
        return (fixed, high), (fixed, low)
    raise ValueError(f"not a moving motion: {motion}")


def make_object(rng, combo, size, fixed_range, move_frames, visible_frames) -> SceneObject:
    colour, shape, motion = combo
    if motion == "still":
        position = (float(rng.uniform(*fixed_range)), float(rng.uniform(*fixed_range)))
        start = end = position
    else:
        start, end = motion_endpoints(motion, float(rng.uniform(*fixed_range)), size)
    return SceneObject(colour, shape, motion, start, end, move_frames, visible_frames)


def objects_stay_apart(first: SceneObject, second: SceneObject, frames: int, min_distance: float) -> bool:
    # Checked over every frame, visible or not, so appear and leave share one geometry distribution.
    for frame in range(frames):
        (x1, y1), (x2, y2) = first.centre_at(frame), second.centre_at(frame)
        if abs(x1 - x2) < min_distance and abs(y1 - y2) < min_distance:
            return False
    return True


def object_diameter(size: int) -> float:
    return OBJECT_FRACTION * size


def place_objects(rng, kind, primary_combo, second_combo, size, frames, first_mover):
    """Rejection-sample positions: inside the frame, boxes never overlapping."""
    last = frames - 1
    half_frames = frames // 2
    diameter = object_diameter(size)
    half = diameter / 2
    min_distance = diameter + max(2, size // 32)  # a small gap so objects never touch
    if kind == "single":
        centre = size / 2
        jitter = SINGLE_JITTER * size
        still_range = (PATH_START * size, PATH_END * size)
        fixed_range = still_range if primary_combo[2] == "still" else (centre - jitter, centre + jitter)
        return (make_object(rng, primary_combo, size, fixed_range, (0, last), (0, last)),)

    fixed_range = (half + 1, size - half - 1)
    if kind == "sequence":
        # Time-symmetric halves: the first mover moves in the first half, the other in the second.
        early, late = (0, half_frames - 1), (frames - half_frames, last)
        primary_moves = early if first_mover == 0 else late
        second_moves = late if first_mover == 0 else early
        primary_visible = second_visible = (0, last)
    else:
        primary_moves, second_moves, primary_visible = (0, last), (0, last), (0, last)
        # "leave" is the exact time reversal of "appear", also for odd frame counts.
        second_visible = (half_frames, last) if kind == "appear" else (0, last - half_frames)

    for _ in range(MAX_PLACEMENT_TRIES):
        primary = make_object(rng, primary_combo, size, fixed_range, primary_moves, primary_visible)
        second = make_object(rng, second_combo, size, fixed_range, second_moves, second_visible)
        if objects_stay_apart(primary, second, frames, min_distance):
            return (primary, second)
    raise RuntimeError(f"could not place {primary_combo} and {second_combo} ({kind}) apart")


def sample_second_combo(rng, kind, primary_combo, allowed):
    colour, shape, _ = primary_combo
    needs_motion = kind == "sequence"
    candidates = [
        c
        for c in allowed
        if c[0] != colour and c[1] != shape and ((c[2] != "still") if needs_motion else (c[2] == "still"))
    ]
    return pick(rng, candidates)


def make_video_scene(name, rng, size, frames, allowed, held_out=None, subset=None, kind_weights=None) -> VideoScene:
    """One video: primary from allowed (training, standard test) or from held_out (novel test)."""
    if held_out is None:
        weights = np.array([(kind_weights or {}).get(k, 1) for k in KINDS], dtype=float)
        kind = KINDS[int(rng.choice(len(KINDS), p=weights / weights.sum()))]
        primary_pool = [c for c in allowed if kind != "sequence" or c[2] != "still"]
        primary_combo = pick(rng, primary_pool)
    else:
        primary_combo = pick(rng, held_out)
        kinds = [k for k in KINDS if k != "sequence" or primary_combo[2] != "still"]
        kind = pick(rng, kinds)
    second_combo = None if kind == "single" else sample_second_combo(rng, kind, primary_combo, allowed)
    first_mover = int(rng.integers(2)) if kind == "sequence" else None
    objects = place_objects(rng, kind, primary_combo, second_combo, size, frames, first_mover)
    return VideoScene(name, kind, objects, first_mover, subset)


def make_image_scene(name, rng, size) -> ImageScene:
    """One object, or (TWO_OBJECT_IMAGE_FRACTION of the time) two at opposite sides that differ in
    colour and in shape, so that "What colour is the triangle?" needs colour bound to shape."""
    jitter = IMAGE_JITTER * size
    if rng.random() < TWO_OBJECT_IMAGE_FRACTION:
        positions = pick(rng, OPPOSITE_POSITIONS)
        positions = positions if rng.random() < 0.5 else positions[::-1]
        colours = rng.choice(len(COLOURS), size=2, replace=False)
        shapes = rng.choice(len(SHAPES), size=2, replace=False)
        attributes = [(list(COLOURS)[c], SHAPES[s]) for c, s in zip(colours, shapes)]
    else:
        positions = (pick(rng, POSITIONS),)
        attributes = [(pick(rng, list(COLOURS)), pick(rng, SHAPES))]
    objects = []
    for (colour, shape), position in zip(attributes, positions):
        fx, fy = IMAGE_POSITION_CENTRES[position]
        centre = (fx * size + float(rng.uniform(-jitter, jitter)), fy * size + float(rng.uniform(-jitter, jitter)))
        objects.append(ImageObject(colour, shape, position, centre))
    return ImageScene(name, tuple(objects))


def make_all_scenes(seed, n_videos, n_images, n_test, size, frames):
    held_out = choose_held_out(seed)
    allowed = [c for c in all_combos() if c not in set(held_out)]
    train = [
        make_video_scene(f"v{i:05d}", item_rng(seed, STREAM_TRAIN_SCENE, i), size, frames, allowed,
                         kind_weights=TRAIN_KIND_WEIGHTS)
        for i in range(n_videos)
    ]
    n_novel = round(NOVEL_TEST_FRACTION * n_test)
    novel_indices = set(item_rng(seed, STREAM_TEST_SPLIT).permutation(n_test)[:n_novel].tolist())
    test = []
    for i in range(n_test):
        rng = item_rng(seed, STREAM_TEST_SCENE, i)
        if i in novel_indices:
            scene = make_video_scene(f"t{i:05d}", rng, size, frames, allowed, held_out, "novel_combo")
        else:
            scene = make_video_scene(f"t{i:05d}", rng, size, frames, allowed, None, "standard")
        test.append(scene)
    images = [make_image_scene(f"i{i:05d}", item_rng(seed, STREAM_IMAGE_SCENE, i), size) for i in range(n_images)]
    return held_out, train, test, images


# ---------------------------------------------------------------- language


def with_article(phrase: str) -> str:
    return ("An " if phrase[0] in "aeiou" else "A ") + phrase


def describe(obj: SceneObject) -> str:
    return f"{obj.colour} {obj.shape}"


def motion_phrase(motion: str) -> str:
    return "stays still" if motion == "still" else f"moves {motion}"


def video_caption(scene: VideoScene) -> str:
    primary = scene.objects[0]
    if scene.kind == "single":
        return f"{with_article(describe(primary))} {motion_phrase(primary.motion)}."
    second = scene.objects[1]
    if scene.kind in ("appear", "leave"):
        event = "appears" if scene.kind == "appear" else "leaves"
        return (
            f"{with_article(describe(primary))} {motion_phrase(primary.motion)}. "
            f"{with_article(describe(second))} {event}."
        )
    first, then = (primary, second) if scene.first_mover == 0 else (second, primary)
    return (
        f"{with_article(describe(first))} {motion_phrase(first.motion)}, "
        f"then {with_article(describe(then)).lower()} {motion_phrase(then.motion)}."
    )


class Question(NamedTuple):
    """One question about a scene, not yet worded: its form (a key of PHRASINGS), its answer, and the
    placeholder fills of the form's templates."""
    form: str
    answer: str
    fills: dict

    @property
    def category(self) -> str:
        return PHRASINGS[self.form]["category"]


def worded(rng, question: Question, phrasing: str = "seen") -> tuple[str, str, str]:
    """(category, question text, answer): a template drawn from the form's `phrasing` set."""
    template = pick(rng, PHRASINGS[question.form][phrasing])
    return question.category, template.format(**question.fills), question.answer


def video_questions(scene: VideoScene) -> list[Question]:
    """Every applicable question, in TEST_CATEGORY_ORDER."""
    primary = scene.objects[0]
    questions = [
        Question("colour", primary.colour, {"shape": primary.shape}),
        Question("shape", primary.shape, {"colour": primary.colour}),
        Question("direction", primary.motion, {"object": describe(primary)}),
        Question("count", "one" if len(scene.objects) == 1 else "two", {"media": "video"}),
    ]
    if scene.kind in ("appear", "leave"):
        second = scene.objects[1]
        answer = "appears" if scene.kind == "appear" else "leaves"
        questions.append(Question("order_presence", answer, {"object": describe(second)}))
    elif scene.kind == "sequence":
        questions.append(Question("order_first", f"the {describe(scene.objects[scene.first_mover])}", {}))
    questions.append(Question("video_caption", video_caption(scene), {}))
    return questions


def second_mover_questions(scene: VideoScene) -> list[Question]:
    """Training-only questions about the other object of a "sequence" video (the test asks about
    the primary only). Both objects move there, so "which way does X move?" needs each motion bound
    to its object; asking about both doubles that supervision without a single extra video."""
    if scene.kind != "sequence":
        return []
    second = scene.objects[1]
    return [
        Question("colour", second.colour, {"shape": second.shape}),
        Question("shape", second.shape, {"colour": second.colour}),
        Question("direction", second.motion, {"object": describe(second)}),
    ]


def image_caption(scene: ImageScene) -> str:
    parts = [f"{with_article(f'{o.colour} {o.shape}')} {IMAGE_POSITION_PHRASES[o.position]}" for o in scene.objects]
    return " and ".join([parts[0]] + [p[0].lower() + p[1:] for p in parts[1:]]) + "."


def image_questions(scene: ImageScene) -> list[Question]:
    target = scene.objects[0]
    return [
        Question("colour", target.colour, {"shape": target.shape}),
        Question("shape", target.shape, {"colour": target.colour}),
        Question("position", target.position, {"object": f"{target.colour} {target.shape}"}),
        Question("count", "one" if len(scene.objects) == 1 else "two", {"media": "image"}),
        Question("image_caption", image_caption(scene), {}),
    ]


def training_pairs(text_rng, wording_rng, questions) -> list[tuple[str, str, str]]:
    """Seen wordings only: the caption prompt from the item's text stream (the draw it always was), every
    other question's template from the item's wording stream."""
    return [worded(text_rng if q.form in CAPTION_FORMS else wording_rng, q) for q in questions]


def worded_for_test(rng, questions) -> list[tuple[tuple[str, str, str], str]]:
    """((category, text, answer), phrasing) per question: each draws its set, seen or held_out, then its template."""
    pairs = []
    for question in questions:
        phrasing = "held_out" if rng.random() < HELD_OUT_PHRASING_PROBABILITY else "seen"
        pairs.append((worded(rng, question, phrasing), phrasing))
    return pairs


def conversation(marker: str, qa_list) -> list[dict]:
    turns = []
    for turn_index, (_, question, answer) in enumerate(qa_list):
        content = f"{marker}\n{question}" if turn_index == 0 else question
        turns.append({"role": "user", "content": content})
        turns.append({"role": "assistant", "content": answer})
    return turns


def sample(sample_id, media_key, media_path, marker, qa_list, category, subset=None, phrasing=None) -> dict:
    turns = conversation(marker, qa_list)
    record = {"id": sample_id, media_key: media_path, "conversations": turns, "category": category}
    if subset is not None:
        record["subset"] = subset
    if phrasing is not None:
        record["phrasing"] = phrasing
    return record


def video_path(scene) -> str:
    return f"videos/{scene.name}.mp4"


def image_path(scene) -> str:
    return f"images/{scene.name}.png"


def shuffled(rng, qa_list):
    return [qa_list[i] for i in rng.permutation(len(qa_list))]


def build_splits(seed, train, test, images):
    pretrain, sft_image, sft_video, test_lines = [], [], [], []
    for index, scene in enumerate(train):
        rng = item_rng(seed, STREAM_TRAIN_TEXT, index)
        qa_list = training_pairs(rng, item_rng(seed, STREAM_TRAIN_WORDING, index),
                                 video_questions(scene) + second_mover_questions(scene))
        path = video_path(scene)
        caption = next(qa for qa in qa_list if qa[0] == "caption")
        pretrain.append(sample(f"{scene.name}-cap", "video", path, "<video>", [caption], "caption"))
        # Every question about the video, in random order: the rarer temporal questions
        # (direction, order) then get as much supervision as the easy ones, and each question
        # type comes first (as in the single-question test) in about one sample out of six.
        chosen = shuffled(rng, qa_list)
        sft_video.append(sample(f"{scene.name}-multi", "video", path, "<video>", chosen, "multi"))
    for index, scene in enumerate(images):
        rng = item_rng(seed, STREAM_IMAGE_TEXT, index)
        qa_list = training_pairs(rng, item_rng(seed, STREAM_IMAGE_WORDING, index), image_questions(scene))
        path = image_path(scene)
        caption = next(qa for qa in qa_list if qa[0] == "caption")
        pretrain.append(sample(f"{scene.name}-cap", "image", path, "<image>", [caption], "caption"))
        chosen = shuffled(rng, qa_list)
        sft_image.append(sample(f"{scene.name}-multi", "image", path, "<image>", chosen, "multi"))
    for index, scene in enumerate(test):
        for qa, phrasing in worded_for_test(item_rng(seed, STREAM_TEST_TEXT, index), video_questions(scene)):
            sample_id = f"{scene.name}-{qa[0]}"
            test_lines.append(sample(sample_id, "video", video_path(scene), "<video>", [qa], qa[0], scene.subset,
                                     phrasing))
    return {"pretrain": pretrain, "sft_image": sft_image, "sft_video": sft_video, "test": test_lines}


# ---------------------------------------------------------------- rendering


def shape_mask(shape, centre, diameter, xs, ys) -> np.ndarray:
    cx, cy = centre
    r = diameter / 2
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (RING_INNER * r) ** 2)
    if shape == "triangle":  # apex up, base along the bottom of the box
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape: {shape}")


def pixel_grid(size):
    # Sample at pixel centres so a shape at a given float position is symmetric.
    coords = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(coords, coords)


def blank_canvas(size) -> np.ndarray:
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    return canvas


def render_video_frames(scene: VideoScene, size: int, frames: int) -> np.ndarray:
    xs, ys = pixel_grid(size)
    diameter = object_diameter(size)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for frame in range(frames):
        canvas = blank_canvas(size)
        for obj in scene.objects:
            if obj.visible_at(frame):
                canvas[shape_mask(obj.shape, obj.centre_at(frame), diameter, xs, ys)] = COLOURS[obj.colour]
        video[frame] = canvas
    return video


def render_image(scene: ImageScene, size: int) -> np.ndarray:
    xs, ys = pixel_grid(size)
    canvas = blank_canvas(size)
    for obj in scene.objects:
        canvas[shape_mask(obj.shape, obj.centre, object_diameter(size), xs, ys)] = COLOURS[obj.colour]
    return canvas


def pick_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_mp4(path, video: np.ndarray, fps: int, codec: str, x264_options: dict | None = None) -> None:
    """x264_options replace the default rate control (the temporal suite passes a constant qp: crf is
    not pixel-reproducible from run to run)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # parallelism comes from the worker pool
        if codec == "libx264":
            stream.options = x264_options or {"crf": "18", "preset": "veryfast"}  # crf 18 keeps the flat colours clean
        else:
            stream.bit_rate = 4_000_000
        stream.codec_context.time_base = Fraction(1, fps)
        for index, pixels in enumerate(video):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_media(task) -> None:
    """Worker entry point: render one scene and write it to disk."""
    scene, path, settings = task
    if isinstance(scene, VideoScene):
        write_mp4(path, render_video_frames(scene, settings.size, settings.frames), settings.fps, settings.codec)
    else:
        Image.fromarray(render_image(scene, settings.size)).save(path, compress_level=1)


def write_all_media(out_dir: Path, train, test, images, settings: RenderSettings, workers: int) -> None:
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    tasks = [(s, out_dir / video_path(s), settings) for s in train + test]
    tasks += [(s, out_dir / image_path(s), settings) for s in images]
    run_tasks(write_media, tasks, workers, chunksize=16)


def run_tasks(work, tasks, workers: int, chunksize: int) -> None:
    """work(task) for every task, in a pool of `workers` processes (in this one when workers is 1)."""
    if workers == 1:
        for task in tasks:
            work(task)
        return
    with multiprocessing.Pool(workers) as pool:
        for _ in pool.imap_unordered(work, tasks, chunksize=chunksize):
            pass


# ---------------------------------------------------------------- entry points


def write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def build_meta(seed, held_out, train, test, images, splits, settings: RenderSettings) -> dict:
    return {
        "seed": seed,
        "counts": {
            "train_videos": len(train),
            "test_videos": len(test),
            "novel_combo_test_videos": sum(s.subset == "novel_combo" for s in test),
            "images": len(images),
            **{f"{name}_samples": len(records) for name, records in splits.items()},
        },
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "motions": list(MOTIONS),
        "kinds": list(KINDS),
        "train_kind_weights": TRAIN_KIND_WEIGHTS,
        "positions": list(POSITIONS),
        "held_out": [list(c) for c in held_out],
        "frames": settings.frames,
        "fps": settings.fps,
        "size": settings.size,
        "background": list(BACKGROUND),
        "object_diameter": round(object_diameter(settings.size), 3),
        "codec": settings.codec,
        "test_phrasing": {k: sum(r["phrasing"] == k for r in splits["test"]) for k in ("seen", "held_out")},
        "phrasings": PHRASINGS,
    }


def generate(out_dir, n_videos, seed, n_images=None, n_test=None, size=128, frames=16, fps=8, workers=2) -> dict:
    """Write the whole dataset under out_dir and return meta.json's content."""
    out_dir = Path(out_dir)
    n_images = n_videos if n_images is None else n_images
    n_test = max(60, n_videos // 5) if n_test is None else n_test
    settings = RenderSettings(size, frames, fps, pick_codec())
    held_out, train, test, images = make_all_scenes(seed, n_videos, n_images, n_test, size, frames)
    write_all_media(out_dir, train, test, images, settings, workers)
    splits = build_splits(seed, train, test, images)
    for name, records in splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", records)
    meta = build_meta(seed, held_out, train, test, images, splits, settings)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


# ---------------------------------------------------------------- argument types of the generators' CLIs

def int_at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def even_size(text: str) -> int:
    value = int_at_least(32)(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be even (yuv420p needs even sides), got {value}")
    return value
