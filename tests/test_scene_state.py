"""Oracle features (dataset/scene_state.py, scripts/oracle_features.py): the true state of each sampled frame,
checked against the decoded pixels, written at the CLIP cache's media, times and width, and refused in
one line where the suite cannot be planned again or the cache has no times."""
import json
import shutil

import decord
import numpy as np
import pytest
import torch

import oracle_features
from conftest import CLIP_MODEL, CLIP_SIZE
from dataset.features import FeatureCache, FeatureWriter, cache_folder
from dataset.scene_state import SLOT_WIDTH, STATE_WIDTH, mixing_matrix, scene_state
from dataset.synthetic import BACKGROUND, COLOURS
from dataset.synthetic_temporal import Settings, plan_dataset, video_path
from model.config import VisionConfig
from test_temporal_training import (CAP, N_TEST, N_VIDEOS, SAMPLE_FPS, SAMPLING, SEED, SETTINGS,  # noqa: F401
                                     suite, temporal_cache)   # (fixtures)


def planned() -> dict:
    _, train, test = plan_dataset(SEED, N_VIDEOS, N_TEST, Settings(**SETTINGS))
    return {video_path(v.scene): v.scene for v in train + test}


def decoded(root, key, times) -> np.ndarray:
    reader = decord.VideoReader(str(root / key))
    frames = np.clip(np.round(np.asarray(times) * SETTINGS["fps"]).astype(int), 0, len(reader) - 1)
    return reader.get_batch(list(frames)).asnumpy().astype(int)


def test_the_state_says_what_the_decoded_frames_show_pair_members_included(suite, temporal_cache):
    cache, scenes, size = FeatureCache(temporal_cache), planned(), SETTINGS["size"]
    assert set(cache.index) <= set(scenes) and any(s.source is not None for s in scenes.values())
    checked = 0
    for key in sorted(cache.index):
        times, _ = cache.get_times(key)
        state, pixels = scene_state(scenes[key], times.numpy(), size), decoded(suite, key, times.numpy())
        painted = np.abs(pixels - np.array(BACKGROUND)).sum(-1) > 60
        on_screen = state[:, ::SLOT_WIDTH] > 0
        assert np.array_equal(painted.sum((1, 2)) > 0, on_screen.any(1)), key
        for row in np.flatnonzero(on_screen.sum(1) == 1):   # one actor: its centre and colours are the pixels'
            slot = int(np.flatnonzero(on_screen[row])[0])
            x = state[row, (slot + 1) * SLOT_WIDTH - 2] * size
            assert abs(np.nonzero(painted[row])[1].mean() - x) < 2.0, key
            colours = [name for name, rgb in COLOURS.items()
                       if (np.abs(pixels[row] - np.array(rgb)).sum(-1) < 60).sum() > 4]
            shown = np.flatnonzero(state[row, slot * SLOT_WIDTH + 5:(slot + 1) * SLOT_WIDTH - 2])
            assert sorted(colours) == sorted({list(COLOURS)[i % len(COLOURS)] for i in shown}), key
            checked += 1
    assert checked > 20


def test_the_script_writes_every_cached_media_at_its_times_and_width_and_the_state_can_be_read_back(
        suite, temporal_cache, tmp_path):
    out = tmp_path / "oracle"
    oracle_features.main(["--data", str(suite), "--clip_features", str(temporal_cache), "--out", str(out)])
    clip, oracle, scenes = FeatureCache(temporal_cache), FeatureCache(out), planned()
    assert set(oracle.index) == set(clip.index) and (out / "manifest.json").exists()
    for key in clip.index:
        times, duration = clip.get_times(key)
        got_times, got_duration = oracle.get_times(key)
        assert torch.equal(got_times, times) and got_duration == duration
        features = oracle.get(key).float().numpy()
        assert features.shape == tuple(clip.get(key).shape)
        unmixed = features @ np.linalg.pinv(mixing_matrix(features.shape[1]))
        truth = scene_state(scenes[key], times.numpy(), SETTINGS["size"])
        assert truth.shape[1] == STATE_WIDTH and np.abs(unmixed - truth).max() < 0.02


def test_the_tower_and_frame_flags_find_the_cache_extract_features_would_write(suite, temporal_cache, vision_file,
                                                                             tmp_path):
    tower = ["--clip_model", CLIP_MODEL, "--clip_image_size", str(CLIP_SIZE), "--clip_pretrained", str(vision_file)]
    cfg = VisionConfig(clip_model=CLIP_MODEL, clip_image_size=CLIP_SIZE, clip_pretrained=str(vision_file),
                       num_frames=CAP, frame_sampling="fps", sample_fps=SAMPLE_FPS)
    named = cache_folder(suite, cfg)
    with pytest.raises(SystemExit, match=f"{named.name}: no feature cache there"):
        oracle_features.main(["--data", str(suite), *tower, *SAMPLING, "--out", str(tmp_path / "a")])
    shutil.copytree(temporal_cache, named)
    try:
        oracle_features.main(["--data", str(suite), *tower, *SAMPLING, "--out", str(tmp_path / "by_flags")])
    finally:
        shutil.rmtree(named)
    oracle_features.main(["--data", str(suite), "--clip_features", str(temporal_cache), "--out", str(tmp_path / "given")])
    by_flags, given = FeatureCache(tmp_path / "by_flags"), FeatureCache(tmp_path / "given")
    assert set(by_flags.index) == set(given.index) == set(FeatureCache(temporal_cache).index)
    assert all(torch.equal(by_flags.get(k), given.get(k)) for k in given.index)


def test_a_suite_it_cannot_plan_again_or_a_cache_without_times_stops_it_in_one_line(suite, temporal_cache, tmp_path):
    old = tmp_path / "old_suite"
    old.mkdir()
    meta = json.loads((suite / "meta.json").read_text())
    del meta["plan"]
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="no 'plan'"):
        oracle_features.main(["--data", str(old), "--clip_features", str(temporal_cache), "--out", str(tmp_path / "a")])
    untimed = tmp_path / "untimed"
    writer, cache = FeatureWriter(untimed), FeatureCache(temporal_cache)
    for key in cache.index:
        writer.add(key, cache.get(key))
    writer.flush()
    with pytest.raises(SystemExit, match="without frame times"):
        oracle_features.main(["--data", str(suite), "--clip_features", str(untimed), "--out", str(tmp_path / "b")])
    shutil.rmtree(untimed)
    with pytest.raises(SystemExit, match="no feature cache"):
        oracle_features.main(["--data", str(suite), "--clip_features", str(untimed), "--out", str(tmp_path / "c")])
