"""Convert a public video-instruction dataset's annotation file into our jsonl schema (docs/data-format.md)."""
import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import _repo  # noqa: F401  (puts the repository root on sys.path)
from dataset.converters import (DEFAULT_CAPTION_PROMPT, FORMATS, Options, SourceError,
                                convert_records, read_msvd_mapping, read_nextqa_mapping)
from dataset.embedded_images import images_folder

ID_ONLY_FORMATS = ("sharegpt4video", "videoinstruct", "msrvtt-qa", "msvd-qa", "charades-sta",
                   "activitynet-captions", "nextqa")


class ConvertError(Exception):
    """Bad input or a --strict stop; the message is one line naming the file."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--input", required=True,
                   help="the source annotation file: a .json list or .jsonl (or a .parquet file / save_to_disk "
                        "folder of such records: MiniMind-V's pretrain_i2t.parquet, sft_i2t.parquet); "
                        "charades-sta: its .txt, activitynet-captions: its .json object, nextqa: its .csv")
    p.add_argument("--out", required=True, help="output jsonl")
    p.add_argument("--media_root", default=None,
                   help="folder the source's media paths or ids are relative to; paths are then written "
                        "relative to the output file's folder. Without it paths are kept as the source "
                        "gives them (train with --media_root pointing where they live)")
    p.add_argument("--video_ext", default=None,
                   help="file extension for formats that name videos by id only (default: .mp4, .avi for "
                        "msvd-qa); 'auto' picks whichever of .mp4/.mkv/.webm/.avi/.mov exists under --media_root")
    p.add_argument("--mapping", default=None, help="msvd-qa: youtube_mapping.txt (vidN → YouTube clip name)")
    p.add_argument("--video_map", default=None,
                   help="nextqa: map_vid_vidorID.json (video id → <folder>/<video id>, under --media_root)")
    p.add_argument("--category", default=None, help="category written into every record (overrides the default)")
    p.add_argument("--category_from_question", action="store_true",
                   help="msrvtt-qa/msvd-qa: category = the question word (what, who, how, when, where)")
    p.add_argument("--caption_prompt", default=DEFAULT_CAPTION_PROMPT, help="sharegpt4video: the user turn")
    p.add_argument("--keyframe_turn", action="store_true",
                   help="sharegpt4video: add the keyframe captions, in order, as a second turn")
    p.add_argument("--image_dir", default=None,
                   help="minimind-v parquet: folder its embedded images are written to, once each, named by "
                        "content (default: <folder of --out>/<input name>_images, where training on the parquet "
                        "directly puts them too)")
    p.add_argument("--strict", action="store_true", help="stop at the first record that cannot be converted")
    p.add_argument("--max_warnings", type=int, default=50, help="print at most this many skip warnings")
    args = p.parse_args(argv)
    if args.video_ext == "auto" and args.media_root is None:
        p.error("--video_ext auto needs --media_root to look the files up")
    if args.video_ext is not None and args.format not in ID_ONLY_FORMATS:
        p.error(f"--video_ext applies to {', '.join(ID_ONLY_FORMATS)}; {args.format} names its files itself")
    if args.mapping is not None and args.format != "msvd-qa":
        p.error("--mapping applies to msvd-qa only")
    if args.video_map is not None and args.format != "nextqa":
        p.error("--video_map applies to nextqa only")
    return args


def run(args) -> Counter:
    if args.media_root is not None and not os.path.isdir(args.media_root):
        raise ConvertError(f"{args.media_root}: --media_root is not a folder")
    out = Path(args.out)
    opts = Options(out_dir=str(out.parent), media_root=args.media_root, video_ext=args.video_ext,
                   category=args.category, category_from_question=args.category_from_question,
                   caption_prompt=args.caption_prompt, keyframe_turn=args.keyframe_turn,
                   image_dir=args.image_dir or str(images_folder(args.input, out.parent)),
                   msvd_mapping=read_msvd_mapping(args.mapping) if args.mapping else None,
                   nextqa_mapping=read_nextqa_mapping(args.video_map) if args.video_map else None)
    counts = Counter()
    warned = 0

    def on_skip(where, record_id, skip):
        nonlocal warned
        label = f"{where} (id {record_id})" if record_id is not None else where
        if args.strict:
            raise ConvertError(f"{label}: {skip}")
        warned += 1
        if warned <= args.max_warnings:
            print(f"warning: skipped {label}: {skip}", file=sys.stderr)
        elif warned == args.max_warnings + 1:
            print("warning: further skip warnings suppressed (see the counts at the end)", file=sys.stderr)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in convert_records(args.format, args.input, opts, counts, on_skip):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out)   # a stopped run never leaves a half-written output behind
    finally:
        if tmp.exists():
            tmp.unlink()
    return counts


def report(counts: Counter, out) -> str:
    skipped = {k: v for k, v in counts.items() if k not in ("read", "written")}
    lines = [f"read {counts['read']}, written {counts['written']} → {out}, skipped {sum(skipped.values())}"]
    lines += [f"  skipped {reason}: {n}" for reason, n in sorted(skipped.items())]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:
        counts = run(args)
    except (ConvertError, SourceError) as e:
        sys.exit(f"error: {e}")
    print(report(counts, args.out))


if __name__ == "__main__":
    main()
