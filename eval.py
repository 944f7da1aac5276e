"""Use a trained checkpoint: interactive chat about a video/image, one answer (--prompt), or batch scoring on a jsonl."""
import argparse
import json
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dataset.features import open_cache
from dataset.media import MediaError, read_media, sampling_rate
from dataset.metrics import CAPTION_CATEGORIES, CaptionMetricsUnavailable, caption_scores, exact_match
from dataset.vlm_dataset import ConversationDataset, collate, frames_and_mask
from model.chat import BadSample, ChatEncoder, TokenizerError, load_tokenizer
from model.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from model.lora import LoraError, apply_adapter, base_of, find_adapter, read_info
from model.vision import FrameEncoder, VisionWeightsError


class EvalError(Exception):
    """Bad input for eval.py: printed as one line, exit status 1."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weight", default=None,
                   help="checkpoint path, or a name in --out_dir (e.g. sft_video_128); with --lora: its base "
                        "(default: the base the adapter names)")
    p.add_argument("--lora", default=None,
                   help="LoRA adapter folder (train_sft.py --lora_rank), a path or a name in --out_dir; "
                        "applied (merged) onto its base checkpoint")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--tokenizer", default=None, help="default: the one named in the checkpoint")
    p.add_argument("--clip_pretrained", default=None, help="override the checkpoint's vision weights (tag or file)")
    p.add_argument("--video", default=None)
    p.add_argument("--image", default=None)
    p.add_argument("--prompt", default=None, help="answer this once and exit (no interactive chat)")
    p.add_argument("--data_path", default=None, help="batch mode: jsonl whose last assistant turn is the reference")
    p.add_argument("--media_root", default=None)
    p.add_argument("--feature_dir", default=None, help="feature cache folder ('none' disables)")
    p.add_argument("--out", default=None, help="batch mode: predictions jsonl")
    p.add_argument("--metrics_out", default=None, help="batch mode: metrics json")
    p.add_argument("--caption_categories", nargs="+", default=list(CAPTION_CATEGORIES),
                   help="batch mode: categories also scored with BLEU-4 / ROUGE-L / CIDEr (needs pycocoevalcap)")
    p.add_argument("--strict", action="store_true",
                   help="batch mode: stop at the first unusable sample (exit 1) instead of skipping and counting it")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not args.weight and not args.lora:
        p.error("give --weight (a checkpoint) or --lora (an adapter folder)")
    return args


class Session:
    """A loaded checkpoint with its tokenizer; the frozen encoder is loaded on first need."""

    def __init__(self, args):
        self.args = args
        weight = find_checkpoint(args.weight, args.out_dir) if args.weight else None
        adapter = find_adapter(args.lora, args.out_dir) if args.lora else None
        path = base_of(adapter, weight) if adapter else weight
        self.model, meta = load_checkpoint(path, "cpu", clip_pretrained=args.clip_pretrained)
        if adapter:
            self.model = apply_adapter(self.model, adapter, merge=True)
            meta = {**meta, **read_info(adapter)}
        self.model.to(args.device).eval()
        self.name = f"{adapter} (LoRA on {path.name})" if adapter else str(path)
        tok_path = args.tokenizer or meta.get("tokenizer", "model/tokenizer")
        if not Path(tok_path).is_dir():
            raise EvalError(f"{tok_path}: tokenizer folder not found (pass --tokenizer)")
        self.tokenizer = load_tokenizer(tok_path)
        self.chat = ChatEncoder(self.tokenizer, self.model.vision_cfg.num_visual_tokens)
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = FrameEncoder(self.model.vision_cfg, self.args.device)
        return self._encoder

    def generate(self, batch, frames, frame_mask, stream=None, **sampling):
        """Greedy or sampled answers for a left-padded batch; `stream(text)` gets deltas of row 0.

        sampling: max_new_tokens / temperature / top_p / seed for this call (default: the flags).
        """
        opts = {k: sampling.get(k) if sampling.get(k) is not None else getattr(self.args, k)
                for k in ("max_new_tokens", "temperature", "top_p", "seed")}
        gen = torch.Generator(device=self.args.device).manual_seed(opts["seed"])
        rows = [[] for _ in range(batch["input_ids"].shape[0])]
        shown = ""
        steps = self.model.generate(batch["input_ids"].to(self.args.device), batch["attention_mask"].to(self.args.device),
                                    frames, frame_mask, opts["max_new_tokens"], opts["temperature"],
                                    opts["top_p"], eos_id=self.chat.im_end, generator=gen)
        for token in steps:
            for row, t in zip(rows, token.tolist()):
                if not row or row[-1] != self.chat.im_end:
                    row.append(t)
            if stream:
                text = self.tokenizer.decode(rows[0], skip_special_tokens=True)
                if not text.endswith("\ufffd"):   # a character split over byte tokens waits for its last byte
                    stream(text[len(shown):])
                    shown = text
        if stream:
            stream(self.tokenizer.decode(rows[0], skip_special_tokens=True)[len(shown):])
        return [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]

    def load_media(self, path, kind):
        """(sampled frames as uint8 arrays, their CLIP features): what the model sees of one file."""
        cfg = self.model.vision_cfg
        frames = read_media(path, kind, cfg.num_frames, sampling_rate(cfg))
        return frames, self.encoder.encode(frames)

    def reply(self, conversation, media, stream=None, **sampling):
        """The assistant's next answer to `conversation` (user/assistant turns; the first user turn carries
        one <video>/<image> marker per item of `media`, a list of CLIP feature tensors)."""
        frames, mask = frames_and_mask([("features", m) for m in media], None, self.args.device)
        ids, _, _ = self.chat.encode(conversation, add_generation_prompt=True)
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.bool)}
        return self.generate(batch, frames, mask, stream=stream, **sampling)[0]


def score(session, args):
    """Batch mode: generate for every line, score against its references, write preds + metrics.

    Every answer is exact-matched (normalised) against its references: the last assistant turn plus
    the record's optional "references" list; caption categories also get BLEU-4 / ROUGE-L / CIDEr.
    """
    if not Path(args.data_path).is_file():
        raise EvalError(f"{args.data_path}: no such file")
    cfg = session.model.vision_cfg
    data_dir = Path(args.media_root) if args.media_root else Path(args.data_path).parent
    data = ConversationDataset(args.data_path, session.chat, cfg.num_frames, session.model.lm_cfg.max_seq_len,
                               media_root=args.media_root, cache=open_cache(data_dir, cfg, args.feature_dir),
                               for_generation=True, fps=sampling_rate(cfg))
    encoder = session.encoder if data.uncached() else None
    if encoder:
        data.preprocess = encoder.pixels
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=2 if encoder else 0,
                        collate_fn=partial(collate, pad_id=session.chat.pad_id, left_pad=True,
                                           warn_skipped=not args.strict))
    preds, skipped, start = [], 0, time.perf_counter()
    for batch in loader:
        if args.strict and batch["errors"]:   # raised here, not in a loader worker: one line, no traceback
            raise EvalError(batch["errors"][0])
        skipped += batch["skipped"]
        if not batch["size"]:
            continue
        frames, mask = frames_and_mask(batch["media"], encoder, args.device)
        answers = session.generate(batch, frames, mask)
        for i, answer in enumerate(answers):
            refs = batch["references"][i]
            preds.append({"id": batch["id"][i], "category": batch["category"][i], "subset": batch["subset"][i],
                          "prediction": answer, "reference": batch["reference"][i], "references": refs,
                          "correct": exact_match(answer, refs)})
    metrics = summarise(preds, skipped, time.perf_counter() - start, args.caption_categories)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in preds)
    if args.metrics_out:
        Path(args.metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics_out).write_text(json.dumps(metrics, indent=1))
    print(json.dumps({k: metrics[k] for k in ("accuracy", "n", "skipped", "by_category", "caption_metrics")}))
    return metrics


def summarise(preds, skipped, seconds, caption_categories=CAPTION_CATEGORIES):
    def accuracy(rows):
        return round(sum(r["correct"] for r in rows) / len(rows), 4) if rows else 0.0
    groups = {"by_category": defaultdict(list), "by_subset": defaultdict(list)}
    for p in preds:
        if p["category"]:
            groups["by_category"][p["category"]].append(p)
        if p["subset"]:
            groups["by_subset"][p["subset"]].append(p)
    return {"accuracy": accuracy(preds), "n": len(preds), "skipped": skipped,
            **{name: {k: accuracy(v) for k, v in sorted(g.items())} for name, g in groups.items()},
            "caption_metrics": caption_metrics(preds, caption_categories), "seconds": round(seconds, 2)}


def caption_metrics(preds, categories):
    """BLEU-4 / ROUGE-L / CIDEr over the predictions in caption categories; None when there are none or
    pycocoevalcap is missing (then one line says how to install it)."""
    rows = [p for p in preds if p["category"] in categories]
    if not rows:
        return None
    try:
        scores = caption_scores([p["prediction"] for p in rows], [p["references"] for p in rows])
    except CaptionMetricsUnavailable as e:
        print(f"note: {e}", file=sys.stderr)
        return None
    return {**scores, "categories": sorted(set(categories))}


def chat(session, args):
    """Interactive (or single --prompt) conversation; the media stays part of every turn."""
    media, markers = [], ""
    for kind, path in (("image", args.image), ("video", args.video)):
        if path:
            media.append(session.load_media(path, kind)[1])
            markers += f"<{kind}>\n"
    conversation = []
    interactive = args.prompt is None
    if interactive:
        print("Type a message (empty line or Ctrl-D to quit).", file=sys.stderr)
    while True:
        if interactive:
            try:
                text = input("> ").strip()
            except EOFError:
                break
            if not text:
                break
        else:
            text = args.prompt
        content = (markers if not conversation else "") + text
        conversation.append({"role": "user", "content": content})
        answer = session.reply(conversation, media, stream=lambda s: print(s, end="", flush=True))
        print()
        conversation.append({"role": "assistant", "content": answer})
        if not interactive:
            break


def main(argv=None):
    args = parse_args(argv)
    try:
        session = Session(args)
        if args.data_path:
            score(session, args)
        else:
            chat(session, args)
    except (EvalError, CheckpointError, MediaError, BadSample, TokenizerError, VisionWeightsError, LoraError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
