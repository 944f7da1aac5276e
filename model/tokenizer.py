"""Train our byte-level BPE tokenizer on jsonl conversations, as the chat template spells them; Hugging Face format."""
import json

from model.chat import CHAT_TEMPLATE, MEDIA_MARKER, SPECIAL_TOKENS


def iter_texts(paths):
    """Each turn of each jsonl record: its role line, then its content without media markers."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                for turn in record.get("conversations", []):
                    # The text as the chat template spells it: the role line heads every turn, so
                    # "assistant" and "user" become single tokens (spelt out, they cost a large share of
                    # a short SFT sample: docs/findings.md). Markers become visual slots, never text:
                    # keep them out of the merges.
                    yield f"{turn.get('role', '')}\n" + MEDIA_MARKER.sub("", turn.get("content", ""))


def train_tokenizer(paths, out_dir, vocab_size, split_digits: bool = False):
    """Train on the conversations of these jsonl files, save to out_dir, return the transformers tokenizer.
    split_digits: every digit is a token of its own (no merges across digits), as Llama's and Qwen's are,
    so a number never seen in training is spelt with the tokens of those that were."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
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
