"""Oracle features for the synthetic temporal suite: each clip's true scene state at its CLIP cache's frame times.

They are written in the feature cache's format, as wide as the CLIP features, so that the same
training and eval commands with --feature_dir OUT measure the summary, projector and LM as if the
tower saw perfectly (dataset/scene_state.py says what a frame's state holds). Only for suites made
by scripts/make_temporal.py: the scenes are planned again from meta.json's seed, counts and settings.

  python scripts/oracle_features.py --data dataset/synthetic_temporal --out dataset/synthetic_temporal/features/oracle \\
      <the tower and frame flags given to scripts/extract_features.py, which name its CLIP cache>
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import _repo  # noqa: F401  (puts the repository root on sys.path)
from dataset.features import (FeatureCache, FeatureWriter, add_cache_flags, cache_config, cache_folder, manifests,
                              merge_manifests)
from dataset.scene_state import oracle_features
from dataset.synthetic_temporal import Settings, plan_dataset, video_path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the temporal suite's folder (meta.json)")
    add_cache_flags(p)   # they name the suite's CLIP cache, as scripts/extract_features.py does
    p.add_argument("--clip_features", default=None,
                   help="the CLIP feature cache whose media, times and width to match (default: the one the "
                        "tower and frame flags name under --data); it must hold frame times")
    p.add_argument("--out", required=True, help="the oracle cache's folder (pass it as --feature_dir)")
    return p.parse_args(argv)


def planned_scenes(data: Path) -> tuple:
    """({media path: scene} of the suite, frame side), planned again from its meta.json."""
    meta = json.loads((data / "meta.json").read_text())
    if "plan" not in meta:
        sys.exit(f"error: {data}/meta.json has no 'plan' (made before it was kept): make the suite again")
    kept = {k: v for k, v in meta["settings"].items() if k in Settings.__dataclass_fields__}
    settings = Settings(**kept)
    _, train, test = plan_dataset(meta["seed"], meta["plan"]["n_videos"], meta["plan"]["n_test"], settings)
    if (len(train), len(test)) != (meta["counts"]["train_videos"], meta["counts"]["test_videos"]):
        sys.exit(f"error: {data}: planning its seed again gives other videos than meta.json counts "
                 f"(made by another version of the generator): make the suite again")
    return {video_path(v.scene): v.scene for v in train + test}, settings.size


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    scenes, size = planned_scenes(Path(args.data))
    folder = args.clip_features or cache_folder(args.data, cache_config(args))
    if not manifests(folder):
        sys.exit(f"error: {folder}: no feature cache there (scripts/extract_features.py with the same flags writes it)")
    cache = FeatureCache(folder)
    if not cache.has_times():
        sys.exit(f"error: {folder}: cached without frame times; extract them again")
    unknown = sorted(set(cache.index) - set(scenes))
    if unknown:
        sys.exit(f"error: {folder} holds {len(unknown)} media the suite does not plan, e.g. {unknown[0]}")
    writer = FeatureWriter(args.out)
    for key in sorted(cache.index):
        times, duration = cache.get_times(key)
        width = cache.shape(key)[-1]
        features = oracle_features(scenes[key], times.numpy(), size, width)
        writer.add(key, torch.from_numpy(features), times, duration)
    writer.flush()
    merge_manifests(args.out)
    print(f"oracle features of {len(cache)} media → {args.out} in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
