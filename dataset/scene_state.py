"""The synthetic temporal suite's ground truth as per-frame feature vectors: perfect perception, to measure the rest alone.

A frame's state is, for each actor slot, whether it is on screen, its shape, the colours of its left
and right halves (one-hot each) and its centre (x, y as fractions of the frame side). The state is
mixed into the CLIP features' width by a fixed random Gaussian map, not zero-padded: VideoSummary
standardises each feature dimension by its spread over the training media, and a one-hot dimension
that is rarely on would come out tens of standard deviations large.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from dataset.synthetic import COLOURS, SHAPES
from dataset.synthetic_temporal import Scene, actor_track

ACTOR_SLOTS = 2   # the suite puts at most two actors in a scene (a needle comes with one main actor)
COLOUR_NAMES = list(COLOURS)
SLOT_WIDTH = 1 + len(SHAPES) + 2 * len(COLOUR_NAMES) + 2
STATE_WIDTH = ACTOR_SLOTS * SLOT_WIDTH
MIX_SEED = 20261203


def source_frames(scene: Scene, times) -> np.ndarray:
    """Indices, into the frames actor_track draws, of the frames shown at `times` (seconds).

    A pair's second member is its source's pixels reversed or every second frame, so its state is
    read from the source's tracks."""
    frames = np.clip(np.round(np.asarray(times, dtype=np.float64) * scene.fps).astype(int), 0, scene.frames - 1)
    if scene.source is None:
        return frames
    last = scene.source.frames - 1
    return last - frames if scene.pair == "reversed" else np.minimum(2 * frames, last)


def scene_state(scene: Scene, times, size: int) -> np.ndarray:
    """(len(times), STATE_WIDTH) float32: each actor slot's state at each time."""
    drawn = scene.source or scene
    if len(drawn.actors) > ACTOR_SLOTS:
        raise ValueError(f"{scene.name}: {len(drawn.actors)} actors, the state has slots for {ACTOR_SLOTS}")
    frames = source_frames(scene, times)
    state = np.zeros((len(frames), STATE_WIDTH), np.float32)
    for slot, actor in enumerate(drawn.actors):
        track, base = actor_track(drawn, slot, size), slot * SLOT_WIDTH
        for row, frame in enumerate(frames):
            if not track.visible[frame]:
                continue
            state[row, base] = 1
            state[row, base + 1 + SHAPES.index(actor.shape)] = 1
            state[row, base + 1 + len(SHAPES) + COLOUR_NAMES.index(track.left_colour[frame])] = 1
            state[row, base + 1 + len(SHAPES) + len(COLOUR_NAMES) + COLOUR_NAMES.index(track.right_colour[frame])] = 1
            state[row, base + SLOT_WIDTH - 2:base + SLOT_WIDTH] = (track.x[frame] / size, track.y[frame] / size)
    return state


@lru_cache(maxsize=4)
def mixing_matrix(width: int) -> np.ndarray:
    """The fixed map from a state to `width` feature dimensions (unit variance per state dimension)."""
    matrix = np.random.default_rng(MIX_SEED).standard_normal((STATE_WIDTH, width)) / np.sqrt(STATE_WIDTH)
    return matrix.astype(np.float32)


def oracle_features(scene: Scene, times, size: int, width: int) -> np.ndarray:
    """(len(times), width) float32 features holding exactly the scene's state at each time."""
    return scene_state(scene, times, size) @ mixing_matrix(width)
