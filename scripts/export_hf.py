"""Export the language model of one of our checkpoints (+ its tokenizer) as a transformers LlamaForCausalLM folder."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.chat import CHAT_TEMPLATE, TokenizerError, load_tokenizer  # noqa: E402
from model.checkpoint import CheckpointError, find_checkpoint  # noqa: E402
from model.convert import ConversionError, read_ours, save_hf_folder  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weight", required=True, help="our checkpoint (path or a name in --out_dir), or an LM file")
    p.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--out_dir", default="out", help="where --weight names are looked up")
    p.add_argument("--tokenizer", default=None, help="default: the one the checkpoint names")
    return p.parse_args(argv)


def export(weight, out, out_dir="out", tokenizer=None) -> Path:
    """Write the folder; returns its path (a later --push_to_hub uploads exactly this folder)."""
    from safetensors import safe_open
    path = find_checkpoint(weight, out_dir)
    cfg, state = read_ours(path)
    if tokenizer is None:
        with safe_open(str(path), "pt") as f:
            tokenizer = (f.metadata() or {}).get("tokenizer")
        if not tokenizer:
            raise ConversionError(f"{path}: names no tokenizer; pass --tokenizer")
    if not Path(tokenizer).is_dir():
        raise ConversionError(f"{tokenizer}: tokenizer folder not found (pass --tokenizer)")
    return save_hf_folder(cfg, state, load_tokenizer(tokenizer), out, CHAT_TEMPLATE)


def main(argv=None):
    args = parse_args(argv)
    try:
        folder = export(args.weight, args.out, args.out_dir, args.tokenizer)
    except (CheckpointError, ConversionError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{args.weight} → {folder} (transformers LlamaForCausalLM; load with AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    main()
