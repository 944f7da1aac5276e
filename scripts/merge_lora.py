"""Merge a LoRA adapter folder into its base checkpoint: one plain safetensors checkpoint that answers as base + adapter do."""
import argparse
import sys
from pathlib import Path

import _repo  # noqa: F401  (puts the repository root on sys.path)
from model.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from model.lora import LoraError, apply_adapter, base_of, find_adapter, read_info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lora", required=True, help="adapter folder (train_sft.py --lora_rank), a path or a name in --out_dir")
    p.add_argument("--weight", default=None, help="its base checkpoint (default: the one the adapter names)")
    p.add_argument("--out", default=None, help="merged checkpoint (default: <adapter folder>.safetensors)")
    p.add_argument("--out_dir", default="out", help="where --lora / --weight names are looked up")
    return p.parse_args(argv)


def merge(lora, weight=None, out=None, out_dir="out") -> Path:
    adapter = find_adapter(lora, out_dir)
    base = base_of(adapter, find_checkpoint(weight, out_dir) if weight else None)
    model, meta = load_checkpoint(base)
    merged = apply_adapter(model, adapter, merge=True)
    info = read_info(adapter)
    out = Path(out) if out else adapter.with_name(f"{adapter.name}.safetensors")
    save_checkpoint(merged, out, stage=info.get("stage", meta.get("stage", "")), step=info.get("step", ""),
                    tokenizer=info.get("tokenizer", meta.get("tokenizer", "")), parts=info.get("parts", ""),
                    data=info.get("data", ""), source=str(base), merged_from=str(adapter))
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        out = merge(args.lora, args.weight, args.out, args.out_dir)
    except (LoraError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{args.lora} merged into its base → {out} (use it with --weight like any checkpoint)")


if __name__ == "__main__":
    main()
