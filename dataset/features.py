"""Feature cache: per-media frame CLS features (T, d) in fp16 safetensors shards with a manifest.

One folder per (encoder, frame count, frame sampling): <data dir>/features/<encoder tag>-f<T>/
for uniform sampling, <encoder tag>-f<T>-fps<F>/ for sampling at F frames a second, holding
shard_*.safetensors and manifest.json {media path: shard name}. Media paths are the jsonl's own
strings, so the cache moves with the dataset folder.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.checkpoint import atomic_write

MANIFEST = "manifest.json"


def cache_folder(data_dir, cfg) -> Path:
    """The cache folder for a VisionConfig's encoder, frame count and frame sampling."""
    from dataset.media import sampling_rate
    from model.vision import encoder_cache_tag
    fps = sampling_rate(cfg)
    sampling = "" if fps is None else f"-fps{fps:g}"
    return Path(data_dir) / "features" / f"{encoder_cache_tag(cfg)}-f{cfg.num_frames}{sampling}"


def open_cache(data_dir, cfg, feature_dir=None):
    """The cache for this encoder + frame sampling under data_dir (or feature_dir), None if absent or 'none'."""
    if feature_dir == "none":
        return None
    folder = Path(feature_dir) if feature_dir else cache_folder(data_dir, cfg)
    return FeatureCache(folder) if (folder / MANIFEST).exists() else None


class FeatureCache:
    """Read side: get(media path) → float16 (T, d) tensor, or None when not cached."""

    def __init__(self, folder):
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        self.index = json.loads(manifest.read_text()) if manifest.exists() else {}
        self._open = {}

    def __len__(self):
        return len(self.index)

    def __contains__(self, key):
        return key in self.index

    def get(self, key):
        shard = self.index.get(key)
        if shard is None:
            return None
        if shard not in self._open:   # opened lazily: a DataLoader worker opens its own handles
            self._open[shard] = safe_open(str(self.folder / shard), "pt")
        return self._open[shard].get_tensor(key)

    def __getstate__(self):   # handles do not cross process boundaries
        return {"folder": self.folder, "index": self.index, "_open": {}}


class FeatureWriter:
    """Write side: add() features, flushed to a new shard every `shard_size` items (and at close)."""

    def __init__(self, folder, shard_size: int = 4096):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index = FeatureCache(self.folder).index
        self.shard_size = shard_size
        self.pending = {}

    def add(self, key: str, features: torch.Tensor):
        self.pending[key] = features.to(torch.float16).contiguous().cpu()
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        taken = {p.name for p in self.folder.glob("shard_*.safetensors")} | set(self.index.values())
        number = len(taken)
        while f"shard_{number:05d}.safetensors" in taken:
            number += 1
        name = f"shard_{number:05d}.safetensors"
        atomic_write(self.folder / name, lambda tmp: save_file(self.pending, tmp))
        self.index.update({k: name for k in self.pending})
        # The manifest is written after its shard, so it never names a shard that is not there.
        atomic_write(self.folder / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(self.index)))
        self.pending = {}
