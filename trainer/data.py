"""The training and validation datasets, the frozen encoder when features are not cached, and the feature statistics."""
import sys
from functools import partial
from pathlib import Path

import numpy as np

from dataset.features import open_cache
from dataset.media import sampling_rate
from dataset.vlm_dataset import ConversationDataset, visual_inputs
from model.config import VisionConfig
from model.video_summary import media_slot_counts
from model.vision import FrameEncoder
from trainer.errors import TrainingError


def make_datasets(args, cfg: VisionConfig, chat, device, rank, fresh: bool):
    """Train/val datasets, and the frozen encoder if any media is missing from the feature cache.

    Fixes cfg.clip_dim from the encoder (or the cached features) for a fresh model.
    """
    data_dir = Path(args.media_root) if args.media_root else Path(args.data_path).parent
    cache = open_cache(data_dir, cfg, args.feature_dir)
    common = dict(chat=chat, num_frames=cfg.num_frames, max_len=args.max_len, media_root=args.media_root,
                  cache=cache, fps=sampling_rate(cfg), need_times=cfg.reads_frame_times,
                  slot_counts=partial(media_slot_counts, cfg))
    train = ConversationDataset(args.data_path, **common)
    if args.val_path:
        val = ConversationDataset(args.val_path, **common)
    else:   # a seeded hold-out from the training rows
        val = ConversationDataset(args.data_path, **common)
        train.rows, val.rows = hold_out(train.rows, args.seed, args.val_samples)
    keys = train.media_keys() | val.media_keys()
    missing = train.uncached() | val.uncached()
    encoder = None
    if missing:
        if rank == 0:
            print(f"{len(missing)} of {len(keys)} media not in the feature cache: CLIP runs online "
                  f"(scripts/extract_features.py makes a cache)", file=sys.stderr)
        encoder = FrameEncoder(cfg, device)
        train.preprocess = val.preprocess = encoder.clip_inputs
    dim = encoder.dim if encoder else (cache.get(next(iter(keys))).shape[-1] if keys else cfg.clip_dim)
    if fresh:
        cfg.clip_dim = dim
    elif dim != cfg.clip_dim:
        raise TrainingError(f"the checkpoint expects {cfg.clip_dim}-d CLIP features, the encoder/cache gives {dim}")
    return train, val, encoder


def hold_out(rows: np.ndarray, seed: int, val_samples: int) -> tuple:
    """(training rows, validation rows), each in file order: a seeded tenth at most, val_samples at most."""
    order = np.random.default_rng(seed).permutation(len(rows))
    held = np.zeros(len(rows), bool)
    held[order[:min(val_samples, len(rows) // 10)]] = True
    return rows[~held], rows[held]


def fit_feature_stats(model, dataset, encoder, seed, max_items=256):
    """Measure the CLIP feature statistics VideoSummary standardises with, on a seeded sample."""
    order = np.random.default_rng(seed).permutation(len(dataset))[:max_items]
    media = [m for i in order for m in dataset[int(i)].get("media", [])]
    if not media:
        return
    features, mask, _ = visual_inputs(media, encoder)
    model.summary.input_norm.fit(features[mask])

