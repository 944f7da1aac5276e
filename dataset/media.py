"""Media → frames: decord uniform sampling for videos, PIL for images (an image is a 1-frame video)."""
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
MAX_SIDE = 1024   # images are read no larger than this; CLIP resizes to its own input anyway


class MediaError(Exception):
    """Unreadable media; the message names the file and the problem in one line."""


def uniform_indices(total: int, num: int) -> np.ndarray:
    """The centre frame of each of `num` equal segments (repeats frames if the clip is shorter)."""
    return ((np.arange(num) + 0.5) * total / num).astype(np.int64).clip(0, total - 1)


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


def read_video(path, num_frames: int) -> np.ndarray:
    """uint8 (num_frames, H, W, 3) sampled uniformly over the whole clip."""
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
        return reader.get_batch(list(uniform_indices(total, num_frames))).asnumpy()
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


def probe_media(path, kind: str) -> None:
    """Open the file and read its header (a video's frame count) without decoding frames; MediaError if unusable."""
    path = str(path)
    if not Path(path).is_file():
        raise MediaError(f"{path}: {kind} file not found")
    if Path(path).stat().st_size == 0:
        raise MediaError(f"{path}: empty file")
    try:
        if kind == "video":
            import decord
            with native_stderr_silenced():
                frames = len(decord.VideoReader(path, num_threads=1))
            if frames == 0:
                raise MediaError(f"{path}: video has no frames")
        else:
            from PIL import Image
            with Image.open(path) as im:
                im.verify()
    except MediaError:
        raise
    except Exception as e:
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise MediaError(f"{path}: cannot open {kind} ({first_line[:120]})") from None


def read_media(path, kind: str, num_frames: int) -> np.ndarray:
    return read_video(path, num_frames) if kind == "video" else read_image(path)
