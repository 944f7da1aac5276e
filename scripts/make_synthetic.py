"""Generate the synthetic coloured-shapes dataset (mp4 videos, png images, jsonl splits, meta.json) into --out."""
import argparse
import time

import _repo  # noqa: F401  (puts the repository root on sys.path)
from dataset.synthetic import even_size, generate, int_at_least


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n_videos", type=int_at_least(1), required=True, help="training videos")
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--n_images", type=int_at_least(0), default=None, help="default: n_videos")
    parser.add_argument("--n_test", type=int_at_least(1), default=None, help="default: max(60, n_videos // 5)")
    parser.add_argument("--size", type=even_size, default=128, help="frame side in pixels")
    parser.add_argument("--frames", type=int_at_least(4), default=16, help="frames per video")
    parser.add_argument("--fps", type=int_at_least(1), default=8)
    parser.add_argument("--workers", type=int_at_least(1), default=2)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    meta = generate(
        args.out, args.n_videos, args.seed, args.n_images, args.n_test, args.size, args.frames, args.fps, args.workers
    )
    counts = meta["counts"]
    print(
        f"wrote {counts['train_videos']} train videos, {counts['test_videos']} test videos "
        f"({counts['novel_combo_test_videos']} novel_combo), {counts['images']} images, "
        f"{counts['pretrain_samples']} pretrain / {counts['sft_image_samples']} sft_image / "
        f"{counts['sft_video_samples']} sft_video / {counts['test_samples']} test samples "
        f"to {args.out} in {time.perf_counter() - started:.1f}s"
    )


if __name__ == "__main__":
    main()
