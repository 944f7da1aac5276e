"""Real vision weights offline: download_vision.py's errors and listing, local tower files, open_clip preprocessing."""
import json
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import download_vision
from model.config import VisionConfig
from model.vision import FrameEncoder, VisionWeightsError, create_clip, region_means, register_local_configs, save_image_tower

from conftest import CLIP_MODEL, CLIP_SIZE

NON_SQUARE = [(180, 320), (160, 90)]   # (H, W): wide and tall frames


def noise_frames(height, width, count=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def tiny_cfg(path, size=CLIP_SIZE, model=CLIP_MODEL):
    return VisionConfig(clip_model=model, clip_image_size=size, clip_pretrained=str(path))


def exit_message(argv) -> str:
    with pytest.raises(SystemExit) as stop:
        download_vision.main(argv)
    return str(stop.value.code)


# ---------------------------------------------------------------- download_vision.py without a network

def test_download_failure_is_one_clear_line_and_writes_nothing(tmp_path, monkeypatch):
    def no_network(tag_cfg, cache_dir=None):
        raise ConnectionError("[Errno -2] Name or service not known")
    monkeypatch.setattr(download_vision, "fetch_checkpoint", no_network)
    out = tmp_path / "tower.safetensors"
    message = exit_message(["--clip_model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k", "--out", str(out)])
    assert message.startswith("error: ViT-B-32/laion2b_s34b_b79k: download failed (ConnectionError")
    assert "internet" in message and "\n" not in message
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unreachable_hub_fails_at_once_without_retries(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")   # the discard port: nothing listens
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("http_proxy", "https_proxy", "all_proxy"):   # a proxy would skip the reachability probe
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    out = tmp_path / "tower.safetensors"
    message = exit_message(["--clip_model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k", "--out", str(out)])
    assert "cannot reach 127.0.0.1:9" in message and "\n" not in message
    assert "Retry" not in capsys.readouterr().err and not out.exists()


def test_list_prints_open_clips_pretrained_tags(capsys):
    download_vision.main(["--clip_model", "ViT-B-32", "--list"])
    printed = capsys.readouterr().out.split()
    assert printed == open_clip.list_pretrained_tags_by_model("ViT-B-32") and "laion2b_s34b_b79k" in printed


@pytest.mark.parametrize("argv, expected", [
    (["--clip_model", "ViT-B-32", "--pretrained", "no_such_tag"], "no pretrained tag 'no_such_tag'"),
    (["--clip_model", "ViT-B-32", "--pretrained", "openai"], "use --clip_model ViT-B-32-quickgelu"),
    (["--clip_model", "No-Such-Model", "--list"], "unknown open_clip model"),
])
def test_bad_model_or_tag_is_refused_before_any_download(tmp_path, monkeypatch, argv, expected):
    def must_not_download(*args, **kwargs):
        raise AssertionError("tried to download")
    monkeypatch.setattr(download_vision, "fetch_checkpoint", must_not_download)
    message = exit_message([*argv, "--out", str(tmp_path / "x.safetensors")])
    assert expected in message and "\n" not in message


# ---------------------------------------------------------------- a tower file written like a downloaded one

@pytest.fixture(scope="module")
def tiny_clip():
    """A seeded tiny CLIP built with a tag-like preprocessing that differs from the architecture default."""
    register_local_configs()   # ViT-Tiny-16 lives in model/vision_model/
    torch.manual_seed(1)
    model, _, preprocess = open_clip.create_model_and_transforms(
        CLIP_MODEL, force_image_size=CLIP_SIZE, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25),
        image_interpolation="bilinear", image_resize_mode="squash")
    return model.eval(), preprocess


@pytest.fixture(scope="module")
def tower_file(tiny_clip, tmp_path_factory):
    path = tmp_path_factory.mktemp("tower") / "tiny-tag.safetensors"
    save_image_tower(tiny_clip[0], path, clip_model=CLIP_MODEL, pretrained="tiny_tag", random_init="false")
    return path


def test_tower_file_holds_only_visual_weights_and_names_its_source(tiny_clip, tower_file):
    with safe_open(str(tower_file), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert keys == {f"visual.{k}" for k in tiny_clip[0].visual.state_dict()}
    assert (meta["clip_model"], meta["pretrained"], meta["image_size"], meta["random_init"]) == \
        (CLIP_MODEL, "tiny_tag", str(CLIP_SIZE), "false")
    stored = json.loads(meta["preprocess_cfg"])
    assert stored["mean"] == [0.5, 0.5, 0.5] and stored["resize_mode"] == "squash"


def test_tower_file_loads_strictly_and_gives_the_source_models_features(tiny_clip, tower_file):
    model, preprocess = tiny_clip
    encoder = FrameEncoder(tiny_cfg(tower_file))
    frames = noise_frames(*NON_SQUARE[0])
    with torch.no_grad():
        expected = model.visual(torch.stack([preprocess(Image.fromarray(f)) for f in frames]))
    torch.testing.assert_close(encoder.encode(frames), expected, rtol=1e-5, atol=1e-5)
    assert not encoder.is_random and encoder.dim == model.visual.output_dim


@pytest.mark.parametrize("height, width", NON_SQUARE)
def test_tower_file_brings_its_tags_preprocessing_offline(tiny_clip, tower_file, height, width):
    frames = noise_frames(height, width)
    pixels = FrameEncoder(tiny_cfg(tower_file)).clip_inputs(frames)
    expected = torch.stack([tiny_clip[1](Image.fromarray(f)) for f in frames])
    assert pixels.shape == (2, 3, CLIP_SIZE, CLIP_SIZE)
    assert torch.equal(pixels, expected)


def test_tower_file_missing_a_weight_is_refused_in_one_line(tower_file, tmp_path):
    state = load_file(str(tower_file))
    with safe_open(str(tower_file), "pt") as f:
        meta = f.metadata()
    state.pop(sorted(state)[0])
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken), metadata=meta)
    with pytest.raises(VisionWeightsError) as error:
        FrameEncoder(tiny_cfg(broken))
    assert str(broken) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("cfg_change, expected", [
    ({"model": "ViT-S-32"}, f"pass --clip_model {CLIP_MODEL}"),
    ({"size": 48}, f"pass --clip_image_size {CLIP_SIZE}"),
])
def test_tower_file_for_another_model_or_size_is_refused(tower_file, cfg_change, expected):
    with pytest.raises(VisionWeightsError, match=expected):
        FrameEncoder(tiny_cfg(tower_file, **cfg_change))


# ---------------------------------------------------------------- preprocessing = open_clip's own transform

@pytest.mark.parametrize("height, width", NON_SQUARE)
def test_pixels_match_open_clips_preprocess_for_non_square_frames(frame_encoder, height, width):
    _, _, preprocess = open_clip.create_model_and_transforms(CLIP_MODEL, force_image_size=CLIP_SIZE)
    frames = noise_frames(height, width, seed=height)
    expected = torch.stack([preprocess(Image.fromarray(f)) for f in frames])
    pixels = frame_encoder.clip_inputs(frames)
    assert pixels.shape == (2, 3, CLIP_SIZE, CLIP_SIZE) and torch.equal(pixels, expected)


def test_default_preprocess_crops_the_centre_of_a_wide_frame(frame_encoder):
    # Shortest-side resize + centre crop: the outer thirds of a 3:1 frame never reach the tower.
    frame = np.zeros((1, 60, 180, 3), np.uint8)
    frame[:, :, 40:140] = 255   # the centre 60..120 plus a margin for the resize kernel
    pixels = frame_encoder.clip_inputs(frame)
    white = frame_encoder.clip_inputs(np.full((1, 60, 180, 3), 255, np.uint8))
    torch.testing.assert_close(pixels, white)


def test_hub_tag_with_the_wrong_activation_is_refused():
    with pytest.raises(VisionWeightsError, match="QuickGELU"):
        create_clip("ViT-B-32", pretrained_tag="openai")


# ---------------------------------------------------------------- region features beside the CLS

def test_region_means_average_each_cell_of_the_patch_grid_row_by_row():
    grid = torch.arange(16.0).reshape(4, 4)   # patch (r, c) holds 4r + c
    tokens = torch.stack([grid.flatten(), -grid.flatten()], dim=-1)[None]   # (1, 16 patches, 2)
    cells = region_means(tokens, 2)
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]]).flatten()   # top left, top right, bottom left, bottom right
    assert cells.shape == (1, 4, 2)
    torch.testing.assert_close(cells[0, :, 0], expected)
    torch.testing.assert_close(cells[0, :, 1], -expected)


def test_region_features_are_the_cls_then_each_regions_projected_patch_mean(tiny_clip, tower_file):
    model = tiny_clip[0]
    plain, regional = FrameEncoder(tiny_cfg(tower_file)), FrameEncoder(replace(tiny_cfg(tower_file), clip_regions=2))
    frames = noise_frames(*NON_SQUARE[0])
    features = regional.encode(frames)
    width = model.visual.output_dim
    assert regional.dim == 5 * width and features.shape == (2, 5 * width)
    torch.testing.assert_close(features[:, :width], plain.encode(frames))
    with torch.no_grad():   # the tiny tower at 32 px has 2 x 2 patches: each region is one patch
        x = plain.clip_inputs(frames)
        tokens = model.visual.ln_post(model.visual.transformer(model.visual._embeds(x)))[:, 1:]
    torch.testing.assert_close(features[:, width:].reshape(2, 4, width), tokens @ model.visual.proj,
                               rtol=1e-5, atol=1e-5)
    assert regional.cache_tag != plain.cache_tag   # the cache keeps the two kinds apart


def test_more_regions_than_patches_is_refused_in_one_line(tower_file):
    with pytest.raises(VisionWeightsError) as error:
        FrameEncoder(replace(tiny_cfg(tower_file), clip_regions=3)).encode(noise_frames(40, 40))
    assert "clip_regions 3" in str(error.value) and "\n" not in str(error.value)
