"""Pictures of a model and its runs: a video's sampled frames with questions and the model's answers, and
loss / learning-rate curves of one or several runs from out/logs/.

    python scripts/visualize.py frames --weight sft_video_128 --video clip.mp4 --question "What happens?" --out frames.png
    python scripts/visualize.py curves --runs sft_video_128 sft_video_128_lora --out curves.png
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from _repo import ROOT

FRAME_INCHES = 2.1   # width of one frame in the figures


class VisualizeError(Exception):
    """Missing logs or bad flags; one line."""


def pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only, never a window
    import matplotlib.pyplot as plt
    return plt


# ---------------------------------------------------------------- frames with questions and answers

def pick_frames(count: int, wanted: int) -> np.ndarray:
    """Up to `wanted` indices spread evenly over `count` frames, first and last included."""
    return np.unique(np.linspace(0, count - 1, min(count, wanted)).round().astype(int))


def draw_answer_grid(rows, path, columns: int):
    """One figure row per item: up to `columns` of its frames, its title above (coloured).

    rows: dicts with "frames" (T×H×W×3 uint8, or None), "title" (text; newlines allowed), "colour",
    and optionally "error" (shown instead of frames).
    """
    plt = pyplot()
    n_rows = max(1, len(rows))
    title_lines = max((r["title"].count("\n") + 1 for r in rows), default=1)
    fig, axes = plt.subplots(n_rows, columns, figsize=(FRAME_INCHES * columns, (2.1 + 0.17 * title_lines) * n_rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, ax_row in zip(rows, axes):
        frames = row.get("frames")
        if frames is not None and len(frames):
            for ax, i in zip(ax_row, pick_frames(len(frames), columns)):
                ax.imshow(frames[i])
                ax.set_xlabel(f"frame {i + 1}/{len(frames)}", fontsize=7)
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
        elif row.get("error"):
            ax_row[0].text(0, 0.5, row["error"][:80], fontsize=7)
        ax_row[0].set_title(row["title"], loc="left", fontsize=8, color=row.get("colour", "black"))
    if not rows:
        axes[0][0].text(0, 0.5, "nothing to show")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)   # "tight" keeps long titles inside the picture
    plt.close(fig)


def answer_frames(engine, media_path, kind, questions, options):
    """(the pixels the model sees, [(question, answer)]): each question asked fresh about the media."""
    pixels, seen = engine.read_media(media_path, kind)
    answers = [(q, engine.reply([{"role": "user", "content": f"<{kind}>\n{q}"}], [seen], options))
               for q in questions]
    return pixels, answers


def frames_figure(args):
    from model.engine import Engine, SamplingOptions
    engine = Engine.load(weight=args.weight, lora=args.lora, out_dir=args.out_dir, device=args.device)
    kind, media = ("video", args.video) if args.video else ("image", args.image)
    pixels, answers = answer_frames(engine, media, kind, args.question,
                                    SamplingOptions(max_new_tokens=args.max_new_tokens))
    qa = "\n".join(f"Q: {q}\nA: {a or '(empty)'}" for q, a in answers)
    title = f"{Path(media).name} — {engine.name}\n{qa}"
    draw_answer_grid([{"frames": pixels, "title": title}], args.out, columns=min(len(pixels), args.columns))
    return answers


# ---------------------------------------------------------------- curves

def read_log(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(logs: dict, path, groups=None, show_lr=False):
    """Loss per optimizer step (log scale; validation loss as dots), one panel per group of runs
    (default: every run in one panel), and with show_lr a last panel of the learning-rate schedules."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter
    groups = groups if groups is not None else {"loss": list(logs)}
    colours = {}
    for runs in groups.values():   # a run keeps its colour in every panel
        for i, run in enumerate(sorted(runs)):
            colours.setdefault(run, f"C{i}")
    panels = [(title, runs, "loss") for title, runs in groups.items()]
    panels += [("learning rate", list(logs), "lr")] if show_lr else []
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (title, runs, key) in zip(axes[0], panels):
        lr_panel = key == "lr"
        for run in sorted(runs):
            rows, colour = logs[run], colours.get(run, "C0")
            ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r],
                    color=colour, lw=1, label=run)
            val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
            if val and not lr_panel:
                ax.plot(*zip(*val), "o", color=colour, ms=4, label=f"{run} val")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3, which="both")
        if runs:
            ax.legend(fontsize=7)
        if lr_panel:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        elif any(logs[r] for r in runs):
            ax.set_yscale("log")
            plain = FuncFormatter(lambda y, _: f"{y:g}")   # 6.8, not 6.8×10⁰
            low, high = ax.get_ylim()
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())   # label 2..9 within a decade
    axes[0][0].set_ylabel("loss (per token)")
    if not logs:
        axes[0][0].text(0.5, 0.5, "no training logs found", ha="center", transform=axes[0][0].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_figure(args):
    log_dir = Path(args.log_dir)
    if args.runs:
        paths = [Path(r) if Path(r).is_file() else log_dir / f"{r}.jsonl" for r in args.runs]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            held = sorted(p.stem for p in log_dir.glob("*.jsonl"))
            raise VisualizeError(f"no training log {', '.join(missing)}; {log_dir}/ holds: {', '.join(held) or 'nothing'}")
    else:
        paths = sorted(log_dir.glob("*.jsonl"))
        if not paths:
            raise VisualizeError(f"{log_dir}/: no training logs (*.jsonl)")
    logs = {p.stem: read_log(p) for p in paths}
    plot_curves(logs, args.out, show_lr=not args.no_lr)
    return logs


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("frames", help="a video's (image's) sampled frames with questions and the model's answers")
    f.add_argument("--weight", default=None, help="checkpoint (path or name in --out_dir); with --lora: its base")
    f.add_argument("--lora", default=None, help="LoRA adapter folder to apply")
    media = f.add_mutually_exclusive_group(required=True)
    media.add_argument("--video")
    media.add_argument("--image")
    f.add_argument("--question", nargs="+", default=["What happens in the video?"])
    f.add_argument("--columns", type=int, default=8, help="frames shown at most (spread over the sampled ones)")
    f.add_argument("--max_new_tokens", type=int, default=48)
    f.add_argument("--device", default="cpu")
    f.add_argument("--out_dir", default="out")
    f.add_argument("--out", default="out/frames.png")
    c = sub.add_parser("curves", help="loss (and learning-rate) curves of one or several runs")
    c.add_argument("--runs", nargs="*", default=None, help="run names in --log_dir or log paths (default: all)")
    c.add_argument("--log_dir", default="out/logs")
    c.add_argument("--no_lr", action="store_true", help="loss panel only")
    c.add_argument("--out", default="out/curves.png")
    args = p.parse_args(argv)
    if args.command == "frames" and not (args.weight or args.lora):
        p.error("frames: give --weight (a checkpoint) or --lora (an adapter folder)")
    return args


def main(argv=None):
    from model.engine import INPUT_ERRORS
    args = parse_args(argv)
    try:
        if args.command == "frames":
            frames_figure(args)
        else:
            curves_figure(args)
    except (VisualizeError, *INPUT_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
