"""Media → pixels (uint8 frames): decord sampling (uniform, or at a frame rate) for videos, PIL for images (an image is a 1-frame video)."""
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
MAX_SIDE = 1024   # images are read no larger than this; CLIP resizes to its own input anyway
# Larger videos are decoded scaled down to about this many pixels a frame (aspect kept): 8 frames of a
# 3840×2160 clip would be 200 MB at full size; CLIP's input is a few hundred pixels anyway.
MAX_VIDEO_PIXELS = 1920 * 1080


class MediaError(Exception):
    """Unreadable media; the message names the file and the problem in one line."""


SAMPLING_MODES = ("uniform", "fps")
# Files store frame times rounded (whole ms in mkv/webm; decord hands them over as float32), so a
# sampling instant that falls on a frame boundary is nudged by this much to land on the later frame.
TIME_SLACK_S = 1e-4
# Decoders that honour skip_frame=NONREF exactly: a frame the bitstream marks as non-reference is
# never used by another frame, so skipping such frames on the way to a sampled one changes no pixel.
SKIPPING_CODECS = {"h264", "hevc"}
SPARSE_SAMPLING = 4   # frames in the clip per sampled frame from which decode_sampled pays off


def uniform_indices(total: int, num: int) -> np.ndarray:
    """The centre frame of each of `num` equal segments (repeats frames if the clip is shorter)."""
    return ((np.arange(num) + 0.5) * total / num).astype(np.int64).clip(0, total - 1)


def sample_frames(total: int, native_fps: float, num_frames: int, fps=None, times=None) -> np.ndarray:
    """Frame indices, in order.

    fps=None: exactly num_frames, uniform over the clip (uniform_indices). fps set: the frame on screen
    at t = 0, 1/fps, 2/fps, ... seconds, each frame at most once (never faster than the clip's own
    rate), so a short clip gives fewer frames than a long one (batches pad them, with a mask); when
    that gives more than num_frames, the cap binds and num_frames are spread uniformly over the whole
    clip instead.
    times: (total, 2) start/end seconds of each frame as the file stores them (decord's
    get_frame_timestamp), so a variable-frame-rate clip is sampled by its real clock; without
    them the clip is taken to run at a constant native_fps.
    """
    if fps is None:
        return uniform_indices(total, num_frames)
    if not fps > 0:
        raise ValueError(f"fps sampling needs a positive rate, got {fps}")
    if times is None:
        if not native_fps > 0:
            raise ValueError(f"fps sampling needs the clip's frame times or its frame rate, got {native_fps}")
        starts, duration = np.arange(total) / native_fps, total / native_fps
    else:
        times = np.asarray(times, dtype=np.float64)
        starts, duration = times[:, 0], times[-1, 1]
    clock = np.arange(int(np.ceil((duration - TIME_SLACK_S) * fps))) / fps
    on_screen = np.searchsorted(starts, clock + TIME_SLACK_S, side="right") - 1
    at_rate = np.unique(on_screen.clip(0, total - 1))
    return uniform_indices(total, num_frames) if len(at_rate) > num_frames else at_rate


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


def decode_size(path) -> tuple:
    """(width, height) to decode at: the stored size scaled to at most MAX_VIDEO_PIXELS, or (-1, -1) for
    the stored size (small enough, or unknown: then decord reports what is wrong with the file)."""
    try:
        import av
        with av.open(str(path)) as container:
            context = container.streams.video[0].codec_context
            width, height = context.width, context.height
    except Exception:
        return -1, -1
    if not width or not height or width * height <= MAX_VIDEO_PIXELS:
        return -1, -1
    scale = (MAX_VIDEO_PIXELS / (width * height)) ** 0.5
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def decoder_message(error: Exception) -> str:
    """decord's first error line without its log prefix ("[12:00:00] /src/video_reader.cc:151: ")."""
    line = (str(error).splitlines() or [type(error).__name__])[0]
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line)[:120]


def decode_sampled(path, indices, total: int):
    """uint8 (len(indices), H, W, 3): the frames at these presentation-order indices, decoded by PyAV
    from the keyframe before each, skipping non-reference frames on the way (about half of an
    H.264/HEVC stream). None when the file does not qualify (another codec, frame count or
    timestamps unlike what decord saw, a decoding error): read_video then decodes with decord.
    """
    import av
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            codec = stream.codec_context
            if codec.name not in SKIPPING_CODECS:
                return None
            codec.thread_count = 1   # frame threads would apply skip_frame out of step with the packets
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size]
            pts_in_decode_order = [pts for pts, _ in packets]
            if len(packets) != total or None in pts_in_decode_order or len(set(pts_in_decode_order)) != total:
                return None
            pts_in_order = sorted(pts_in_decode_order)
            wanted = [pts_in_order[i] for i in indices]
            position = {pts: n for n, pts in enumerate(pts_in_decode_order)}
            keyframe_before, last_key = [], None
            for n, (_, key) in enumerate(packets):
                last_key = n if key else last_key
                keyframe_before.append(last_key)
            found, fed = {}, None   # fed: decode position of the next packet the decoder would get
            for target in sorted(set(wanted), key=position.get):
                if target in found:
                    continue
                start = keyframe_before[position[target]]
                if start is None:
                    return None
                if fed is None or start > fed:   # a seek skips whole groups of pictures
                    container.seek(packets[start][0], stream=stream, backward=True, any_frame=False)
                    codec.flush_buffers()
                    fed = None
                for packet in container.demux(stream):
                    if fed is None:   # the seek must land on the keyframe it aimed at
                        if packet.pts != packets[start][0]:
                            return None
                        fed = start
                    remaining = packet.size and packet.pts not in found and packet.pts in wanted
                    codec.skip_frame = "DEFAULT" if remaining else "NONREF"
                    for frame in codec.decode(packet if packet.size else None):
                        if frame.pts in wanted and frame.pts not in found:
                            found[frame.pts] = frame.to_ndarray(format="rgb24")
                    fed += 1
                    if target in found:
                        break
                if target not in found:
                    return None
            return np.stack([found[pts] for pts in wanted])
    except Exception:   # PyAV's many error types; decord then reads the file or names its problem
        return None


def check_file(path: str, kind: str) -> None:
    """MediaError unless `path` is an existing, non-empty file (what decord would report less clearly)."""
    if not Path(path).is_file():
        raise MediaError(f"{path}: {kind} file not found")
    if Path(path).stat().st_size == 0:
        raise MediaError(f"{path}: empty file")


@dataclass
class Clip:
    """What the model sees of a media file: the sampled pixels, uint8 (T, H, W, 3), the time in seconds
    at which each sampled frame is shown (T,), and the file's duration in seconds (0 for an image)."""
    pixels: np.ndarray
    times: np.ndarray
    duration: float


def frame_times(reader, total: int, path, required: bool) -> np.ndarray:
    """(total, 2) start/end seconds of every frame: the times the file stores (so a variable-frame-rate
    clip keeps its real clock). Stored times that are unusable (not numbers, or going backwards) are a
    MediaError if the clock is `required` (fps sampling, a model that reads frame times); otherwise, as
    where the file stores none, a constant rate from its average fps stands in. When even that is
    unknown: MediaError if required, else NaN, which nothing downstream then reads."""
    stored = np.asarray(reader.get_frame_timestamp(list(range(total))), dtype=np.float64)
    problem = None
    if stored.any():   # all zeros: the file stores no times (NaN counts as stored, and is refused below)
        backwards = np.flatnonzero(np.diff(stored[:, 0]) < 0)
        if not np.isfinite(stored).all():
            problem = "frame times are not all numbers"
        elif len(backwards):
            problem = (f"frame times go backwards at frame {backwards[0] + 1} "
                       f"({stored[backwards[0], 0]:.3f} s, then {stored[backwards[0] + 1, 0]:.3f} s)")
        else:
            return stored
        if required:
            raise MediaError(f"{path}: {problem}")
    native_fps = reader.get_avg_fps()
    if native_fps > 0:
        starts = np.arange(total) / native_fps
        return np.stack([starts, starts + 1 / native_fps], axis=1)
    if required:
        raise MediaError(f"{path}: {problem or 'frame times unknown (no stored timestamps, no frame rate)'}")
    return np.full((total, 2), np.nan)


def read_clip(path, kind: str, num_frames: int, fps=None, need_times=False) -> Clip:
    """A video sampled to num_frames (uniform over the whole clip, or at `fps`: see sample_frames) with
    each frame's time; an image as a 1-frame clip at 0 s. MediaError names the file if it is unusable,
    or if its clock is (see frame_times) and fps sampling or need_times asks for it.

    Frames larger than MAX_VIDEO_PIXELS come back scaled down (decoded that way, so memory stays bounded).
    """
    if kind != "video":
        return Clip(read_image(path), np.zeros(1, dtype=np.float32), 0.0)
    path = str(path)
    check_file(path, "video")
    try:
        import decord
        width, height = decode_size(path)
        with native_stderr_silenced():
            reader = decord.VideoReader(path, num_threads=1, width=width, height=height)
        total = len(reader)
        if total == 0:
            raise MediaError(f"{path}: video has no frames")
        times = frame_times(reader, total, path, required=fps is not None or need_times)
        indices = sample_frames(total, 0.0, num_frames, fps, times)
        pixels = None
        if width < 0 and total >= SPARSE_SAMPLING * len(set(indices.tolist())):   # huge frames: decord scales them
            pixels = decode_sampled(path, indices, total)
        if pixels is None:
            pixels = reader.get_batch(list(indices)).asnumpy()
        return Clip(pixels, times[indices, 0].astype(np.float32), float(times[-1, 1]))
    except MediaError:
        raise
    except Exception as e:   # decord raises its own error types for corrupt or non-video files
        raise MediaError(f"{path}: {frameless(path) or f'cannot decode video ({decoder_message(e)})'}") from None


def read_video(path, num_frames: int, fps=None) -> np.ndarray:
    """The pixels of read_clip: uint8 (num_frames, H, W, 3)."""
    return read_clip(path, "video", num_frames, fps).pixels


def frameless(path):
    """Why a file that opens as a container holds no video frame ("no video stream", "video has no
    frames"), or None; decord only says it finds no stream with a cryptic index."""
    try:
        import av
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no video stream (no frames)"
            return "video has no frames" if next(container.decode(video=0), None) is None else None
    except Exception:
        return None


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
    check_file(path, kind)
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
        reason = frameless(path) if kind == "video" else None
        raise MediaError(f"{path}: {reason or f'cannot open {kind} ({decoder_message(e)})'}") from None
