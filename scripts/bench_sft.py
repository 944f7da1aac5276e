"""bench.py's sft section: one epoch of SFT, our packed batches vs transformers' LlamaForCausalLM fed by its
padding collator; the same samples in the same batches, the same optimizer, the same tokens of loss.

Two length mixes. "demo": the demo's video-SFT conversations, tokenized as training tokenizes them.
"real": conversation lengths shaped like LLaVA-Video-178K, mixed by its three splits' sizes on the
dataset card (178K detailed captions, 960K open-ended QA, 196K multiple-choice QA). The answer
lengths per split are our assumption, not measured from the data (it is not reachable offline):
captions of a few hundred tokens, open-ended answers of a sentence or two, a choice letter; each
prompt carries VISUAL_TOKENS visual slots. Both sides read the visual slots as ordinary tokens:
this times the language model's share of an epoch, where padding costs.
"""
import time

import numpy as np
import torch

from dataset.packing import packing_inputs
from dataset.vlm_dataset import collate
from model.chat import IGNORE

VISUAL_TOKENS = 32
# split: (share of samples, question tokens (median, log-sd, min, max), answer tokens (the same)).
REAL_MIX = {"caption": (178, (12, 0.2, 6, 30), (250, 0.35, 80, 700)),
            "open_ended": (960, (16, 0.4, 5, 60), (35, 0.6, 3, 200)),
            "multi_choice": (196, (60, 0.3, 25, 150), (3, 0.0, 1, 3))}


def lognormal_lengths(rng, n, median, sigma, low, high) -> np.ndarray:
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), low, high).astype(int)


def real_mix_lengths(n: int, seed: int = 0) -> list:
    """(prompt tokens, answer tokens) of n samples drawn from REAL_MIX."""
    rng = np.random.default_rng(seed)
    names = list(REAL_MIX)
    shares = np.array([REAL_MIX[k][0] for k in names], dtype=float)
    splits = rng.choice(len(names), size=n, p=shares / shares.sum())
    out = []
    for i in splits:
        _, question, answer = REAL_MIX[names[i]]
        prompt = VISUAL_TOKENS + 8 + int(lognormal_lengths(rng, 1, *question)[0])   # + role and turn tokens
        out.append((prompt, int(lognormal_lengths(rng, 1, *answer)[0]) + 1))        # + the end-of-turn token
    return out


def samples_of_lengths(lengths: list, vocab_size: int, seed: int = 0) -> list:
    """Random token ids (never ids 0-3, the special tokens) with labels on each answer."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for prompt, answer in lengths:
        ids = torch.randint(4, vocab_size - 1, (prompt + answer,), generator=gen)
        labels = ids.clone()
        labels[:prompt] = IGNORE
        samples.append({"input_ids": ids, "labels": labels, "media": []})
    return samples


def demo_samples(data_dir, tokenizer_dir, visual_slot_id: int) -> list:
    """The demo's video-SFT conversations as training encodes them; visual slots become a plain token."""
    from model.chat import ChatEncoder, load_tokenizer
    from dataset.vlm_dataset import read_jsonl
    chat = ChatEncoder(load_tokenizer(tokenizer_dir), VISUAL_TOKENS)
    samples = []
    for _, record in read_jsonl(data_dir / "sft_video.jsonl"):
        if isinstance(record, dict):
            ids, labels, _ = chat.encode(record["conversations"])
            ids = torch.tensor(ids)
            ids[ids == chat.vision_pad] = visual_slot_id
            samples.append({"input_ids": ids, "labels": torch.tensor(labels), "media": []})
    return samples


def epoch_batches(samples: list, batch: int, seed: int = 0) -> list:
    order = np.random.default_rng(seed).permutation(len(samples))
    return [[samples[i] for i in order[s:s + batch]] for s in range(0, len(order), batch)]


def hf_collator():
    """transformers' padding collator for causal-LM fine-tuning, padding each batch to its longest sample."""
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast
    vocab = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", unk_token="<unk>")
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE, return_tensors="pt")


def our_epoch(model, optimizer, batches, device) -> dict:
    """One epoch through our packed batches; loss per labelled token, as the trainer normalises it."""
    slots = real = 0
    start = time.perf_counter()
    for items in batches:
        batch = collate(items, pad_id=0, pack=True)
        loss, count = model(batch["input_ids"].to(device), batch["labels"].to(device), **packing_inputs(batch, device))
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        slots, real = slots + batch["input_ids"].numel(), real + int(batch["attention_mask"].sum())
    return {"seconds": time.perf_counter() - start, "slots": slots, "tokens": real}


def padded_batch(collator, items) -> dict:
    """The items as transformers' collator pads them (it takes lists of ids, not tensors)."""
    return collator([{"input_ids": it["input_ids"].tolist(), "labels": it["labels"].tolist()} for it in items])


def hf_epoch(model, optimizer, batches, collator, device) -> dict:
    """One epoch of LlamaForCausalLM on the collator's padded batches (its loss: mean over labelled tokens)."""
    slots = real = 0
    start = time.perf_counter()
    for items in batches:
        batch = padded_batch(collator, items)
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    labels=batch["labels"].to(device))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        slots, real = slots + batch["input_ids"].numel(), real + int(batch["attention_mask"].sum())
    return {"seconds": time.perf_counter() - start, "slots": slots, "tokens": real}


def first_batch_loss_gap(ours, hf, batches, collator, device) -> float:
    """|our packed loss − transformers' padded loss| on the first batch, same weights: the same tokens of loss."""
    with torch.no_grad():
        batch = collate(batches[0], pad_id=0, pack=True)
        loss, count = ours(batch["input_ids"].to(device), batch["labels"].to(device), **packing_inputs(batch, device))
        padded = padded_batch(collator, batches[0])
        theirs = hf(**{k: v.to(device) for k, v in padded.items()}).loss
    return abs(float(loss / count) - float(theirs))
