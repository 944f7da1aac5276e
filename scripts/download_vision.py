"""Fetch open_clip pretrained weights once (needs internet) and keep the image tower as a local file for offline runs.

    python scripts/download_vision.py --clip_model ViT-B-32 --pretrained laion2b_s34b_b79k
    python scripts/download_vision.py --clip_model ViT-B-32 --list

The file (model/vision_model/<model>-<tag>.safetensors by default) holds the `visual.*` weights
and, in its metadata, the model name, the tag, the input size and the tag's own preprocessing
(mean/std, interpolation, resize mode), so later runs pass `--clip_pretrained <file>` and see
exactly what the tag would have given them, without a network.
"""
import argparse
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import getproxies

import _repo  # noqa: F401  (puts the repository root on sys.path)
from model.vision import (VISION_DIR, VisionWeightsError, check_pretrained_tag, create_clip,
                          register_local_configs, save_image_tower)


REACH_TIMEOUT_S = 10


class DownloadError(Exception):
    """The weights could not be fetched; the message says what and why in one line."""


def download_address(tag_cfg: dict) -> str:
    """Where open_clip will fetch this tag from: the Hugging Face endpoint if the tag has a hub repo, else its URL."""
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import constants
        return constants.ENDPOINT
    return tag_cfg.get("url", "")


def fetch_checkpoint(tag_cfg: dict, cache_dir=None) -> str:
    """The tag's checkpoint file from open_clip's cache or a download; fails at once if the host is unreachable."""
    import open_clip.pretrained
    from huggingface_hub import constants
    address = urlparse(download_address(tag_cfg))
    if not address.hostname:
        raise ValueError("open_clip names no download location for this tag")
    offline = tag_cfg.get("hf_hub") and constants.HF_HUB_OFFLINE   # the hub cache answers, no network asked
    behind_proxy = address.scheme in getproxies()                 # only the proxy knows whether the host is there
    if not offline and not behind_proxy:
        # Without this, huggingface_hub retries for about a minute and prints every retry.
        port = address.port or (443 if address.scheme == "https" else 80)
        try:
            socket.create_connection((address.hostname, port), timeout=REACH_TIMEOUT_S).close()
        except OSError as e:
            raise ConnectionError(f"cannot reach {address.hostname}:{port} ({e})") from None
    return open_clip.pretrained.download_pretrained(tag_cfg, cache_dir=cache_dir)


def download_tower(model_name: str, tag: str, out_path: str, cache_dir=None):
    """Fetch model_name/tag and write its image tower to out_path."""
    what = f"{model_name}/{tag}"
    tag_cfg = check_pretrained_tag(model_name, tag)
    try:
        fetch_checkpoint(tag_cfg, cache_dir)
    except Exception as e:   # urllib, requests, httpx and huggingface_hub each raise their own kinds
        reason = (str(e).splitlines() or [""])[0][:160]
        raise DownloadError(f"{what}: download failed ({type(e).__name__}: {reason}); it needs internet access "
                            f"(Hugging Face or GitHub): run it where there is one, then copy the file here") from None
    # Built through open_clip with the tag (now in its cache), so weights and transform are the tag's own.
    model, _ = create_clip(model_name, pretrained_tag=tag, cache_dir=cache_dir)
    save_image_tower(model, out_path, clip_model=model_name, pretrained=tag, random_init="false")
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip_model", default="ViT-B-32", help="open_clip architecture name")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (see --list)")
    p.add_argument("--list", action="store_true", help="print the model's pretrained tags and exit")
    p.add_argument("--out", default=None, help="default: model/vision_model/<model>-<tag>.safetensors")
    p.add_argument("--cache_dir", default=None, help="where open_clip keeps the full download (default: its own)")
    args = p.parse_args(argv)
    import open_clip
    register_local_configs()
    if args.clip_model not in open_clip.list_models():
        sys.exit(f"error: unknown open_clip model {args.clip_model!r}")
    if args.list:
        tags = open_clip.list_pretrained_tags_by_model(args.clip_model)
        print("\n".join(tags) if tags else f"{args.clip_model}: no pretrained tags in open_clip")
        return
    if not args.pretrained:
        sys.exit("error: --pretrained TAG is required (see --list)")
    out = args.out or str(VISION_DIR / f"{args.clip_model}-{args.pretrained}.safetensors")
    if Path(out).exists():
        print(f"{out} exists; keeping it")
    else:
        try:
            model = download_tower(args.clip_model, args.pretrained, out, args.cache_dir)
        except (DownloadError, VisionWeightsError) as e:
            sys.exit(f"error: {e}")
        size = model.visual.preprocess_cfg["size"]
        print(f"{args.clip_model}/{args.pretrained} image tower ({size} px, {model.visual.output_dim}-d) → {out}")
    print(f"use it offline with: --clip_model {args.clip_model} --clip_pretrained {out}")


if __name__ == "__main__":
    main()
