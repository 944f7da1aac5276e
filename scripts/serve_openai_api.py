"""Serve a checkpoint over an OpenAI-compatible API: chat completions with video and images, streamed or not,
requests batched together under load (the library: serve/openai_api.py).

    python scripts/serve_openai_api.py --weight sft_video_128          # → http://127.0.0.1:8998/v1
"""
import _repo  # noqa: F401  (puts the repository root on sys.path)
import argparse
import sys
from pathlib import Path

import torch

from model.checkpoint import find_checkpoint
from model.engine import INPUT_ERRORS, Engine
from model.lora import find_adapter
from serve.media_urls import MediaPolicy
from serve.openai_api import ServerConfig, create_app, serve


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weight", default=None, help="checkpoint path, or a name in --out_dir (e.g. sft_video_128); "
                                                  "with --lora: its base (default: the base the adapter names)")
    p.add_argument("--lora", default=None, help="LoRA adapter folder (a path or a name in --out_dir), merged onto its base")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--tokenizer", default=None, help="default: the one named in the checkpoint")
    p.add_argument("--model_name", default=None, help="the model id clients ask for (default: the checkpoint's or "
                                                      "adapter's name as given, e.g. sft_video_128)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to your network)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--api_key", default=None, help="require the header Authorization: Bearer KEY on every /v1 request")
    p.add_argument("--media_root", default=None, help="local media paths (and file: URLs) are allowed under this "
                                                      "folder only (default: none allowed; send data: URLs)")
    p.add_argument("--allow_remote_media", action="store_true",
                   help="fetch http(s) media URLs (off: a server that fetches any URL it is sent is an SSRF hole)")
    p.add_argument("--max_media_bytes", type=int, default=32 << 20, help="media bytes one request may carry, decoded")
    p.add_argument("--max_video_frames", type=int, default=20000, help="longest video accepted, in frames")
    p.add_argument("--max_batch", type=int, default=8, help="requests decoded together, token by token")
    p.add_argument("--max_queue", type=int, default=64, help="requests that may wait beyond those; more get 429")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    if not args.weight and not args.lora:
        p.error("give --weight (a checkpoint) or --lora (an adapter folder)")
    if args.max_batch < 1 or args.max_queue < 0:
        p.error("--max_batch must be 1 or more and --max_queue 0 or more")
    return args


def build(args):
    """(the app, the Engine it serves) for these arguments."""
    engine = Engine.load(weight=args.weight, lora=args.lora, out_dir=args.out_dir, device=args.device,
                         tokenizer=args.tokenizer)
    source = Path(find_adapter(args.lora, args.out_dir) if args.lora else find_checkpoint(args.weight, args.out_dir))
    name = args.model_name or Path(args.lora or args.weight).name.removesuffix(".safetensors")
    root = Path(args.media_root) if args.media_root else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"{root}: --media_root is not a folder")
    media = MediaPolicy(root=root, allow_remote=args.allow_remote_media, max_bytes=args.max_media_bytes,
                        max_video_frames=args.max_video_frames)
    config = ServerConfig(model_id=name, max_batch=args.max_batch, max_queue=args.max_queue, api_key=args.api_key,
                          media=media, created=int(source.stat().st_mtime))
    return create_app(engine, config), engine


def main(argv=None):
    args = parse_args(argv)
    try:
        app, engine = build(args)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"serving {engine.name} as {app.state.config.model_id!r} on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    serve(app, args.host, args.port, args.log_level)


if __name__ == "__main__":
    main()
