"""Train a byte-level BPE tokenizer on the text of jsonl datasets; save it in Hugging Face format."""
import argparse
from pathlib import Path

import _repo  # noqa: F401  (puts the repository root on sys.path)
from model.tokenizer import train_tokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", nargs="+", required=True, help="jsonl files whose conversations are the corpus")
    p.add_argument("--out", default="model/tokenizer", help="output folder (tokenizer.json + tokenizer_config.json)")
    p.add_argument("--vocab_size", type=int, default=1024)
    p.add_argument("--split_digits", action=argparse.BooleanOptionalAction, default=False,
                   help="every digit a token of its own, so unseen numbers are spelt with known tokens")
    args = p.parse_args()
    missing = [d for d in args.data if not Path(d).is_file()]
    if missing:
        p.error(f"no such file: {missing[0]}")
    hf = train_tokenizer(args.data, args.out, args.vocab_size, args.split_digits)
    print(f"tokenizer: {len(hf)} tokens → {args.out}")


if __name__ == "__main__":
    main()
