"""Precompute per-frame CLIP features (fp16) for every media item named in jsonl files, into the feature cache.

Resumable (a rerun does only what is missing) and splittable across ranks: torchrun, or --rank/--world_size.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

import _repo  # noqa: F401  (puts the repository root on sys.path)
from dataset.features import FeatureCache, FeatureWriter, add_cache_flags, cache_config, cache_folder, merge_manifests
from dataset.media import MediaError, read_clip, sampling_rate
from dataset.annotations import AnnotationStore
from dataset.tables import is_table
from model.vision import FrameEncoder


class MediaInputs(Dataset):
    """(key, (clip inputs, frame times, duration) or None, error) per media item: decoding and the tower's
    transform run in workers."""

    def __init__(self, items, root, num_frames, fps, preprocess):
        self.items, self.root, self.num_frames, self.preprocess = items, Path(root), num_frames, preprocess
        self.fps = fps

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        kind, key = self.items[i]
        try:
            clip = read_clip(self.root / key, kind, self.num_frames, self.fps)
            return key, (self.preprocess(clip.pixels), clip.times, clip.duration), None
        except MediaError as e:
            return key, None, str(e)


def collect_media(jsonl_paths):
    """Unique (kind, path) pairs in file order."""
    seen = {}
    for path in jsonl_paths:
        for kind, key in AnnotationStore(path).media_table():   # the store training then reuses
            seen.setdefault(key, kind)
    return [(kind, key) for key, kind in seen.items()]


def extract(items, root, encoder, writer, fps, num_frames, batch_size=32, num_workers=2):
    """Encode `items` ((kind, key) pairs) into the writer; returns (media done, frames, unreadable).

    Everything added is flushed shard by shard as it fills, so a killed run loses at most one
    unflushed shard; a rerun skips what the manifests already hold.
    """
    loader = DataLoader(MediaInputs(items, root, num_frames, fps, encoder.clip_inputs), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=list)
    done, frames, failed = 0, 0, 0
    for rows in loader:
        good = [(key, read) for key, read, error in rows if read is not None]
        for key, _, error in rows:
            if error:
                failed += 1
                print(f"warning: skipped {error}", file=sys.stderr)
        if good:
            features = encoder.encode_inputs(torch.cat([inputs for _, (inputs, _, _) in good]))
            for (key, (inputs, times, duration)), f in zip(good, features.split([len(x) for _, (x, _, _) in good])):
                writer.add(key, f, times, duration)
            done += len(good)
            frames += sum(len(x) for _, (x, _, _) in good)
    writer.flush()
    return done, frames, failed


def distributed_rank():
    """(rank, world, under torchrun) from the flags, else torchrun's environment, else a single process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return int(os.environ.get("RANK", 0)), world, world > 1 and "MASTER_ADDR" in os.environ


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", nargs="+", required=True, help="jsonl files, .parquet files or save_to_disk folders (media paths relative to --media_root)")
    p.add_argument("--media_root", default=None, help="default: the first jsonl's folder")
    add_cache_flags(p)
    p.add_argument("--out", default=None,
                   help="cache folder (default: <media_root>/features/<encoder>-f<T>[-fps<F>])")
    p.add_argument("--batch_size", type=int, default=32, help="media items per encoder batch")
    p.add_argument("--shard_size", type=int, default=4096, help="media items per shard file")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--rank", type=int, default=None,
                   help="this part of a split extraction (default: torchrun's RANK, else 0); parts run anywhere, "
                        "at once or one after another, and each writes its own shards and manifest")
    p.add_argument("--world_size", type=int, default=None, help="how many parts (default: torchrun's WORLD_SIZE, else 1)")
    p.add_argument("--merge", action="store_true",
                   help="only fold the parts' manifests into manifest.json (optional: readers see the parts too)")
    p.add_argument("--device", default=None, help="default: this rank's GPU if there is one, else cpu")
    return p.parse_args(argv)


def this_part(args):
    """(rank, world, under torchrun): the flags, else torchrun's environment."""
    env_rank, env_world, torchrun = distributed_rank()
    rank = env_rank if args.rank is None else args.rank
    world = env_world if args.world_size is None else args.world_size
    if not 0 <= rank < world:
        sys.exit(f"error: --rank {rank} is not in 0..{world - 1} (--world_size {world})")
    return rank, world, torchrun


def main(argv=None):
    args = parse_args(argv)
    missing = [d for d in args.data if not (Path(d).is_file() or is_table(d) and Path(d).exists())]
    if missing:
        sys.exit(f"error: {missing[0]}: no such file")
    root = Path(args.media_root) if args.media_root else Path(args.data[0]).parent
    cfg = cache_config(args)
    folder = Path(args.out) if args.out else cache_folder(root, cfg)
    if args.merge:
        print(f"features: {merge_manifests(folder)} media in {folder / 'manifest.json'}")
        return
    rank, world, torchrun = this_part(args)
    if torchrun:
        import torch.distributed as dist
        dist.init_process_group("gloo")   # only for the barrier before rank 0 merges
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    # Each part takes every world-th media of the full list, then drops what is cached already (with
    # its frame times: a cache from before they were kept gains them), so a rerun (even with another
    # --world_size) does only what is missing.
    cached = FeatureCache(folder).timed_keys()
    todo = [item for item in collect_media(args.data)[rank::world] if item[1] not in cached]
    try:
        encoder = FrameEncoder(cfg, device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    writer = FeatureWriter(folder, args.shard_size, part=f"r{rank}" if world > 1 else "")
    start = time.perf_counter()
    done, frames, failed = extract(todo, root, encoder, writer, sampling_rate(cfg), cfg.num_frames,
                                   args.batch_size, args.num_workers)
    seconds = time.perf_counter() - start
    part = f"part {rank + 1}/{world}: " if world > 1 else ""
    print(f"features: {part}{done} new media ({frames} frames, {frames / max(seconds, 1e-9):.0f} frames/s), "
          f"{failed} unreadable, {len(FeatureCache(folder))} cached in {folder}")
    if torchrun:
        dist.barrier()
        if rank == 0:
            merge_manifests(folder)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
