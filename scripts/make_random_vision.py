"""Write a seeded random-init open_clip image tower to a local weights file (the offline stand-in for real CLIP)."""
import argparse
import sys
from pathlib import Path

import _repo  # noqa: F401  (puts the repository root on sys.path)
from model.vision import VISION_DIR, save_random_tower


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clip_model", default="ViT-Demo-16", help="open_clip architecture (or a json in model/vision_model/)")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: model/vision_model/<model>-<size>-random-seed<seed>.safetensors")
    args = p.parse_args()
    out = args.out or str(VISION_DIR / f"{args.clip_model}-{args.image_size}-random-seed{args.seed}.safetensors")
    if Path(out).exists():
        print(f"{out} exists; keeping it")
        return
    try:
        save_random_tower(args.clip_model, args.image_size, args.seed, out)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"random {args.clip_model} tower (seed {args.seed}, {args.image_size}px) → {out}")


if __name__ == "__main__":
    main()
