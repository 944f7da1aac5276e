"""What a run saves to continue exactly where it stopped: RNG states, the resume state, the run log's lines."""
import json
import random
from pathlib import Path

import numpy as np
import torch

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
