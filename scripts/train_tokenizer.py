"""Train a byte-level BPE tokenizer on the text of jsonl datasets; save it in Hugging Face format."""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.chat import CHAT_TEMPLATE, MEDIA_MARKER, SPECIAL_TOKENS  # noqa: E402


def iter_texts(paths):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                for turn in record.get("conversations", []):
                    # The text as the chat template spells it: the role line heads every turn, so
                    # "assistant" and "user" become single tokens (spelt out, they cost ~1/3 of an
                    # SFT sample). Markers become visual slots, never text: keep them out of the merges.
                    yield f"{turn.get('role', '')}\n" + MEDIA_MARKER.sub("", turn.get("content", ""))


def train(paths, out_dir, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(iter_texts(paths), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                 additional_special_tokens=["<|vision_pad|>"],
                                 chat_template=CHAT_TEMPLATE, model_max_length=2048)
    hf.save_pretrained(out_dir)
    return hf


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", nargs="+", required=True, help="jsonl files whose conversations are the corpus")
    p.add_argument("--out", default="model/tokenizer", help="output folder (tokenizer.json + tokenizer_config.json)")
    p.add_argument("--vocab_size", type=int, default=1024)
    args = p.parse_args()
    missing = [d for d in args.data if not Path(d).is_file()]
    if missing:
        p.error(f"no such file: {missing[0]}")
    hf = train(args.data, args.out, args.vocab_size)
    print(f"tokenizer: {len(hf)} tokens → {args.out}")


if __name__ == "__main__":
    main()
