"""Precompute per-frame CLIP features (fp16) for every media item named in jsonl files, into the feature cache."""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset.features import FeatureCache, FeatureWriter, cache_folder  # noqa: E402
from dataset.media import SAMPLING_MODES, MediaError, read_media, sampling_rate  # noqa: E402
from dataset.vlm_dataset import as_list, read_jsonl  # noqa: E402
from model.config import VisionConfig  # noqa: E402
from model.vision import FrameEncoder  # noqa: E402


class MediaPixels(Dataset):
    """(key, pixels or None, error) per media item: decoding and preprocessing run in workers."""

    def __init__(self, items, root, num_frames, fps, preprocess):
        self.items, self.root, self.num_frames, self.preprocess = items, Path(root), num_frames, preprocess
        self.fps = fps

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        kind, key = self.items[i]
        try:
            return key, self.preprocess(read_media(self.root / key, kind, self.num_frames, self.fps)), None
        except MediaError as e:
            return key, None, str(e)


def collect_media(jsonl_paths):
    """Unique (kind, path) pairs in file order."""
    seen = {}
    for path in jsonl_paths:
        for _, record in read_jsonl(path):
            if isinstance(record, dict):
                for kind in ("image", "video"):
                    for key in as_list(record.get(kind)):
                        seen.setdefault(key, kind)
    return [(kind, key) for key, kind in seen.items()]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", nargs="+", required=True, help="jsonl files (media paths relative to --media_root)")
    p.add_argument("--media_root", default=None, help="default: the first jsonl's folder")
    p.add_argument("--clip_model", default=VisionConfig.clip_model)
    p.add_argument("--clip_pretrained", default=VisionConfig.clip_pretrained)
    p.add_argument("--clip_image_size", type=int, default=VisionConfig.clip_image_size)
    p.add_argument("--num_frames", type=int, default=VisionConfig.num_frames)
    p.add_argument("--frame_sampling", choices=SAMPLING_MODES, default=VisionConfig.frame_sampling,
                   help="uniform over the clip, or fps: --sample_fps a second, at most --num_frames")
    p.add_argument("--sample_fps", type=float, default=VisionConfig.sample_fps)
    p.add_argument("--out", default=None,
                   help="cache folder (default: <media_root>/features/<encoder>-f<T>[-fps<F>])")
    p.add_argument("--batch_size", type=int, default=32, help="media items per encoder batch")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    missing = [d for d in args.data if not Path(d).is_file()]
    if missing:
        sys.exit(f"error: {missing[0]}: no such file")
    root = Path(args.media_root) if args.media_root else Path(args.data[0]).parent
    cfg = VisionConfig(clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                       clip_image_size=args.clip_image_size, num_frames=args.num_frames,
                       frame_sampling=args.frame_sampling, sample_fps=args.sample_fps)
    try:
        fps = sampling_rate(cfg)
    except ValueError as e:
        sys.exit(f"error: --frame_sampling/--sample_fps: {e}")
    folder = Path(args.out) if args.out else cache_folder(root, cfg)
    todo = [item for item in collect_media(args.data) if item[1] not in FeatureCache(folder)]
    try:
        encoder = FrameEncoder(cfg, args.device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    writer = FeatureWriter(folder)
    loader = DataLoader(MediaPixels(todo, root, cfg.num_frames, fps, encoder.pixels), batch_size=args.batch_size,
                        num_workers=args.num_workers, collate_fn=list)
    start, frames, failed = time.perf_counter(), 0, 0
    for rows in loader:
        good = [(key, pixels) for key, pixels, error in rows if pixels is not None]
        for key, _, error in rows:
            if error:
                failed += 1
                print(f"warning: skipped {error}", file=sys.stderr)
        if good:
            feats = encoder.encode_pixels(torch.cat([px for _, px in good]))
            for (key, px), f in zip(good, feats.split([len(px) for _, px in good])):
                writer.add(key, f)
            frames += sum(len(px) for _, px in good)
    writer.flush()
    seconds = time.perf_counter() - start
    print(f"features: {len(todo) - failed} new media ({frames} frames, {frames / max(seconds, 1e-9):.0f} frames/s), "
          f"{failed} unreadable, {len(writer.index)} cached in {folder}")


if __name__ == "__main__":
    main()
