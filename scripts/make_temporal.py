"""Generate the synthetic temporal suite (long low-fps clips with timed events; jsonl splits, meta.json) into --out."""
import argparse
import time

import _repo  # noqa: F401  (puts the repository root on sys.path)
from dataset.synthetic import even_size, int_at_least, pick_codec
from dataset.synthetic_temporal import DEFAULT_ORDER_ANSWERS, ORDER_ANSWERS, SEEN_WORDINGS, Settings, generate


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 second, got {text}")
    return value


def share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n_videos", type=int_at_least(1), required=True, help="training videos (pair members extra)")
    parser.add_argument("--n_test", type=int_at_least(1), default=60, help="test videos (pair members extra)")
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--min_seconds", type=positive_seconds, default=4.0)
    parser.add_argument("--max_seconds", type=positive_seconds, default=60.0)
    parser.add_argument("--test_max_seconds", type=positive_seconds, default=None, help="default: 2 * --max_seconds")
    parser.add_argument("--fps", type=int_at_least(1), default=4)
    parser.add_argument("--size", type=even_size, default=64, help="frame side in pixels")
    parser.add_argument("--order_questions", type=int_at_least(1), default=1,
                        help="order questions of each form (after, before, which first) per training conversation")
    parser.add_argument("--order_answers", choices=ORDER_ANSWERS, default=DEFAULT_ORDER_ANSWERS,
                        help="order answers: the event alone; the video's timed events first, then "
                             "'Answer: <the event>'; or a before / after question's anchor restated first, "
                             "'after <the anchor>. Answer: <the event>.' (both scored on what follows the marker)")
    parser.add_argument("--seen_wordings", type=int_at_least(1), default=SEEN_WORDINGS,
                        help=f"of each question form's {SEEN_WORDINGS} training wordings, use the first this many "
                             "(the held-out ones are fixed)")
    parser.add_argument("--offset_share", type=share, default=0.0,
                        help="share of training videos read as a window of a longer recording: their clock starts "
                             "at a whole second t0 > 0 (the record's time_offset) and their answers' times with it")
    parser.add_argument("--clock_max", type=positive_seconds, default=None,
                        help="with --offset_share, a window ends by this second (default: --test_max_seconds)")
    parser.add_argument("--workers", type=int_at_least(1), default=2)
    args = parser.parse_args(argv)
    args.test_max_seconds = args.test_max_seconds or 2 * args.max_seconds
    args.clock_max = args.clock_max or args.test_max_seconds
    if not args.min_seconds <= args.max_seconds <= args.test_max_seconds:
        parser.error("need --min_seconds <= --max_seconds <= --test_max_seconds")
    if args.offset_share and args.clock_max < args.max_seconds + 1:
        parser.error("--clock_max must leave room for a window: at least --max_seconds + 1")
    if args.seen_wordings > SEEN_WORDINGS:
        parser.error(f"--seen_wordings: each form has {SEEN_WORDINGS} training wordings")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    settings = Settings(args.fps, args.size, args.min_seconds, args.max_seconds, args.test_max_seconds, pick_codec(),
                        args.order_questions, args.order_answers, args.seen_wordings, args.offset_share,
                        args.clock_max)
    meta = generate(args.out, args.n_videos, args.n_test, args.seed, settings, args.workers)
    counts = meta["counts"]
    print(f"wrote {counts['train_videos']} train / {counts['test_videos']} test videos, "
          f"{counts['pretrain_samples']} pretrain / {counts['sft_video_samples']} sft_video / "
          f"{counts['test_samples']} test samples to {args.out} in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
