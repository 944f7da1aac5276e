"""Clean a jsonl dataset in our schema: drop malformed, mis-formatted, off-length, off-language,
duplicate and missing/unreadable-media records, and report how many went for each reason."""
import argparse
import json
import multiprocessing
import os
import re
import sys
from collections import Counter
from pathlib import Path

import _repo  # noqa: F401  (puts the repository root on sys.path)
from dataset.converters import rebase_media_path
from dataset.media import MediaError, probe_media, read_clip
from dataset.vlm_dataset import media_pools, read_jsonl
from model.chat import MEDIA_MARKER, BadSample, ChatEncoder, check_turns, load_tokenizer, marker_kinds

# Reasons in the order the checks run (cheap text checks first, media last); the report lists them so.
REASONS = ("malformed_json", "bad_turns", "marker_mismatch", "too_short", "too_long", "too_many_tokens",
           "wrong_language", "duplicate", "media_missing", "media_unreadable")
EXAMPLES_PER_REASON = 3
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")
LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")


class CleanError(Exception):
    """Bad arguments or input as a whole; the message is one line naming the file."""


def script_shares(text: str) -> dict:
    """Shares of {"zh", "en", "other"} among the text's letters, counting each Han character and each
    Latin word as one unit (a Chinese sentence quoting an English name stays Chinese)."""
    han = len(HAN.findall(text))
    latin = len(LATIN_WORD.findall(text))
    other = sum(1 for c in HAN.sub("", LATIN_WORD.sub("", text)) if c.isalpha())
    total = han + latin + other
    if total == 0:
        return {}
    return {"zh": han / total, "en": latin / total, "other": other / total}


def conversation_text(conversations) -> str:
    return "\n".join(MEDIA_MARKER.sub("", t["content"]).strip() for t in conversations)


def text_length(conversations) -> int:
    """Characters of all turns, markers and surrounding whitespace excluded."""
    return sum(len(MEDIA_MARKER.sub("", t["content"]).strip()) for t in conversations)


def check_one(task):
    """(kind, path, level, num_frames) → None or (reason, message); runs in a worker process."""
    kind, path, level, num_frames = task
    if not os.path.isfile(path):
        return "media_missing", f"{path}: {kind} file not found"
    try:
        if level == "exists":
            if os.path.getsize(path) == 0:
                raise MediaError(f"{path}: empty file")
        elif level == "quick":
            probe_media(path, kind)
        else:
            read_clip(path, kind, num_frames)
    except MediaError as e:
        return "media_unreadable", str(e)
    return None


def check_all_media(tasks, workers: int) -> dict:
    """{path: None or (reason, message)} for every (kind, path, level, num_frames) task."""
    if workers <= 1 or len(tasks) < 2:
        return {task[1]: check_one(task) for task in tasks}
    with multiprocessing.Pool(workers) as pool:
        results = pool.map(check_one, tasks, chunksize=max(1, len(tasks) // (workers * 8)))
    return {task[1]: result for task, result in zip(tasks, results)}


class Cleaner:
    """Runs the text checks on each record, then the media checks on what survives."""

    def __init__(self, args):
        self.args = args
        self.dropped = Counter()
        self.examples = {}
        self.encoder = None
        if args.max_tokens:
            self.encoder = ChatEncoder(load_tokenizer(args.tokenizer), args.num_visual_tokens)

    def drop(self, reason, line, message):
        self.dropped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"line {line}: {message}")

    def text_problem(self, record):
        """(reason, message) for the first text check the record fails, else None."""
        a = self.args
        try:
            check_turns(record.get("conversations"))
        except BadSample as e:
            return "bad_turns", str(e)
        conversations = record["conversations"]
        try:
            media_pools(record, marker_kinds(conversations))
        except BadSample as e:
            return "marker_mismatch", str(e)
        chars = text_length(conversations)
        if chars < a.min_chars:
            return "too_short", f"{chars} characters < --min_chars {a.min_chars}"
        if a.max_chars and chars > a.max_chars:
            return "too_long", f"{chars} characters > --max_chars {a.max_chars}"
        if self.encoder is not None:
            tokens = len(self.encoder.encode(conversations)[0])
            if tokens > a.max_tokens:
                return "too_many_tokens", f"{tokens} tokens > --max_tokens {a.max_tokens}"
        if a.lang != "any":
            shares = script_shares(conversation_text(conversations))
            if shares and shares[a.lang] < a.lang_min_share:
                return "wrong_language", f"{a.lang} share {shares[a.lang]:.2f} < {a.lang_min_share}"
        return None

    def run(self, rows, media_root: Path):
        """rows from read_jsonl → (kept records in input order, read count)."""
        kept, seen = [], set()
        for line, record in rows:
            if isinstance(record, str):
                self.drop("malformed_json", line, record)
                continue
            problem = self.text_problem(record)
            if problem is None:
                key = json.dumps([record.get("video"), record.get("image"),
                                  [(t["role"], t["content"]) for t in record["conversations"]]])
                if key in seen:
                    problem = "duplicate", "same media and conversation as an earlier record"
                seen.add(key)
            if problem is not None:
                self.drop(problem[0], line, problem[1])
                continue
            kept.append((line, record))
        if self.args.check_media != "none":
            kept = self.drop_bad_media(kept, media_root)
        return [record for _, record in kept]

    def drop_bad_media(self, kept, media_root: Path):
        def files(record):
            pools = media_pools(record, marker_kinds(record["conversations"]))
            return [(kind, str(media_root / p)) for kind, paths in pools.items() for p in paths]

        tasks = {path: (kind, path, self.args.check_media, self.args.num_frames)
                 for _, record in kept for kind, path in files(record)}
        verdicts = check_all_media(list(tasks.values()), self.args.workers)
        good = []
        for line, record in kept:
            problem = next((verdicts[path] for _, path in files(record) if verdicts[path]), None)
            if problem:
                self.drop(problem[0], line, problem[1])
            else:
                good.append((line, record))
        return good


def relocate(record, from_dir, to_dir):
    """Media paths relative to the input's folder → relative to the output's folder."""
    for kind in ("video", "image"):
        value = record.get(kind)
        if isinstance(value, str):
            record[kind] = rebase_media_path(value, from_dir, to_dir)
        elif isinstance(value, list):
            record[kind] = [rebase_media_path(v, from_dir, to_dir) for v in value]
    return record


def report_table(read: int, kept: int, dropped: Counter) -> str:
    rows = [("read", read), ("kept", kept)] + [(r, dropped[r]) for r in REASONS if dropped[r]]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {n:>8}" for name, n in rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="input jsonl (our schema)")
    p.add_argument("--out", required=True, help="cleaned jsonl")
    p.add_argument("--media_root", default=None,
                   help="folder media paths are relative to (default: the input's folder; without it, "
                        "paths are rewritten relative to the output's folder when that differs)")
    p.add_argument("--check_media", default="quick", choices=["none", "exists", "quick", "decode"],
                   help="exists: file is there and non-empty; quick: the container opens and reports "
                        "frames (images: header verifies); decode: decode --num_frames frames as training does")
    p.add_argument("--num_frames", type=int, default=8, help="frames decoded per video by --check_media decode")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes for media checks")
    p.add_argument("--min_chars", type=int, default=1, help="drop conversations shorter than this (markers excluded)")
    p.add_argument("--max_chars", type=int, default=0, help="drop conversations longer than this (0: no limit)")
    p.add_argument("--max_tokens", type=int, default=0,
                   help="drop samples whose encoded length (visual slots included) exceeds this; needs --tokenizer")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for --max_tokens")
    p.add_argument("--num_visual_tokens", type=int, default=8, help="visual slots per marker for --max_tokens")
    p.add_argument("--lang", default="any", choices=["any", "en", "zh"], help="keep only this language")
    p.add_argument("--lang_min_share", type=float, default=0.8,
                   help="--lang keeps records where at least this share of letter units (Han characters, "
                        "Latin words) is in that script")
    p.add_argument("--report", default=None, help="also write the counts and examples as JSON here")
    args = p.parse_args(argv)
    if args.max_tokens and not args.tokenizer:
        p.error("--max_tokens needs --tokenizer")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if not Path(args.data).is_file():
            raise CleanError(f"{args.data}: no such file")
        if args.media_root is not None and not Path(args.media_root).is_dir():
            raise CleanError(f"{args.media_root}: --media_root is not a folder")
        try:
            cleaner = Cleaner(args)
        except (OSError, ValueError) as e:
            raise CleanError(f"{args.tokenizer}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
        in_dir, out = Path(args.data).parent, Path(args.out)
        try:
            rows = read_jsonl(args.data)
        except UnicodeDecodeError:
            raise CleanError(f"{args.data}: not UTF-8 text") from None
        kept = cleaner.run(rows, Path(args.media_root) if args.media_root else in_dir)
    except CleanError as e:
        sys.exit(f"error: {e}")
    move_paths = args.media_root is None and in_dir.resolve() != out.parent.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in kept:
            if move_paths:
                record = relocate(record, in_dir, out.parent)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    print(report_table(len(rows), len(kept), cleaner.dropped))
    for reason in REASONS:
        for example in cleaner.examples.get(reason, []):
            print(f"  {reason}: {example}")
    if args.report:
        summary = {"input": args.data, "output": args.out, "read": len(rows), "kept": len(kept),
                   "dropped": {r: cleaner.dropped[r] for r in REASONS if cleaner.dropped[r]},
                   "examples": {r: cleaner.examples[r] for r in REASONS if r in cleaner.examples}}
        Path(args.report).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
