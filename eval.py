"""Use a trained checkpoint: interactive chat about a video/image, one answer (--prompt), or batch scoring on a jsonl."""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dataset.metrics import CAPTION_CATEGORIES, GROUNDING_CATEGORIES, summarise
from model.engine import INPUT_ERRORS, Engine, SamplingOptions


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
    p.add_argument("--data_path", default=None, help="batch mode: jsonl (or .parquet, or a save_to_disk folder) whose last assistant turn is the reference")
    p.add_argument("--media_root", default=None)
    p.add_argument("--feature_dir", default=None, help="feature cache folder ('none' disables)")
    p.add_argument("--out", default=None, help="batch mode: predictions jsonl")
    p.add_argument("--metrics_out", default=None, help="batch mode: metrics json")
    p.add_argument("--caption_categories", nargs="+", default=list(CAPTION_CATEGORIES),
                   help="batch mode: categories also scored with BLEU-4 / ROUGE-L / CIDEr (needs pycocoevalcap)")
    p.add_argument("--grounding_categories", nargs="+", default=list(GROUNDING_CATEGORIES),
                   help="batch mode: categories whose reference is a span of time (\"from 3.5 s to 5.0 s\"), "
                        "scored by temporal IoU when a record carries no \"span\"")
    p.add_argument("--strict", action="store_true",
                   help="batch mode: stop at the first unusable sample (exit 1) instead of skipping and counting it")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile at static shapes: the same answers, faster tokens after a "
                        "one-off compile (tens of seconds on a CPU) per batch size and prompt length bucket")
    args = p.parse_args(argv)
    if not args.weight and not args.lora:
        p.error("give --weight (a checkpoint) or --lora (an adapter folder)")
    return args


def sampling_options(args) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed)


def score(engine, args, options):
    """Batch mode: answer every line, score against its references, write preds + metrics.

    Every answer is exact-matched (normalised) against its references: the last assistant turn plus
    the record's optional "references" list; caption categories also get BLEU-4 / ROUGE-L / CIDEr,
    grounding questions temporal IoU (mIoU, R@k); a record with "choices" also has each choice ranked
    by the model's likelihood (model/choices.py), reported apart.
    """
    preds, skipped, start = [], 0, time.perf_counter()
    for answered in engine.answer_dataset(args.data_path, options, batch_size=args.batch_size,
                                          media_root=args.media_root, feature_dir=args.feature_dir,
                                          strict=args.strict, grounding_categories=args.grounding_categories):
        preds += answered.predictions
        skipped += answered.skipped
    metrics = summarise(preds, skipped, time.perf_counter() - start, args.caption_categories)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in preds)
    if args.metrics_out:
        Path(args.metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics_out).write_text(json.dumps(metrics, indent=1))
    print(json.dumps(one_line_summary(metrics)))
    return metrics


def one_line_summary(metrics) -> dict:
    """The headline keys, plus the time-related groups and the multiple-choice figures when the data had any."""
    summary = {k: metrics[k] for k in ("accuracy", "n", "skipped", "by_category", "caption_metrics")}
    summary.update({k: metrics[k] for k in ("grounding", "by_duration", "grounding_by_duration", "by_phrasing")
                    if metrics.get(k)})
    if metrics.get("choices"):   # the multiple-choice records' overall figures (by category in metrics_out)
        summary["choices"] = {k: v for k, v in metrics["choices"].items() if k != "by_category"}
    return summary


def chat(engine, args, options):
    """Interactive (or single --prompt) conversation; the media stays part of every turn."""
    media, markers = engine.read_attachments(image=args.image, video=args.video)
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
        answer = engine.reply(conversation, media, options, stream=lambda s: print(s, end="", flush=True))
        print()
        conversation.append({"role": "assistant", "content": answer})
        if not interactive:
            break


def main(argv=None):
    args = parse_args(argv)
    try:
        options = sampling_options(args)
        engine = Engine.load(weight=args.weight, lora=args.lora, out_dir=args.out_dir, device=args.device,
                             tokenizer=args.tokenizer, clip_pretrained=args.clip_pretrained,
                             compile_decoding=args.compile)
        if args.data_path:
            score(engine, args, options)
        else:
            chat(engine, args, options)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
