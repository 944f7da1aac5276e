"""Checkpoints: safetensors weights with the model config in the metadata; atomic writes; strict loads."""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.config import LMConfig, VisionConfig, config_from_dict, config_to_dict
from model.vlm import VideoLLM

TIED_KEY = "lm.lm_head.weight"   # the same tensor as lm.embed_tokens.weight; stored once


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def atomic_write(path, write_fn):
    """write_fn(tmp_path) then rename: a kill mid-write never leaves a half file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_fn(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_dir(path, write_fn):
    """write_fn(tmp_folder) then swap it in: readers see the old folder or the new one, never a half one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (path.with_name(f".{path.name}.{tag}{os.getpid()}") for tag in ("tmp", "old"))
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_fn(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(name: str, out_dir) -> Path:
    """A checkpoint given as a path, or as a name (with or without .safetensors) in out_dir."""
    for candidate in (Path(name), Path(out_dir) / name, Path(out_dir) / f"{name}.safetensors"):
        if candidate.is_file():
            return candidate
    held = sorted(p.name for p in Path(out_dir).glob("*.safetensors")) if Path(out_dir).is_dir() else []
    raise CheckpointError(f"{name}: no such checkpoint; {out_dir}/ holds: {', '.join(held) or 'nothing'}")


def save_checkpoint(model: VideoLLM, path, **info):
    """info: stage, step, tokenizer, ... (stored as strings in the safetensors metadata)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED_KEY}
    meta = {"lm_config": json.dumps(config_to_dict(model.lm_cfg)),
            "vision_config": json.dumps(config_to_dict(model.vision_cfg)),
            **{k: str(v) for k, v in info.items()}}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_metadata(path) -> dict:
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if "lm_config" in meta and "vision_config" not in meta:
        raise CheckpointError(f"{path}: a language-model-only file (no vision parts); "
                              "start training from it with --from_lm")
    if "lm_config" not in meta or "vision_config" not in meta:
        raise CheckpointError(f"{path}: safetensors file without our model config in its metadata")
    return meta


def load_checkpoint(path, device="cpu", **vision_overrides):
    """Build the model its metadata describes and load every tensor (missing or extra keys fail).

    vision_overrides may change fields that do not alter the weights (e.g. clip_pretrained).
    Returns (model, metadata).
    """
    meta = read_metadata(path)
    lm_cfg = config_from_dict(LMConfig, json.loads(meta["lm_config"]))
    vision = json.loads(meta["vision_config"])
    vision.update({k: v for k, v in vision_overrides.items() if v is not None})
    model = VideoLLM(lm_cfg, config_from_dict(VisionConfig, vision))
    load_weights(model, path)
    return model.to(device), meta


def load_weights(model: VideoLLM, path, parts=None):
    """Load tensors into the model strictly; `parts` limits it to submodules (e.g. ("lm",))."""
    state = load_file(str(path))
    expected = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    if parts:
        expected = {k: v for k, v in expected.items() if k.split(".")[0] in parts}
        state = {k: v for k, v in state.items() if k.split(".")[0] in parts}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        raise CheckpointError(f"{path}: does not fit the model — missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, shape mismatch {shapes[:5]}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])
