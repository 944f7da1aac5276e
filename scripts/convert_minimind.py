"""Convert a MiniMind LM checkpoint (.pth, e.g. MiniMind2's lm_512.pth) into our LM file (.safetensors)."""
import argparse
import sys

import _repo  # noqa: F401  (puts the repository root on sys.path)
from model.convert import ConversionError, read_minimind, save_lm


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lm", required=True, help="MiniMind LM state dict (.pth); loaded as tensors only, never as code")
    p.add_argument("--out", required=True, help="our LM file, e.g. out/lm_512.safetensors")
    p.add_argument("--num_heads", type=int, default=8, help="attention heads (not readable from the shapes; MiniMind2: 8)")
    p.add_argument("--rope_theta", type=float, default=1e6, help="RoPE base (MiniMind2: 1e6)")
    p.add_argument("--norm_eps", type=float, default=1e-5, help="RMSNorm epsilon (MiniMind2: 1e-5)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg, state = read_minimind(args.lm, args.num_heads, args.rope_theta, args.norm_eps)
        save_lm(cfg, state, args.out, source=args.lm)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{args.lm} → {args.out}: dim {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads "
          f"({cfg.num_kv_heads} KV), SwiGLU {cfg.intermediate_size}, vocab {cfg.vocab_size}, RoPE θ {cfg.rope_theta:g}")


if __name__ == "__main__":
    main()
