"""The temporal demo's report card: report.md, metrics.json, timeline.png, loss_curves.png in --out_dir.

Reads what scripts/demo_temporal.sh leaves in --out_dir (metrics_<name>.json and preds_<name>.jsonl
for the model, "temporal", and each ablation; step times, settings, training logs, the model's
checkpoint) and --data (the temporal suite's meta.json). Shares its readers, tables and sections
with scripts/report.py; a missing ablation is left out.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import _repo  # noqa: F401  (puts the repository root on sys.path)
from dataset.timespan import parse_span
from report import (checkpoint_info, count_by, find_checkpoint, pct, plot_loss_curves, read_json, read_jsonl, section_model, section_reproduce,
                    section_runs, section_time, select_logs, table, vision_info)
from visualize import pyplot

SCRIPT = "scripts/demo_temporal.sh"
ABLATIONS = ("mean", "no_time")
ABLATION_NOTES = {"mean": "frame average, no temporal summary",
                  "no_time": "temporal summary without any time embedding (token order only)"}
CATEGORY_ORDER = ["order", "count", "speed", "grounding", "needle_what", "needle_when", "reversed", "speed_change",
                  "followup"]
TIMELINE_CATEGORIES = ("needle_when", "grounding")   # the questions whose answer is a span of time
TIMELINE_VIDEOS = 6
METRIC_KEYS = ("accuracy", "by_category", "by_subset", "by_duration", "grounding_by_duration", "by_phrasing",
               "grounding", "choices", "n")
CHOICE_FIGURES = ("generated", "answered_a_choice", "ranked")   # a cell of the multiple-choice table, in order


# ---------------------------------------------------------------- metrics.json

def run_figures(metrics: dict) -> dict:
    """The keys metrics.json keeps for one run (the model or an ablation)."""
    figures = {key: metrics.get(key) for key in METRIC_KEYS}
    for key in ("by_category", "by_subset", "by_duration", "grounding_by_duration", "by_phrasing"):
        figures[key] = figures[key] or {}
    return figures


def build_metrics(runs: dict, times, ckpt, vision, settings) -> dict:
    metrics = run_figures(runs["temporal"])
    for name in runs.get("ablations", {}):
        metrics[f"ablation_{name}"] = run_figures(runs["ablations"][name]) if runs["ablations"][name] else None
    metrics.update({"demo_seconds": times.get("total"), "peak_rss_gb": times.get("peak_rss_gb"),
                    "checkpoint": ckpt.get("name"), "vision_encoder_random": vision.get("random"),
                    "settings": settings})
    return metrics


# ---------------------------------------------------------------- timeline picture

def parse_prediction_span(text):
    """The span in an answer; None for no answer (an ablation that skipped the record) or no span."""
    return parse_span(text or "")


def pick_timeline_rows(preds, n=TIMELINE_VIDEOS):
    """Up to n span questions with a known duration, one per video, needle_when and grounding taking turns."""
    queues = {c: [p for p in preds if p.get("category") == c and p.get("span") and p.get("duration")]
              for c in TIMELINE_CATEGORIES}
    rows, used_videos = [], set()
    while len(rows) < n and any(queues.values()):
        for queue in queues.values():
            while queue and len(rows) < n:
                pred = queue.pop(0)
                video = pred["id"].split("-")[0]   # ids are <video>-<question form>
                if video not in used_videos:
                    used_videos.add(video)
                    rows.append(pred)
                    break
    return rows


def plot_timeline(rows, ablation_preds: dict, path: Path):
    """One panel per test video: the true span, the model's and each ablation's predicted span, over the video's length."""
    plt = pyplot()
    fig, axes = plt.subplots(max(len(rows), 1), 1, figsize=(9, 0.4 + (1.1 + 0.25 * len(ablation_preds)) * max(len(rows), 1)),
                             squeeze=False)
    by_id = {name: {p["id"]: p for p in preds} for name, preds in ablation_preds.items()}
    for ax, row in zip(axes[:, 0], rows):
        bars = [("true", tuple(row["span"]), "tab:green"), ("model", parse_prediction_span(row["prediction"]), "tab:blue")]
        bars += [(name, parse_prediction_span(by_id[name].get(row["id"], {}).get("prediction")), "tab:gray")
                 for name in ablation_preds]
        for y, (label, span, colour) in enumerate(bars):
            if span is not None:
                ax.barh(y, max(span[1] - span[0], row["duration"] / 200), left=span[0], color=colour, height=0.6)
            else:
                ax.text(0, y, "  (no span in the answer)", va="center", fontsize=7, color="gray")
        ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
        ax.set_xlim(0, row["duration"])
        ax.invert_yaxis()
        ax.set_title(f"{row['id']} ({row['category']}, {row['duration']:.1f} s, IoU {row.get('iou', 0):.2f})",
                     fontsize=8, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no grounding / needle_when predictions", ha="center", va="center")
        axes[0, 0].axis("off")
    axes[-1, 0].set_xlabel("seconds (axis = the video's length)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- report.md

def run_columns(runs: dict):
    """[(column title, metrics)] for the model and each ablation that ran."""
    columns = [("model (seconds)", runs["temporal"])]
    return columns + [(f"{name} (ablation)", m) for name, m in runs.get("ablations", {}).items() if m]


def keyed_table(first, keys, columns, counts, pick, fmt=pct):
    """A table of keys × runs: `pick(metrics)` is the run's {key: value}."""
    rows = [[key, counts.get(key, "–")] + [fmt((pick(m) or {}).get(key)) for _, m in columns] for key in keys]
    return table([first, "n"] + [title for title, _ in columns], rows)


def ordered(keys, order):
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def section_results(runs: dict, preds: list):
    from dataset.metrics import DURATION_BUCKETS, duration_bucket
    columns = run_columns(runs)
    model = runs["temporal"]
    cats = ordered({c for _, m in columns for c in m.get("by_category", {})}, CATEGORY_ORDER)
    subsets = sorted({s for _, m in columns for s in m.get("by_subset", {})})
    buckets = ordered({b for _, m in columns for b in m.get("by_duration", {})}, [b[0] for b in DURATION_BUCKETS])
    text = ["## Results (exact match on the test split)", "",
            " · ".join(f"{title}: **{pct(m.get('accuracy'))}**" for title, m in columns) + " overall.", "",
            "By category:", "", keyed_table("category", cats, columns, count_by(preds, "category"),
                                            lambda m: m.get("by_category")), "",
            "By subset (`novel_combo`: event combinations held out of training):", "",
            keyed_table("subset", subsets, columns, count_by(preds, "subset"), lambda m: m.get("by_subset")), "",
            "By video length (accuracy; test videos run up to twice the longest training video):", "",
            keyed_table("duration", buckets, columns, count_by(preds, "duration", duration_bucket),
                        lambda m: m.get("by_duration")), "",
            "Grounding mIoU by video length:", "",
            keyed_table("duration", buckets, columns, count_by([p for p in preds if p.get("iou") is not None],
                                                               "duration", duration_bucket),
                        lambda m: m.get("grounding_by_duration"), fmt=number), "",
            "Question wording seen in training vs held out (same kinds of question, new wordings):", "",
            keyed_table("phrasing", ["phrasing_seen", "phrasing_held_out"], columns,
                        {f"phrasing_{k}": n for k, n in count_by(preds, "phrasing").items()},
                        lambda m: m.get("by_phrasing")), ""]
    if model.get("skipped"):
        text += [f"Skipped (unreadable) test samples: {model['skipped']}.", ""]
    return text + section_grounding(columns) + section_choices(columns)


def choice_cell(figures) -> str:
    return " / ".join(pct((figures or {}).get(key)) for key in CHOICE_FIGURES)


def section_choices(columns):
    """Questions that offer their answers: what each run wrote against the option it finds likeliest."""
    offered = [(title, m["choices"]) for title, m in columns if m.get("choices")]
    if not offered:
        return []
    first = offered[0][1]
    rows = [[cat, first["by_category"][cat]["n"]] + [choice_cell(ch["by_category"].get(cat)) for _, ch in offered]
            for cat in ordered(first["by_category"], CATEGORY_ORDER)]
    rows.append(["all", first["n"]] + [choice_cell(ch) for _, ch in offered])
    return ["## Questions that offer their answers", "",
            "\"Which happens first: A or B?\" and the like: accuracy of the written answers / share of them that are "
            "one of the options / accuracy of the option the run finds likeliest (in no figure above; "
            "docs/metrics.md).", "",
            table(["category", "n"] + [title for title, _ in offered], rows), ""]


def number(x):
    return "–" if x is None else f"{x:.3f}"


def section_grounding(columns):
    keys = [("miou", "mIoU", number), ("r@0.3", "R@0.3", pct), ("r@0.5", "R@0.5", pct), ("r@0.7", "R@0.7", pct),
            ("n", "n", str), ("unparsed", "answers with no span", str)]
    rows = [[label] + [fmt(m["grounding"].get(key)) if m.get("grounding") else "–" for _, m in columns]
            for key, label, fmt in keys]
    return ["## Grounding (answers that are spans of time)", "",
            "Temporal IoU of the answer's span with the true one (`grounding` and `needle_when` questions; an answer "
            "with no readable span scores 0); R@k: share of answers with IoU ≥ k.", "",
            table(["metric"] + [title for title, _ in columns], rows), "",
            "![timeline](timeline.png)", "", "True (green) vs predicted spans (blue: the model, gray: the ablations) "
            "for a few test videos, each on its own length: [timeline.png](timeline.png)", ""]


def section_data(meta):
    if not meta:
        return ["## Data", "", "(the temporal suite's meta.json was not found)", ""]
    s, c = meta.get("settings", {}), meta.get("counts", {})
    cats = ", ".join(f"{k} {v}" for k, v in (meta.get("test_categories") or {}).items())
    return ["## Data", "", f"The synthetic temporal suite (`scripts/make_temporal.py`, seed {meta.get('seed')}): "
            f"coloured shapes that appear, leave, move, bounce, hop and turn at known times, on clips of "
            f"{s.get('min_seconds')}–{s.get('max_seconds')} s for training and up to {s.get('test_max_seconds')} s "
            f"for testing ({s.get('size')} px, {s.get('fps')} fps). {c.get('train_videos')} training videos and "
            f"{c.get('test_videos')} test videos (reversed and sped-up pair members included) → "
            f"{c.get('pretrain_samples')} pretrain captions, {c.get('sft_video_samples')} video SFT samples, "
            f"{c.get('test_samples')} test questions ({cats}).", "",
            "There is **no image stage**: the suite has no images, so the video SFT starts from the caption "
            "pretraining.", ""]


def section_settings(settings):
    if not settings:
        return []
    return ["## Settings", "", table(["setting", "value"], [[f"`{k}`", f"`{v}`"] for k, v in settings.items()]), ""]


def header(ckpt, vision, out_dir, ablations):
    vis = ckpt.get("vision", {}) if ckpt else {}
    if vision.get("random") is False:
        encoder = f"The vision encoder is open_clip `{vis.get('clip_model')}` with weights `{vision.get('source')}`, frozen."
    else:
        encoder = (f"**The vision encoder is a RANDOMLY INITIALISED open_clip `{vis.get('clip_model')}` image tower** "
                   f"({vis.get('clip_image_size') or 'default'} px), frozen and never trained: no pretrained CLIP "
                   "weights are used.")
    runs = "; ".join(f"`{name}`: {ABLATION_NOTES.get(name, name)}" for name in ablations) or "none run"
    return ["# Tiny video LLM — temporal demo report card", "",
            f"Written by `scripts/report_temporal.py` on {time.strftime('%Y-%m-%d %H:%M')} from `{out_dir}/`.", "",
            f"> {encoder}", ">", "> **The data is synthetic** (shapes on a flat background with timed events), so "
            "nothing here is a claim about real video: the numbers show the pipeline training end to end, and what "
            "absolute-time embeddings buy on questions about order, counts, speed and when things happen.", "",
            f"The model: temporal VideoSummary with absolute-time embeddings (`--time_encoding seconds`), frames "
            f"sampled by fps (`--frame_sampling fps`), {budget(vis)}. Ablations: {runs}.", ""]


def budget(vis: dict) -> str:
    """The visual-token budget in words, from the checkpoint's vision config."""
    seconds, k = vis.get("segment_seconds") or 0, vis.get("num_visual_tokens")
    if not seconds:
        return f"{k} visual tokens per video"
    return f"an appearance and a motion token per {seconds:g} s of video, at most {k} (`--segment_seconds`)"


def build_report(runs, preds, ckpt, vision, meta, logs, times, rss, settings, out_dir):
    text = header(ckpt, vision, out_dir, list(runs.get("ablations", {})))
    text += section_results(runs, preds)
    text += ["![loss curves](loss_curves.png)", "", "Loss per optimizer step (dots: validation loss): "
             "[loss_curves.png](loss_curves.png)", ""]
    text += section_model(ckpt, vision, extra_vision_keys=("frame_sampling", "sample_fps", "time_encoding",
                                                            "segment_seconds"))
    text += section_data(meta)
    text += section_runs(logs, out_dir)
    text += section_time(times, rss, script=SCRIPT)
    text += section_settings(settings)
    text += section_reproduce(settings, script=SCRIPT)
    return "\n".join(text)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="out/temporal")
    p.add_argument("--data", default="dataset/synthetic_temporal", help="the temporal suite's folder (meta.json)")
    p.add_argument("--weight", default=None, help="the model's checkpoint (default: newest out_dir/sft_video_<dim>)")
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), help="ablation names (metrics_<name>.json)")
    return p.parse_args(argv)


def read_runs(out_dir: Path, ablations):
    """({"temporal": metrics, "ablations": {name: metrics or None}}, {name: preds}); exits if the model's metrics are missing."""
    model = read_json(out_dir / "metrics_temporal.json")
    if model is None:
        sys.exit(f"error: {out_dir / 'metrics_temporal.json'}: not found (run eval.py --metrics_out first)")
    runs = {"temporal": model, "ablations": {name: read_json(out_dir / f"metrics_{name}.json") for name in ablations}}
    preds = {name: read_jsonl(out_dir / f"preds_{name}.jsonl") for name in ["temporal", *ablations]}
    return runs, preds


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    runs, preds = read_runs(out_dir, args.ablations)
    times, rss = read_json(out_dir / "demo_times.json", {}), read_json(out_dir / "demo_rss.json", {})
    settings = read_json(out_dir / "demo_settings.json", {})
    ckpt = checkpoint_info(find_checkpoint(out_dir, args.weight))
    vision = vision_info(ckpt.get("vision", {})) if ckpt else {"random": None}
    ran = [name for name in args.ablations if runs["ablations"][name]]
    suffixes = tuple(f"_{name}" for name in ran)
    logs = select_logs(out_dir, ckpt.get("lm", {}).get("hidden_size") if ckpt else None, ("", *suffixes),
                       stages=("pretrain_vlm", "sft_video"))

    metrics = build_metrics(runs, times, ckpt, vision, settings)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    plot_loss_curves(logs, out_dir / "loss_curves.png", suffixes=suffixes)
    plot_timeline(pick_timeline_rows(preds["temporal"]), {name: preds[name] for name in ran}, out_dir / "timeline.png")
    report = build_report(runs, preds["temporal"], ckpt, vision, read_json(Path(args.data) / "meta.json"), logs,
                          times, rss, settings, out_dir)
    (out_dir / "report.md").write_text(report + "\n")
    print(f"report: {out_dir / 'report.md'} (metrics.json, timeline.png, loss_curves.png beside it)")


if __name__ == "__main__":
    main()
