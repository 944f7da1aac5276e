"""Feature cache: per-media frame CLS features (T, d) in fp16 safetensors shards with manifests.

One folder per (encoder, frame count, frame sampling): <data dir>/features/<encoder tag>-f<T>/
for uniform sampling, <encoder tag>-f<T>-fps<F>/ for sampling at F frames a second. It holds
shards and manifests {media path: shard name}: manifest.json with shard_NNNNN.safetensors, and
per writer part (one per rank of a split extraction) manifest_<part>.json with
shard_<part>_NNNNN.safetensors. Readers take the union of all manifests, so the parts of an
extraction are usable before (or without) merging them into manifest.json. Media paths are the
jsonl's own strings, so the cache moves with the dataset folder.

Beside each media's features (T, d) a shard holds, under TIMES + path, the time in seconds of each
sampled frame and then the file's duration ((T + 1,) float32), so the model sees the clock of the
frames it reads. Caches written before times were kept have none: get_times gives None.
"""
import glob
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from model.atomic import atomic_write, remove_stale_temps, write_safetensors

MANIFEST = "manifest.json"
TIMES = "@times/"   # tensor-name prefix of a media's frame times; media paths never start with it


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


def add_cache_flags(p) -> None:
    """The flags that name a cache: the encoder and how frames are sampled (scripts/extract_features.py's)."""
    from dataset.media import SAMPLING_MODES
    from model.config import VisionConfig
    p.add_argument("--clip_model", default=VisionConfig.clip_model)
    p.add_argument("--clip_pretrained", default=VisionConfig.clip_pretrained)
    p.add_argument("--clip_image_size", type=int, default=VisionConfig.clip_image_size)
    p.add_argument("--clip_regions", type=int, default=VisionConfig.clip_regions,
                   help="0: each frame's CLS feature; g > 0: also its patch tokens averaged over a g x g grid")
    p.add_argument("--num_frames", type=int, default=VisionConfig.num_frames)
    p.add_argument("--frame_sampling", choices=SAMPLING_MODES, default=VisionConfig.frame_sampling,
                   help="uniform over the clip, or fps: --sample_fps a second, at most --num_frames")
    p.add_argument("--sample_fps", type=float, default=VisionConfig.sample_fps)


def cache_config(args):
    """The VisionConfig of add_cache_flags' flags; exits with one line if the sampling is invalid."""
    from dataset.media import sampling_rate
    from model.config import VisionConfig
    cfg = VisionConfig(clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                       clip_image_size=args.clip_image_size, clip_regions=args.clip_regions, num_frames=args.num_frames,
                       frame_sampling=args.frame_sampling, sample_fps=args.sample_fps)
    try:
        sampling_rate(cfg)
    except ValueError as e:
        sys.exit(f"error: --frame_sampling/--sample_fps: {e}")
    return cfg


def open_cache(data_dir, cfg, feature_dir=None):
    """The cache for this encoder + frame sampling under data_dir (or feature_dir), None if absent or 'none'.

    A model that reads frame times (time_encoding "seconds") gets None from a cache written without
    them, with a note: its media are then encoded online, times and all.
    """
    if feature_dir == "none":
        return None
    folder = Path(feature_dir) if feature_dir else cache_folder(data_dir, cfg)
    cache = FeatureCache(folder) if manifests(folder) else None
    if cache is not None and cfg.reads_frame_times and not cache.has_times():
        print(f"note: {folder}: features cached without frame times, which this model reads; CLIP runs "
              f"online (scripts/extract_features.py writes a cache with times)", file=sys.stderr)
        return None
    return cache


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
        shard = self._shard(key)
        return None if shard is None else shard[0].get_tensor(key)

    def shape(self, key) -> tuple:
        """The (T, d) of a media's cached features, read from the shard's header, not its data."""
        return tuple(self._shard(key)[0].get_slice(key).get_shape())

    def has_times(self) -> bool:
        """Whether this cache keeps the frame times of every media (caches written before they were kept do not)."""
        return self.timed_keys() == set(self.index)

    def timed_keys(self) -> set:
        """The media whose frame times are cached beside their features."""
        by_shard = {}
        for key, name in self.index.items():
            by_shard.setdefault(name, []).append(key)
        timed = set()
        for name, keys in by_shard.items():
            stored = self._shard(keys[0])[1]
            timed.update(key for key in keys if TIMES + key in stored)
        return timed

    def get_times(self, key):
        """(frame times (T,), duration) in seconds, or None when not cached or cached without times."""
        shard = self._shard(key)
        if shard is None or TIMES + key not in shard[1]:
            return None
        clock = shard[0].get_tensor(TIMES + key)
        return clock[:-1], float(clock[-1])

    def _shard(self, key):
        """(open handle, set of its tensor names) of the shard holding `key`, or None; the names are read
        once, since looking one up is on every sample's path."""
        name = self.index.get(key)
        if name is None:
            return None
        if name not in self._open:   # opened lazily: a DataLoader worker opens its own handles
            handle = safe_open(str(self.folder / name), "pt")
            self._open[name] = (handle, set(handle.keys()))
        return self._open[name]

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
        self.pending, self.pending_media = {}, 0

    def add(self, key: str, features: torch.Tensor, times=None, duration: float = 0.0):
        """Cache one media's features (T, d) and, if given and known (finite), its frame times (T,) and
        duration in seconds."""
        if key.startswith(TIMES):
            raise ValueError(f"{key}: media paths may not start with {TIMES!r}")
        self.pending[key] = features.to(torch.float16).contiguous().cpu()
        if times is not None and bool(torch.isfinite(torch.as_tensor(times, dtype=torch.float32)).all()):
            clock = torch.cat([torch.as_tensor(times, dtype=torch.float32).flatten(), torch.tensor([float(duration)])])
            self.pending[TIMES + key] = clock
        self.pending_media += 1
        if self.pending_media >= self.shard_size:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        taken = {p.name for p in self.folder.glob(f"{self.shard_prefix}[0-9]*.safetensors")} | set(self.index.values())
        number = len(taken)
        while f"{self.shard_prefix}{number:05d}.safetensors" in taken:
            number += 1
        name = f"{self.shard_prefix}{number:05d}.safetensors"
        write_safetensors(self.folder / name, self.pending)
        self.index.update({k: name for k in self.pending if not k.startswith(TIMES)})
        # The manifest is written after its shard, so it never names a shard that is not there.
        atomic_write(self.manifest, lambda tmp: Path(tmp).write_text(json.dumps(self.index)))
        self.pending, self.pending_media = {}, 0
