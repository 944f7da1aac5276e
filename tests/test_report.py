"""scripts/report.py: the report card from a fake out/ folder (tiny checkpoint, fake metrics, one log)."""
import json

import pytest

from model.checkpoint import save_checkpoint
from model.config import LMConfig, VisionConfig
from model.vision import save_random_tower
from model.vlm import VideoLLM


def write_json(path, value):
    path.write_text(json.dumps(value))


def fake_metrics(preds):
    def acc(rows):
        return round(sum(r["correct"] for r in rows) / len(rows), 4) if rows else 0.0
    cats = {p["category"] for p in preds}
    subsets = {p["subset"] for p in preds}
    phrasings = {p["phrasing"] for p in preds}
    return {"accuracy": acc(preds), "n": len(preds), "skipped": 0, "seconds": 1.0,
            "by_category": {c: acc([p for p in preds if p["category"] == c]) for c in sorted(cats)},
            "by_subset": {s: acc([p for p in preds if p["subset"] == s]) for s in sorted(subsets)},
            "by_phrasing": {f"phrasing_{k}": acc([p for p in preds if p["phrasing"] == k]) for k in sorted(phrasings)}}


CAPTIONS = {"temporal": {"bleu4": 0.4321, "rouge_l": 0.6543, "cider": 2.3456, "n": 2, "categories": ["caption"]},
            "mean": {"bleu4": 0.1234, "rouge_l": 0.3456, "cider": 0.789, "n": 2, "categories": ["caption"]}}


@pytest.fixture
def fake_run(tmp_path):
    from make_synthetic import main as make_synthetic
    data, out = tmp_path / "data", tmp_path / "out"
    make_synthetic(["--out", str(data), "--n_videos", "2", "--n_test", "2", "--size", "32", "--frames", "4",
                    "--workers", "1"])
    out.mkdir()
    (out / "logs").mkdir()
    vision = tmp_path / "vit_tiny_random.safetensors"
    save_random_tower("ViT-Tiny-16", 32, 0, str(vision))
    model = VideoLLM(LMConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                              intermediate_size=64),
                     VisionConfig(clip_model="ViT-Tiny-16", clip_image_size=32, clip_pretrained=str(vision),
                                  clip_dim=16, num_frames=2, num_visual_tokens=2, summary_dim=16,
                                  summary_layers=1, summary_heads=2))
    save_checkpoint(model, out / "sft_video_32.safetensors", stage="video", step=3, tokenizer="model/tokenizer")

    tests = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    preds = {}
    for name, right_every in (("temporal", 2), ("mean", 3)):
        preds[name] = [{"id": r["id"], "category": r["category"], "subset": r["subset"], "phrasing": r["phrasing"],
                        "prediction": "red" if i % right_every else r["conversations"][-1]["content"],
                        "reference": r["conversations"][-1]["content"], "correct": i % right_every == 0}
                       for i, r in enumerate(tests)]
        (out / f"preds_{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds[name]))
        write_json(out / f"metrics_{name}.json", {**fake_metrics(preds[name]), "caption_metrics": CAPTIONS[name]})
    log = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "tok_s": 100.0, "skipped": 0} for s in (1, 2, 3)]
    log[-1]["val_loss"] = 1.5
    (out / "logs" / "sft_video_32.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    write_json(out / "logs" / "sft_video_32.metrics.json", {"step": 3, "skipped": 0, "bad_steps": 0, "val_loss": 1.4})
    write_json(out / "demo_times.json", {"data": 1.5, "eval": 2.0, "total": 3.5, "peak_rss_gb": 0.5})
    write_json(out / "demo_rss.json", {"data": 0.2, "eval": 0.5})
    return out, data, preds


def pct(x):
    return f"{100 * x:.1f}%"


def run_report(out, data):
    import report
    report.main(["--out_dir", str(out), "--data", str(data)])
    return (out / "report.md").read_text(), json.loads((out / "metrics.json").read_text())


def test_report_card(fake_run):
    out, data, preds = fake_run
    text, metrics = run_report(out, data)
    assert "random" in text.lower() and "RANDOMLY INITIALISED" in text
    assert "synthetic" in text.lower()
    assert "| category | n | temporal (model) | mean (ablation) |" in text
    for category in metrics["by_category"]:
        assert f"| {category}" in text
    assert "novel_combo" in text and "standard" in text
    assert {p["phrasing"] for p in preds["temporal"]} == {"seen", "held_out"}   # the fake run has both
    assert "| phrasing | n | temporal (model) | mean (ablation) |" in text
    for key in ("seen", "held_out"):
        n = sum(p["phrasing"] == key for p in preds["temporal"])
        model, ablation = (pct(metrics_of[f"phrasing_{key}"]) for metrics_of in
                           (metrics["by_phrasing"], metrics["ablation_mean"]["by_phrasing"]))
        assert f"| phrasing_{key} | {n} | {model} | {ablation} |" in text
    assert "in held-out wordings" in text
    assert "bash scripts/demo.sh" in text and "loss_curves.png" in text and "test_grid.png" in text

    for key in ("accuracy", "by_category", "by_subset", "n", "skipped", "ablation_mean", "temporal_categories",
                "temporal_accuracy", "demo_seconds", "peak_rss_gb"):
        assert key in metrics, key
    assert metrics["temporal_categories"] == ["direction", "order"]
    assert set(metrics["ablation_mean"]) >= {"accuracy", "by_category", "by_subset", "temporal_accuracy"}
    temporal_rows = [p for p in preds["temporal"] if p["category"] in ("direction", "order")]
    assert metrics["temporal_accuracy"] == pytest.approx(sum(p["correct"] for p in temporal_rows) / len(temporal_rows),
                                                         abs=1e-4)
    assert metrics["demo_seconds"] == 3.5 and metrics["peak_rss_gb"] == 0.5
    assert metrics["vision_encoder_random"] is True
    assert metrics["caption_metrics"] == CAPTIONS["temporal"]
    assert metrics["ablation_mean"]["caption_metrics"] == CAPTIONS["mean"]
    assert "| metric | temporal (model) | mean (ablation) |" in text
    for row in ("| BLEU-4 | 0.432 | 0.123 |", "| ROUGE-L | 0.654 | 0.346 |", "| CIDEr | 2.346 | 0.789 |"):
        assert row in text, row
    for png in ("loss_curves.png", "test_grid.png"):
        assert (out / png).stat().st_size > 1000


def test_report_without_ablation(fake_run):
    out, data, _ = fake_run
    for name in ("metrics_mean.json", "preds_mean.jsonl", "demo_times.json", "demo_rss.json"):
        (out / name).unlink()
    text, metrics = run_report(out, data)
    assert metrics["ablation_mean"] is None
    assert "mean (ablation)" not in text and "| category | n | temporal (model) |" in text
    assert "| phrasing | n | temporal (model) |" in text
    assert "| BLEU-4 | 0.432 |" in text


def test_report_without_caption_metrics(fake_run):
    out, data, _ = fake_run
    path = out / "metrics_temporal.json"
    write_json(path, {**json.loads(path.read_text()), "caption_metrics": None})   # eval ran without pycocoevalcap
    text, metrics = run_report(out, data)
    assert metrics["caption_metrics"] is None and "BLEU-4" not in text
    assert (out / "test_grid.png").is_file() and (out / "loss_curves.png").is_file()


def test_report_marks_side_by_side_steps(fake_run):
    out, data, _ = fake_run
    write_json(out / "demo_times.json", {"features_1": 2.0, "features_2": 2.1, "total": 2.5, "peak_rss_gb": 0.9,
                                         "lanes": {"features_1": "features:part1", "features_2": "features:part2"}})
    text, metrics = run_report(out, data)
    assert "| features_1 | 2.0 | – | features:part1 |" in text
    assert "side by side" in text and "**total** (wall clock)" in text
    assert metrics["demo_seconds"] == 2.5
