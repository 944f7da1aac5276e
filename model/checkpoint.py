"""Checkpoints: safetensors weights with the model config in the metadata; atomic writes; strict loads."""
import json
import os
import shutil
import pickle
import re
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
    """write_fn(tmp_path) then rename: a kill mid-write never leaves a half file under `path`.

    A SIGKILL can leave the hidden temp file (.<name>.tmp<pid>) beside it; remove_stale_temps clears it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_fn(str(tmp))
        with open(tmp, "rb+") as f:   # on disk before the rename makes it visible (power loss, not only kills)
            os.fsync(f.fileno())
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


def remove_stale_temps(folder, name_glob: str) -> list:
    """Delete the temp files atomic_write left in `folder` for targets matching name_glob (glob.escape a
    plain name) when their writer was killed; the temp file of a live writer on this machine stays."""
    removed = []
    for tmp in Path(folder).glob(f".{name_glob}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def load_torch_file(path):
    """torch.load with weights_only=True: tensors and plain containers only. A file carrying pickled
    code or objects is refused before anything in it runs (CheckpointError names the file and the global)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as e:
        if re.search(r"Unsupported operand|String is too long|invalid load key", str(e)):   # not a pickle at all
            raise CheckpointError(f"{path}: not a readable PyTorch file (not a pickle stream)") from None
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused — it holds pickled code or objects{what}, not only tensors; "
                              "it was not run") from None
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {first})") from None


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
