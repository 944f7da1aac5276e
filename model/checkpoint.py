"""Checkpoints: safetensors weights with the model config in the metadata; atomic writes; strict loads."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.atomic import write_safetensors
from model.config import LMConfig, VisionConfig, config_from_dict, config_to_dict
from model.vlm import VideoLLM
from model.weights_io import CheckpointError, misfit, read_safetensors_metadata

TIED_KEY = "lm.lm_head.weight"   # the same tensor as lm.embed_tokens.weight; stored once


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
    write_safetensors(path, state, meta)


def read_metadata(path) -> dict:
    """A checkpoint's metadata; CheckpointError unless it carries both our configs."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    meta = read_safetensors_metadata(path)
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
    problems = misfit({k: v.shape for k, v in expected.items()}, state)
    if problems:
        raise CheckpointError(f"{path}: does not fit the model — {problems}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])
