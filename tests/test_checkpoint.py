"""Checkpoints: safetensors round trip with config + metadata, strict loads, clear errors, atomic writes."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.checkpoint import CheckpointError, TIED_KEY, load_checkpoint, load_weights, save_checkpoint


def outputs(model):
    torch.manual_seed(5)
    ids = torch.randint(4, 64, (2, 9))
    ids[:, 2:4] = model.vision_cfg.vision_token_id
    frames = torch.randn(2, 4, model.vision_cfg.clip_dim)
    return model(ids, features=frames, frame_mask=torch.ones(2, 4, dtype=torch.bool))


def test_round_trip_gives_identical_outputs_and_keeps_the_config(tmp_path, make_vlm):
    model = make_vlm(summary="mean", num_heads=4, num_kv_heads=2)
    path = tmp_path / "sft_video_32.safetensors"
    save_checkpoint(model, path, stage="video", step=7, tokenizer="model/tokenizer")
    loaded, meta = load_checkpoint(path)
    assert loaded.lm_cfg == model.lm_cfg and loaded.vision_cfg == model.vision_cfg
    assert torch.equal(outputs(loaded.eval()), outputs(model))
    assert meta["stage"] == "video" and meta["step"] == "7" and meta["tokenizer"] == "model/tokenizer"
    assert json.loads(meta["lm_config"])["num_kv_heads"] == 2


def test_tied_head_is_stored_once_and_tied_after_loading(tmp_path, make_vlm):
    path = tmp_path / "m.safetensors"
    save_checkpoint(make_vlm(), path)
    with safe_open(str(path), "pt") as f:
        assert TIED_KEY not in f.keys() and "lm.embed_tokens.weight" in f.keys()
    loaded, _ = load_checkpoint(path)
    assert loaded.lm.lm_head.weight is loaded.lm.embed_tokens.weight


def test_vision_overrides_change_only_the_named_field(tmp_path, make_vlm):
    path = tmp_path / "m.safetensors"
    save_checkpoint(make_vlm(), path)
    loaded, _ = load_checkpoint(path, clip_pretrained="/elsewhere/vit.safetensors")
    assert loaded.vision_cfg.clip_pretrained == "/elsewhere/vit.safetensors"
    assert loaded.vision_cfg.num_visual_tokens == 2


def test_loading_into_another_shape_names_the_key(tmp_path, make_vlm):
    path = tmp_path / "m.safetensors"
    save_checkpoint(make_vlm(vocab_size=64), path)
    with pytest.raises(CheckpointError, match=r"lm\.embed_tokens\.weight") as error:
        load_weights(make_vlm(vocab_size=80), path)
    assert str(path) in str(error.value)


def test_loading_into_another_architecture_names_missing_keys(tmp_path, make_vlm):
    path = tmp_path / "m.safetensors"
    save_checkpoint(make_vlm(summary="mean"), path)
    with pytest.raises(CheckpointError, match="summary"):
        load_weights(make_vlm(summary="temporal"), path)


def test_partial_load_touches_only_the_named_parts(tmp_path, make_vlm):
    source, target = make_vlm(seed=0), make_vlm(seed=1)
    path = tmp_path / "m.safetensors"
    save_checkpoint(source, path)
    projector_before = target.projector[0].weight.clone()
    load_weights(target, path, parts=("lm",))
    assert torch.equal(target.lm.embed_tokens.weight, source.lm.embed_tokens.weight)
    assert torch.equal(target.projector[0].weight, projector_before)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x80\x04\x95pickle"])
def test_a_file_that_is_not_safetensors_is_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_safetensors_without_our_config_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="config"):
        load_checkpoint(path)


def test_a_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_saving_leaves_no_temporary_files_and_overwrites_in_place(tmp_path, make_vlm):
    path = tmp_path / "ckpt" / "m.safetensors"
    save_checkpoint(make_vlm(seed=0), path, step=1)
    save_checkpoint(make_vlm(seed=1), path, step=2)
    assert os.listdir(path.parent) == ["m.safetensors"]
    assert load_checkpoint(path)[1]["step"] == "2"


def test_a_failed_write_leaves_the_old_checkpoint_and_no_temp_file(tmp_path, make_vlm, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_checkpoint(make_vlm(), path, step=1)

    def broken(self, data):
        open(self, "wb").write(data[:4])
        raise OSError("disk full")
    monkeypatch.setattr(Path, "write_bytes", broken)
    with pytest.raises(OSError):
        save_checkpoint(make_vlm(seed=3), path, step=2)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert load_checkpoint(path)[1]["step"] == "1"
