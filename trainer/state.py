"""What a run saves to continue exactly where it stopped: RNG states, the resume state, the run log's lines."""
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.atomic import atomic_write
from model.weights_io import CheckpointError, load_torch_file
from trainer.errors import PeerStopped, TrainingError

# What a resume state must agree on with the run resuming it: the data position and the per-rank
# RNG states mean nothing under another split of the data.
RESUME_KEYS = ("world_size", "batch_size", "accumulation_steps", "seed", "train_samples")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_log_lines(path) -> list:
    """The complete JSON lines of a run log (a last line cut short by a kill is dropped)."""
    if not Path(path).exists():
        return []
    lines = []
    for line in Path(path).read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        lines.append(line)
    return lines


# The counters a resume state carries besides the weights, the optimizer and the RNG states.
COUNTERS = ("step", "epoch", "batches_in_epoch", "skipped", "bad_steps", "bad_in_a_row")


def all_rng_states(world: int) -> list:
    """Every rank's RNG state, rank r's at index r (a collective: every rank calls it)."""
    states = [rng_state()]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, rng_state())
    return states


def read_resume_state(path: Path, settings: dict) -> dict:
    """The resume state at path, refused when the run that saved it had other RESUME_KEYS settings."""
    if not path.is_file():
        raise TrainingError(f"--resume: {path} not found")
    try:
        state = load_torch_file(path)   # weights_only: a resume file can run no code
    except CheckpointError as e:
        raise TrainingError(f"--resume: {e}") from None
    saved = state.get("run", {})
    clash = {k: (settings[k], saved.get(k)) for k in RESUME_KEYS if saved.get(k) != settings[k]}
    if clash:
        raise TrainingError(f"--resume: {path} was saved by a run with other settings "
                            f"(now, saved): {clash}")
    return state


def share_resume_state(path: Path, settings: dict, rank: int, world: int) -> dict:
    """Rank 0 reads the resume state and hands it to every rank (out_dir need not be shared between nodes)."""
    state, error = None, None
    if rank == 0:
        try:
            state = read_resume_state(path, settings)
        except TrainingError as e:
            error = str(e)
    if world > 1:
        box = [state, error]
        dist.broadcast_object_list(box, src=0)
        state, error = box
    if error:
        raise TrainingError(error) if rank == 0 else PeerStopped()
    return state


def restore_optimizer(state: dict, optimizer, scaler, path: Path):
    """The optimizer's (and fp16's loss scaler's) state from a resume state."""
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None:
        if "scaler" not in state:
            raise TrainingError(f"--resume: {path} was saved without fp16 loss scaling; "
                                f"resume with the --dtype it was trained with")
        scaler.load_state_dict(state["scaler"])


def write_resume_state(path: Path, model_state: dict, optimizer, scaler, counters: dict, rngs: list,
                       settings: dict):
    """Everything an exact resume needs, written atomically."""
    state = {"model": model_state, "optimizer": optimizer.state_dict(), **counters, "rng": rngs, "run": settings}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def trim_log(log_path: Path, step: int):
    """Drop the log lines written after the saved step (and a line a kill cut short)."""
    kept = [line for line in read_log_lines(log_path) if json.loads(line)["step"] <= step]
    atomic_write(log_path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
