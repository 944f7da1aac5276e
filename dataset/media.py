"""Media → frames: decord sampling (uniform, or at a frame rate) for videos, PIL for images (an image is a 1-frame video)."""
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
MAX_SIDE = 1024   # images are read no larger than this; CLIP resizes to its own input anyway


class MediaError(Exception):
    """Unreadable media; the message names the file and the problem in one line."""


SAMPLING_MODES = ("uniform", "fps")


def uniform_indices(total: int, num: int) -> np.ndarray:
    """The centre frame of each of `num` equal segments (repeats frames if the clip is shorter)."""
    return ((np.arange(num) + 0.5) * total / num).astype(np.int64).clip(0, total - 1)


def sample_frames(total: int, native_fps: float, num_frames: int, fps=None) -> np.ndarray:
    """Exactly `num_frames` frame indices, in order.

    fps=None: uniform over the clip (uniform_indices). fps set: the frame on screen at t = 0,
    1/fps, 2/fps, ... seconds (never faster than the clip's own rate); when that gives more than
    num_frames, the cap binds and the frames are spread uniformly over the whole clip instead.
    A clip too short to give num_frames at that rate has those frames repeated in order, spread
    over the num_frames slots as uniform_indices spreads a short clip, because VideoSummary and
    the feature cache use a fixed T.
    """
    if fps is None:
        return uniform_indices(total, num_frames)
    if not fps > 0 or not native_fps > 0:
        raise ValueError(f"fps sampling needs a positive rate (asked {fps}, clip has {native_fps})")
    step = max(1.0, native_fps / fps)   # in native frames
    # floor: frame i is on screen during [i, i+1)/native_fps; the epsilon absorbs float error.
    at_rate = np.floor(np.arange(0, total, step) + 1e-6).astype(np.int64).clip(0, total - 1)
    if len(at_rate) > num_frames:
        return uniform_indices(total, num_frames)
    return at_rate[uniform_indices(len(at_rate), num_frames)]


def sampling_rate(cfg):
    """The `fps` argument read_video takes for a VisionConfig's sampling: None (uniform) or the rate."""
    mode, sample_fps = cfg.frame_sampling, cfg.sample_fps
    if mode == "uniform":
        if sample_fps:
            raise ValueError(f"sample_fps={sample_fps} is only used with frame_sampling 'fps'")
        return None
    if mode == "fps":
        if not sample_fps > 0:
            raise ValueError("frame_sampling 'fps' needs sample_fps > 0")
        return float(sample_fps)
    raise ValueError(f"frame_sampling must be one of {SAMPLING_MODES}, got {mode!r}")


@contextmanager
def native_stderr_silenced():
    """decord/ffmpeg print their own lines for a corrupt file straight to fd 2; our MediaError says it once."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def read_video(path, num_frames: int, fps=None) -> np.ndarray:
    """uint8 (num_frames, H, W, 3): uniform over the whole clip, or at `fps` (see sample_frames)."""
    path = str(path)
    if not Path(path).is_file():
        raise MediaError(f"{path}: video file not found")
    try:
        import decord
        with native_stderr_silenced():
            reader = decord.VideoReader(path, num_threads=1)
        total = len(reader)
        if total == 0:
            raise MediaError(f"{path}: video has no frames")
        native_fps = reader.get_avg_fps() if fps is not None else 0.0
        if fps is not None and not native_fps > 0:
            raise MediaError(f"{path}: frame rate unknown, cannot sample at {fps:g} fps")
        return reader.get_batch(list(sample_frames(total, native_fps, num_frames, fps))).asnumpy()
    except MediaError:
        raise
    except Exception as e:   # decord raises its own error types for corrupt or non-video files
        raise MediaError(f"{path}: cannot decode video ({str(e).splitlines()[0][:120]})") from None


def read_image(path) -> np.ndarray:
    """uint8 (1, H, W, 3)."""
    from PIL import Image
    path = str(path)
    if not Path(path).is_file():
        raise MediaError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.draft("RGB", (MAX_SIDE, MAX_SIDE))   # JPEGs decode straight to a smaller size
            im = im.convert("RGB")
            im.thumbnail((MAX_SIDE, MAX_SIDE))
            return np.asarray(im)[None]
    except Exception as e:
        raise MediaError(f"{path}: cannot read image ({str(e).splitlines()[0][:120]})") from None


def read_media(path, kind: str, num_frames: int, fps=None) -> np.ndarray:
    return read_video(path, num_frames, fps) if kind == "video" else read_image(path)
