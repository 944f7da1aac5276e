"""The demo's report card: out/report.md, out/metrics.json, out/loss_curves.png, out/test_grid.png.

Reads what scripts/demo.sh leaves in --out_dir (eval metrics and predictions, step times, training
logs, the final checkpoint's metadata) and --data (meta.json, test.jsonl, the test videos).
The mean-summary ablation files are optional: without them that column is left out.
"""
import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from _repo import ROOT
from visualize import draw_answer_grid, plot_curves

TEMPORAL_CATEGORIES = ["direction", "order"]
CATEGORY_ORDER = ["colour", "shape", "count", "direction", "order", "caption"]
GRID_VIDEOS, GRID_FRAMES = 8, 4
GRID_PREFERENCE = ["order", "direction", "count", "colour", "shape", "caption"]   # the question shown


# ---------------------------------------------------------------- reading

def read_json(path, default=None):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


def read_jsonl(path):
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_checkpoint(out_dir: Path, weight=None) -> Path | None:
    """--weight, else the newest out/sft_video_<dim>.safetensors (the temporal model, not _mean)."""
    if weight:
        return Path(weight)
    found = [p for p in out_dir.glob("sft_video_*.safetensors") if re.fullmatch(r"sft_video_\d+", p.stem)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def checkpoint_info(path: Path | None) -> dict:
    """lm / vision config, stage, step and stored weight counts per part from the safetensors file."""
    if path is None or not path.is_file():
        return {}
    from model.checkpoint import read_metadata
    from model.weights_io import stored_sizes
    meta = read_metadata(path)
    counts = {}
    for key, size in stored_sizes(path).items():
        part = key.split(".")[0]
        counts[part] = counts.get(part, 0) + size
    return {"name": path.stem, "lm": json.loads(meta["lm_config"]), "vision": json.loads(meta["vision_config"]),
            "stage": meta.get("stage"), "step": meta.get("step"), "counts": counts}


def vision_info(vision_cfg: dict) -> dict:
    """Is the frozen encoder random? (a random-tower file says so in its metadata; no weights at all is random too)."""
    source = vision_cfg.get("clip_pretrained", "")
    path = source if Path(source).is_file() else str(ROOT / source)
    info = {"source": source, "random": not source, "params": None, "seed": None, "positional": None}
    if Path(path).is_file() and path.endswith(".safetensors"):
        from model.vision import read_weights_metadata
        from model.weights_io import stored_sizes
        meta = read_weights_metadata(path)
        info["random"] = meta.get("random_init") == "true"
        info["params"] = sum(stored_sizes(path).values())
        info["seed"], info["positional"] = meta.get("seed"), positional_note(meta)
    return info


def positional_note(meta: dict):
    """How the random tower's positional embedding differs from open_clip's init (see model/vision.py)."""
    kind = meta.get("positional_embedding")
    if not kind:
        return None
    what = "a fixed 2D sin-cos table" if kind == "2d-sincos" else f"`{kind}`"
    return f"its positional embedding replaced by {what}"


def temporal_accuracy(preds):
    rows = [p for p in preds if p.get("category") in TEMPORAL_CATEGORIES]
    return round(sum(bool(p["correct"]) for p in rows) / len(rows), 4) if rows else None


def count_by(preds, field, bucket=lambda v: v) -> Counter:
    """How many predictions fall in each bucket of `field` (those without the field are left out)."""
    return Counter(bucket(p[field]) for p in preds if p.get(field) is not None)


# ---------------------------------------------------------------- metrics.json

def build_metrics(temporal, mean, preds_t, preds_m, times, ckpt, vision):
    metrics = dict(temporal)
    metrics["temporal_categories"] = TEMPORAL_CATEGORIES
    metrics["temporal_accuracy"] = temporal_accuracy(preds_t)
    metrics["ablation_mean"] = None if mean is None else {
        "accuracy": mean.get("accuracy"), "by_category": mean.get("by_category", {}),
        "by_subset": mean.get("by_subset", {}), "by_phrasing": mean.get("by_phrasing", {}),
        "temporal_accuracy": temporal_accuracy(preds_m), "n": mean.get("n"),
        "caption_metrics": mean.get("caption_metrics")}
    metrics["demo_seconds"] = times.get("total")
    metrics["peak_rss_gb"] = times.get("peak_rss_gb")
    metrics["checkpoint"] = ckpt.get("name")
    metrics["vision_encoder_random"] = vision.get("random")
    return metrics


# ---------------------------------------------------------------- plots

def plot_loss_curves(logs: dict, path: Path, suffixes=("_mean",)):
    """One panel per stage (each ablation's run, named <run><suffix>, beside its model twin), loss vs step,
    val_loss as dots."""
    groups = {}
    for run in logs:
        twin = next((run.removesuffix(s) for s in suffixes if run.endswith(s)), run)
        groups.setdefault(twin, []).append(run)
    plot_curves(logs, path, groups=groups or None)


def pick_grid_rows(preds, records, n=GRID_VIDEOS):
    """(record, pred) for up to n test videos, half standard / half novel_combo where possible."""
    by_video = {}
    for p in preds:
        rec = records.get(p["id"])
        if rec and rec.get("video"):
            by_video.setdefault(rec["video"], []).append(p)
    chosen = {}
    for video, rows in sorted(by_video.items()):
        rank = {c: i for i, c in enumerate(GRID_PREFERENCE)}
        chosen[video] = min(rows, key=lambda p: rank.get(p.get("category"), len(rank)))
    queues = {}
    for video, p in chosen.items():
        queues.setdefault(p.get("subset") or "", []).append(video)
    order = []   # round-robin over the subsets, so novel combos show up too
    while any(queues.values()):
        for queue in queues.values():
            if queue:
                order.append(queue.pop(0))
    return [(records[chosen[v]["id"]], chosen[v]) for v in order[:n]]


def plot_test_grid(rows, data_dir: Path, num_frames: int, path: Path, fps=None):
    """Each row: 4 of the model's sampled frames, then question / answer / reference (green right, red wrong)."""
    from dataset.media import MediaError, read_video
    grid = []
    for record, pred in rows:
        item = {"frames": None, "colour": "green" if pred["correct"] else "red"}
        try:
            item["frames"] = read_video(data_dir / record["video"], num_frames, fps)
        except MediaError as e:
            item["error"] = str(e)
        question = record["conversations"][0]["content"].replace("<video>", "").strip()
        item["title"] = (f"{record['id']} [{pred.get('subset') or '-'}]  Q: {question}\n"
                         f"model: {pred['prediction'] or '(empty)'}   |   reference: {pred['reference']}")
        grid.append(item)
    draw_answer_grid(grid, path, columns=GRID_FRAMES)


# ---------------------------------------------------------------- report.md

def pct(x):
    return "–" if x is None else f"{100 * x:.1f}%"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def human(n):
    return "–" if n is None else (f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k")


def section_results(temporal, mean, preds_t, preds_m):
    counts = count_by(preds_t, "category")
    cats = sorted(set(temporal.get("by_category", {})) | set((mean or {}).get("by_category", {})),
                  key=lambda c: (CATEGORY_ORDER.index(c) if c in CATEGORY_ORDER else len(CATEGORY_ORDER), c))
    header = ["category", "n", "temporal (model)"] + (["mean (ablation)"] if mean else [])

    def row(name, n, t, m):
        return [name, n, pct(t)] + ([pct(m)] if mean else [])
    rows = [row(c + (" (temporal)" if c in TEMPORAL_CATEGORIES else ""), counts.get(c, "–"),
                temporal.get("by_category", {}).get(c), (mean or {}).get("by_category", {}).get(c)) for c in cats]
    n_temporal = sum(counts.get(c, 0) for c in TEMPORAL_CATEGORIES)
    rows.append(row("**temporal questions** (" + " + ".join(TEMPORAL_CATEGORIES) + ")", n_temporal or "–",
                    temporal_accuracy(preds_t), temporal_accuracy(preds_m) if mean else None))
    rows.append(row("**all**", temporal.get("n", "–"), temporal.get("accuracy"), (mean or {}).get("accuracy")))
    subsets = sorted(set(temporal.get("by_subset", {})) | set((mean or {}).get("by_subset", {})))
    subset_rows = [row(s, sum(p.get("subset") == s for p in preds_t) or "–", temporal.get("by_subset", {}).get(s),
                       (mean or {}).get("by_subset", {}).get(s)) for s in subsets]
    text = ["## Results (exact match on the test split)", ""]
    summary = f"Overall accuracy **{pct(temporal.get('accuracy'))}**"
    if mean:
        summary += (f" with the temporal VideoSummary vs **{pct(mean.get('accuracy'))}** with the frame-average "
                    f"(`mean`) ablation; on the temporal questions ({' + '.join(TEMPORAL_CATEGORIES)}) "
                    f"**{pct(temporal_accuracy(preds_t))}** vs **{pct(temporal_accuracy(preds_m))}**.")
    else:
        summary += " (the mean-summary ablation was not run: `ABLATION=0`)."
    text += [summary, "", "By category:", "", table(header, rows), "", "By subset (`novel_combo`: colour–shape–motion "
             "triples held out of training; every pair in them was seen):", "",
             table(["subset"] + header[1:], [[r[0]] + r[1:] for r in subset_rows]), ""]
    text += section_phrasing(temporal, mean, preds_t, row)
    text += section_captions(temporal.get("caption_metrics"), (mean or {}).get("caption_metrics"), mean is not None)
    if temporal.get("skipped"):
        text += [f"Skipped (unreadable) test samples: {temporal['skipped']}.", ""]
    text += ["![loss curves](loss_curves.png)", "", "Loss per optimizer step (log scale; dots: validation loss): "
             "[loss_curves.png](loss_curves.png)", "",
             "![test videos](test_grid.png)", "", "Test videos as the model sees them (4 of its sampled frames), one "
             "question each, the model's answer and the reference; green = correct, red = wrong: "
             "[test_grid.png](test_grid.png)", ""]
    return text


def section_phrasing(temporal, mean, preds, row):
    """Accuracy on the questions worded as in training vs in wordings only the test uses (absent when the
    test records carry no "phrasing")."""
    if not temporal.get("by_phrasing"):
        return []
    counts = count_by(preds, "phrasing")
    rows = [row(f"phrasing_{k}", counts.get(k, "–"), temporal["by_phrasing"].get(f"phrasing_{k}"),
                (mean or {}).get("by_phrasing", {}).get(f"phrasing_{k}")) for k in ("seen", "held_out")]
    header = ["phrasing", "n", "temporal (model)"] + (["mean (ablation)"] if mean else [])
    return ["By question wording (`phrasing_seen`: worded as in training; `phrasing_held_out`: the same kinds "
            "of question in wordings used only in the test, `meta.json` → `phrasings`):", "", table(header, rows), ""]


def section_captions(temporal, mean, with_mean):
    """BLEU-4 / ROUGE-L / CIDEr from eval.py (absent when there were no captions or no pycocoevalcap)."""
    if not temporal:
        return []

    def score(metrics, key):
        return "–" if not metrics or metrics.get(key) is None else f"{metrics[key]:.3f}"
    names = {"bleu4": "BLEU-4", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
    rows = [[name, score(temporal, key)] + ([score(mean, key)] if with_mean else []) for key, name in names.items()]
    header = ["metric", "temporal (model)"] + (["mean (ablation)"] if with_mean else [])
    return [f"Caption metrics on the {temporal.get('n')} {'/'.join(temporal.get('categories', ['caption']))} "
            "answers (pycocoevalcap scorers on lower-cased, punctuation-free words; corpus BLEU-4, mean ROUGE-L, "
            "CIDEr with idf from these references):", "", table(header, rows), ""]


def section_model(ckpt, vision, extra_vision_keys=()):
    if not ckpt:
        return ["## Model", "", "(no checkpoint found)", ""]
    lm, vis, counts = ckpt["lm"], ckpt["vision"], ckpt["counts"]
    lm_keys = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "rope_theta"]
    vis_keys = ["clip_model", "clip_image_size", "clip_dim", "num_frames", "summary", "num_visual_tokens",
                "summary_dim", "summary_layers", "summary_heads", *extra_vision_keys]
    rows = [[f"LM `{k}`", lm.get(k)] for k in lm_keys] + [[f"vision `{k}`", vis.get(k)] for k in vis_keys]
    rows.append(["vision `clip_pretrained`", f"`{vis.get('clip_pretrained') or '(none: open_clip random init)'}`"])
    text = ["## Model", "", f"Checkpoint `{ckpt['name']}.safetensors` (stage {ckpt.get('stage')}, "
            f"step {ckpt.get('step')}).", "", table(["setting", "value"], rows), ""]
    parts = [[f"`{part}`", human(n)] for part, n in sorted(counts.items())]
    parts.append(["**trained, total**", human(sum(counts.values()))])
    parts.append(["frozen CLIP image tower (not in the checkpoint)", human(vision.get("params"))])
    text += ["Weights (LM embeddings are tied to the output head and counted once; "
             "`summary` includes its 2 feature-statistics buffers):", "", table(["part", "weights"], parts), ""]
    return text


def section_data(meta):
    if not meta:
        return []
    c = meta.get("counts", {})
    return ["## Data", "", f"Synthetic coloured shapes (`scripts/make_synthetic.py`, seed {meta.get('seed')}): "
            f"{c.get('train_videos')} training videos and {c.get('images')} images "
            f"({meta.get('size')} px, {meta.get('frames')} frames at {meta.get('fps')} fps); "
            f"{c.get('test_videos')} test videos ({c.get('novel_combo_test_videos')} with held-out "
            f"colour–shape–motion combinations) → {c.get('test_samples')} test questions"
            f"{held_out_note(meta.get('test_phrasing'))}. Samples: "
            f"pretrain {c.get('pretrain_samples')}, image SFT {c.get('sft_image_samples')}, "
            f"video SFT {c.get('sft_video_samples')}.", ""]


def held_out_note(test_phrasing):
    if not test_phrasing:
        return ""
    return f", {test_phrasing.get('held_out', 0)} of them in held-out wordings"


def section_runs(logs, out_dir: Path):
    rows = []
    for run, log in logs.items():
        result = read_json(out_dir / "logs" / f"{run}.metrics.json", {})
        last = [r["loss"] for r in log[-10:]]
        tok_s = [r["tok_s"] for r in log if "tok_s" in r]
        rows.append([f"`{run}`", log[-1]["step"] if log else 0, f"{log[0]['loss']:.3f}" if log else "–",
                     f"{np.mean(last):.3f}" if last else "–",
                     f"{result['val_loss']:.3f}" if isinstance(result.get("val_loss"), float) else "–",
                     f"{np.median(tok_s):.0f}" if tok_s else "–", result.get("skipped", log[-1].get("skipped", 0) if log else 0)])
    return ["## Training runs", "", table(["run", "steps", "first loss", "final loss (mean of last 10)",
                                           "final val loss", "tokens/s (median)", "skipped samples"], rows), ""]


def section_time(times, rss, script="scripts/demo.sh"):
    steps = [(k, v) for k, v in times.items() if k not in ("total", "peak_rss_gb") and isinstance(v, (int, float))]
    if not steps:
        return ["## Time and memory", "", "(no out/demo_times.json)", ""]
    lanes = times.get("lanes") or {}
    rows = [[name, f"{sec:.1f}", f"{rss[name]:.2f}" if name in rss else "–", lanes.get(name, "")]
            for name, sec in steps]
    rows.append(["**total** (wall clock)", f"**{times.get('total', sum(v for _, v in steps)):.1f}**", "", ""])
    peak = times.get("peak_rss_gb")
    note = (" Steps with a lane ran side by side with the other lane of their group, each on its share of the cores, "
            "so their times overlap; the peak memory adds up side-by-side steps." if lanes else "")
    return ["## Time and memory", "", f"Wall-clock seconds per pipeline step (`{script}`; CPU unless CUDA "
            "was available), peak resident memory of each step's largest process." + note, "",
            table(["step", "seconds", "peak RSS (GB)", "lane"], rows), "",
            f"Total: **{times.get('total', 0) / 60:.1f} min**; peak memory: **{'–' if peak is None else f'{peak:.2f} GB'}**.",
            ""]


def section_reproduce(settings, script="scripts/demo.sh"):
    text = ["## Reproduce", "", f"From a clean checkout, offline: `bash {script}`."]
    if settings:
        env = " ".join(f"{k}={v!r}" if (not v or " " in v) else f"{k}={v}" for k, v in settings.items())
        text += ["With exactly the settings of this run:", "", "```bash", f"{env} bash {script}", "```"]
    return text + [""]


def build_report(temporal, mean, preds_t, preds_m, times, rss, ckpt, vision, meta, logs, settings, out_dir):
    vis = ckpt.get("vision", {}) if ckpt else {}
    if vision.get("random"):
        extra = []
        if vision.get("seed") is not None:
            extra.append(f"seed {vision['seed']}")
        if vision.get("positional"):
            extra.append(f"{vision['positional']} so that its CLS feature keeps where things are, "
                         f"see `model/vision.py`")
        encoder = (f"**The vision encoder is a RANDOMLY INITIALISED open_clip `{vis.get('clip_model')}` image tower** "
                   f"({vis.get('clip_image_size') or 'default'} px" + "".join(f"; {e}" for e in extra) +
                   "), frozen and never trained: no pretrained CLIP weights are used.")
    else:
        encoder = (f"The vision encoder is open_clip `{vis.get('clip_model')}` with pretrained weights "
                   f"`{vision.get('source')}`, frozen.")
    data = ("**The data is synthetic** (coloured shapes moving on a flat background), so nothing here is a claim "
            "about real-world video: the numbers show that the whole pipeline trains end to end, and what the "
            "temporal VideoSummary buys over a plain frame average on questions about motion and order.") \
        if meta else "The test data's meta.json was not found."
    text = ["# Tiny video LLM — demo report card", "",
            f"Written by `scripts/report.py` on {time.strftime('%Y-%m-%d %H:%M')} from `{out_dir}/`.", "",
            f"> {encoder}", ">", f"> {data}", ""]
    text += section_results(temporal, mean, preds_t, preds_m)
    text += section_model(ckpt, vision)
    text += section_data(meta)
    text += section_runs(logs, out_dir)
    text += section_time(times, rss)
    text += section_reproduce(settings)
    return "\n".join(text)


# ---------------------------------------------------------------- main

def select_logs(out_dir: Path, dim, suffixes=("",), stages=("pretrain_vlm", "sft_image", "sft_video")) -> dict:
    """This demo's runs (<stage>_<dim><suffix>, suffix "" for the model) when the log folder has them, else every log."""
    paths = sorted((out_dir / "logs").glob("*.jsonl"))
    if dim is not None:
        names = [f"{stage}_{dim}{sfx}" for sfx in suffixes for stage in stages]
        mine = [p for p in paths if p.stem in names]
        paths = sorted(mine, key=lambda p: names.index(p.stem)) if mine else paths
    return {p.stem: read_jsonl(p) for p in paths}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="out")
    p.add_argument("--data", default="dataset/synthetic", help="the dataset folder (meta.json, test.jsonl, videos/)")
    p.add_argument("--weight", default=None, help="the temporal model's checkpoint (default: newest out_dir/sft_video_<dim>)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out_dir, data_dir = Path(args.out_dir), Path(args.data)
    temporal = read_json(out_dir / "metrics_temporal.json")
    if temporal is None:
        sys.exit(f"error: {out_dir / 'metrics_temporal.json'}: not found (run eval.py --metrics_out first)")
    mean = read_json(out_dir / "metrics_mean.json")
    preds_t, preds_m = read_jsonl(out_dir / "preds_temporal.jsonl"), read_jsonl(out_dir / "preds_mean.jsonl")
    times, rss = read_json(out_dir / "demo_times.json", {}), read_json(out_dir / "demo_rss.json", {})
    settings = read_json(out_dir / "demo_settings.json", {})
    ckpt = checkpoint_info(find_checkpoint(out_dir, args.weight))
    vision = vision_info(ckpt.get("vision", {})) if ckpt else {"random": None}
    meta = read_json(data_dir / "meta.json")
    logs = select_logs(out_dir, ckpt.get("lm", {}).get("hidden_size") if ckpt else None,
                       ("", "_mean") if mean is not None else ("",))

    metrics = build_metrics(temporal, mean, preds_t, preds_m, times, ckpt, vision)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    plot_loss_curves(logs, out_dir / "loss_curves.png")
    records = {r["id"]: r for r in read_jsonl(data_dir / "test.jsonl")}
    from dataset.media import sampling_rate
    from model.config import VisionConfig, config_from_dict
    vis_cfg = config_from_dict(VisionConfig, ckpt["vision"]) if ckpt else VisionConfig()
    plot_test_grid(pick_grid_rows(preds_t, records), data_dir, vis_cfg.num_frames, out_dir / "test_grid.png",
                   sampling_rate(vis_cfg))
    report = build_report(temporal, mean, preds_t, preds_m, times, rss, ckpt, vision, meta, logs, settings, out_dir)
    (out_dir / "report.md").write_text(report + "\n")
    print(f"report: {out_dir / 'report.md'} (metrics.json, loss_curves.png, test_grid.png beside it)")


if __name__ == "__main__":
    main()
