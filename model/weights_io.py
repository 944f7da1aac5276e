"""Reading weight files safely: safetensors metadata, torch files that run no code, and how a state dict misfits."""
import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(Exception):
    """A checkpoint or weights file that cannot be used; the message names the file and the problem."""


def read_safetensors_metadata(path) -> dict:
    """The string metadata of a safetensors file ({} when it has none)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{path}: not a readable safetensors file ({first})") from None


def stored_sizes(path) -> dict:
    """{tensor name: element count} of a safetensors file, read from its header (no tensor is loaded)."""
    with safe_open(str(path), "pt") as f:
        return {k: int(torch.Size(f.get_slice(k).get_shape()).numel()) for k in f.keys()}


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


def load_torch_state_dict(path, wrapper_prefixes=("module.",)) -> dict:
    """A .pt/.pth/.bin file's flat {name: tensor} state dict (inside {"state_dict": ...} too), with a
    prefix every key shares (a DDP or torch.compile wrapper's) removed; anything else is refused."""
    state = load_torch_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors, got {type(state).__name__}")
    for prefix in wrapper_prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def few(keys, n=6) -> str:
    """Up to n names, sorted, and how many there are in all."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" … ({len(keys)} in all)" if len(keys) > n else "")


def misfit(expected: dict, state: dict, spell=str) -> str:
    """How `state` fails to fit `expected` ({name: shape}): missing, unexpected and wrong-shaped keys,
    each named through `spell` (e.g. in the source file's own spelling); "" when it fits."""
    missing = [spell(k) for k in expected if k not in state]
    extra = [spell(k) for k in state if k not in expected]
    shapes = [f"{spell(k)} {tuple(state[k].shape)} (expected {tuple(shape)})"
              for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape)]
    return "; ".join(f"{label}: {few(keys)}" for label, keys in
                     (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)) if keys)
