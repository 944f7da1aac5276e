"""Feature cache: per-media frame CLS features (T, d) in fp16 safetensors shards with manifests.

One folder per (encoder, frame count, frame sampling): <data dir>/features/<encoder tag>-f<T>/
for uniform sampling, <encoder tag>-f<T>-fps<F>/ for sampling at F frames a second. It holds
shards and manifests {media path: shard name}: manifest.json with shard_NNNNN.safetensors, and
per writer part (one per rank of a split extraction) manifest_<part>.json with
shard_<part>_NNNNN.safetensors. Readers take the union of all manifests, so the parts of an
extraction are usable before (or without) merging them into manifest.json. Media paths are the
jsonl's own strings, so the cache moves with the dataset folder.
"""
import glob
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.atomic import atomic_write, remove_stale_temps

MANIFEST = "manifest.json"


def manifest_name(part: str = "") -> str:
    return f"manifest_{part}.json" if part else MANIFEST


def manifests(folder) -> list:
    """manifest.json first, then the parts' manifests in name order (a later one wins a key)."""
    folder = Path(folder)
    main = [folder / MANIFEST] if (folder / MANIFEST).exists() else []
    return main + sorted(folder.glob("manifest_*.json"))


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
    return FeatureCache(folder) if manifests(folder) else None


def read_index(folder) -> dict:
    index = {}
    for path in manifests(folder):
        index.update(json.loads(path.read_text()))
    return index


def merge_manifests(folder) -> int:
    """Fold the parts' manifests into manifest.json (atomically) and remove them; returns the key count.

    A part still being written rewrites its manifest at its next flush, so nothing is lost either way.
    """
    folder = Path(folder)
    index = read_index(folder)
    parts = [p for p in manifests(folder) if p.name != MANIFEST]
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(index)))
    for path in parts:
        path.unlink(missing_ok=True)
    return len(index)


class FeatureCache:
    """Read side: get(media path) → float16 (T, d) tensor, or None when not cached."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
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
    """Write side: add() features, flushed to a new shard every `shard_size` items (and at close).

    part: names this writer's own shards and manifest (e.g. "r1" for rank 1 of a split extraction),
    so writers running at once in one folder never touch each other's files.
    """

    def __init__(self, folder, shard_size: int = 4096, part: str = ""):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = self.folder / manifest_name(part)
        self.shard_prefix = f"shard_{part}_" if part else "shard_"
        # Files this writer's earlier run left half-written when it was killed (never another part's).
        remove_stale_temps(self.folder, f"{self.shard_prefix}[0-9]*.safetensors")
        remove_stale_temps(self.folder, glob.escape(self.manifest.name))
        self.index = json.loads(self.manifest.read_text()) if self.manifest.exists() else {}
        self.shard_size = shard_size
        self.pending = {}

    def add(self, key: str, features: torch.Tensor):
        self.pending[key] = features.to(torch.float16).contiguous().cpu()
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        taken = {p.name for p in self.folder.glob(f"{self.shard_prefix}[0-9]*.safetensors")} | set(self.index.values())
        number = len(taken)
        while f"{self.shard_prefix}{number:05d}.safetensors" in taken:
            number += 1
        name = f"{self.shard_prefix}{number:05d}.safetensors"
        atomic_write(self.folder / name, lambda tmp: save_file(self.pending, tmp))
        self.index.update({k: name for k in self.pending})
        # The manifest is written after its shard, so it never names a shard that is not there.
        atomic_write(self.manifest, lambda tmp: Path(tmp).write_text(json.dumps(self.index)))
        self.pending = {}
