"""Convert a MiniMind LM checkpoint (.pth: MiniMind2's lm_512.pth, minimind-3's llm_768.pth) into our LM file
(.safetensors)."""
import argparse
import sys

import _repo  # noqa: F401  (puts the repository root on sys.path)
from model.convert import ConversionError, read_minimind, save_lm


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lm", required=True, help="MiniMind LM state dict (.pth); loaded as tensors only, never as code")
    p.add_argument("--out", required=True, help="our LM file, e.g. out/lm_512.safetensors")
    # Left unset, each takes the value of the MiniMind generation the keys show (q/k norms: minimind-3).
    p.add_argument("--num_heads", type=int, default=None,
                   help="attention heads (MiniMind2: 8, not readable from its shapes; minimind-3: read off q_norm)")
    p.add_argument("--rope_theta", type=float, default=None, help="RoPE base (both generations: 1e6)")
    p.add_argument("--norm_eps", type=float, default=None, help="RMSNorm epsilon (MiniMind2: 1e-5, minimind-3: 1e-6)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg, state = read_minimind(args.lm, args.num_heads, args.rope_theta, args.norm_eps)
        save_lm(cfg, state, args.out, source=args.lm)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    generation = "minimind-3, per-head q/k norms" if cfg.qk_norm else "MiniMind2"
    print(f"{args.lm} → {args.out} ({generation}): dim {cfg.hidden_size}, {cfg.num_layers} layers, "
          f"{cfg.num_heads} heads ({cfg.num_kv_heads} KV), SwiGLU {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
          f"RoPE θ {cfg.rope_theta:g}, RMSNorm ε {cfg.norm_eps:g}")


if __name__ == "__main__":
    main()
