"""scripts/report_temporal.py on a fabricated out/ folder, and scripts/demo_temporal.sh end to end at toy sizes."""
import json
import os
import subprocess

import pytest

from conftest import ROOT
from model.checkpoint import save_checkpoint
from model.config import LMConfig, VisionConfig
from model.vision import save_random_tower
from model.vlm import VideoLLM

RUNS = {"temporal": 2, "mean": 3, "no_time": 4}   # run name → every n-th answer is right
TOY = {"N_VIDEOS": "6", "N_TEST": "3", "MAX_SECONDS": "8", "VIDEO_SIZE": "32", "CLIP_MODEL": "ViT-Tiny-16",
       "CLIP_SIZE": "32", "FRAME_CAP": "8", "K": "2", "DIM": "32", "SUMMARY_DIM": "32", "LAYERS": "1",
       "VOCAB": "512", "BS": "8", "PRE_EPOCHS": "1", "VID_EPOCHS": "1"}   # demo settings for a run of seconds


def fabricated_preds(right_every):
    """Eight test questions over four videos: two span questions each, with durations and phrasings."""
    rows = []
    for v in range(4):
        duration = 6.0 + 20 * v
        for j, category in enumerate(("grounding", "needle_when" if v % 2 else "order")):
            i = 2 * v + j
            span = [1.0 + v, 3.0 + v] if category != "order" else None
            reference = f"from {span[0]:.1f} s to {span[1]:.1f} s" if span else "the ring"
            right = i % right_every == 0
            prediction = reference if right else ("from 0.0 s to 1.5 s" if span else "the star")
            row = {"id": f"t{v:05d}-{category}", "category": category, "subset": "seen" if v < 2 else "novel_combo",
                   "prediction": prediction, "reference": reference, "correct": right, "duration": duration,
                   "phrasing": "seen" if i % 3 else "held_out"}
            if span:
                row.update(span=span, iou=1.0 if right else 0.25 if v == 1 else 0.0)
            rows.append(row)
    return rows


def fabricated_metrics(preds):
    def acc(rows):
        return round(sum(r["correct"] for r in rows) / len(rows), 4) if rows else 0.0
    grounded = [p for p in preds if "iou" in p]
    return {"accuracy": acc(preds), "n": len(preds), "skipped": 0,
            "by_category": {c: acc([p for p in preds if p["category"] == c]) for c in {p["category"] for p in preds}},
            "by_subset": {s: acc([p for p in preds if p["subset"] == s]) for s in {p["subset"] for p in preds}},
            "by_duration": {"0-10s": acc(preds[:2]), "10-30s": acc(preds[2:4]), "30-60s": acc(preds[4:])},
            "grounding_by_duration": {"0-10s": 0.5, "10-30s": 0.25, "30-60s": 0.1},
            "by_phrasing": {"phrasing_seen": acc([p for p in preds if p["phrasing"] == "seen"]),
                            "phrasing_held_out": acc([p for p in preds if p["phrasing"] == "held_out"])},
            "grounding": {"miou": round(sum(p["iou"] for p in grounded) / len(grounded), 4), "r@0.3": 0.5,
                          "r@0.5": 0.5, "r@0.7": 0.5, "n": len(grounded), "unparsed": 0},
            "choices": {"generated": 0.25, "answered_a_choice": 0.5, "ranked": 0.75, "n": 4,
                        "by_category": {"order": {"generated": 0.25, "answered_a_choice": 0.5, "ranked": 0.75, "n": 4}}}}


def write_json(path, value):
    path.write_text(json.dumps(value))


@pytest.fixture
def fake_run(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    (out / "logs").mkdir(parents=True)
    data.mkdir()
    vision = tmp_path / "vit_tiny_random.safetensors"
    save_random_tower("ViT-Tiny-16", 32, 0, str(vision))
    model = VideoLLM(LMConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                              intermediate_size=64),
                     VisionConfig(clip_model="ViT-Tiny-16", clip_image_size=32, clip_pretrained=str(vision),
                                  clip_dim=16, num_frames=4, num_visual_tokens=2, summary_dim=16, summary_layers=1,
                                  summary_heads=2, frame_sampling="fps", sample_fps=1.0, time_encoding="seconds"))
    save_checkpoint(model, out / "sft_video_32.safetensors", stage="video", step=3, tokenizer="model/tokenizer")
    for name, right_every in RUNS.items():
        preds = fabricated_preds(right_every)
        (out / f"preds_{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        write_json(out / f"metrics_{name}.json", fabricated_metrics(preds))
        sfx = "" if name == "temporal" else f"_{name}"
        for stage in ("pretrain_vlm", "sft_video"):
            log = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "tok_s": 100.0, "skipped": 0} for s in (1, 2, 3)]
            (out / "logs" / f"{stage}_32{sfx}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    write_json(out / "demo_times.json", {"data": 1.5, "eval": 2.0, "total": 3.5, "peak_rss_gb": 0.5,
                                         "lanes": {"eval": "train:model"}})
    write_json(out / "demo_settings.json", {"N_VIDEOS": "24", "ABLATIONS": "mean no_time"})
    write_json(data / "meta.json", {"seed": 0, "settings": {"fps": 4, "size": 64, "min_seconds": 4.0,
               "max_seconds": 12.0, "test_max_seconds": 24.0}, "counts": {"train_videos": 4, "test_videos": 4},
               "test_categories": {"grounding": 4, "needle_when": 2, "order": 2}})
    return out, data


def run_report(out, data, *extra):
    from report_temporal import main
    main(["--out_dir", str(out), "--data", str(data), *extra])
    return json.loads((out / "metrics.json").read_text()), (out / "report.md").read_text()


def test_metrics_json_has_the_schema_for_the_model_and_each_ablation(fake_run):
    metrics, _ = run_report(*fake_run)
    keys = {"accuracy", "by_category", "by_subset", "by_duration", "by_phrasing", "grounding"}
    for figures in (metrics, metrics["ablation_mean"], metrics["ablation_no_time"]):
        assert keys <= set(figures)
        assert {"miou", "r@0.3", "r@0.5", "r@0.7"} <= set(figures["grounding"])
        assert set(figures["by_phrasing"]) == {"phrasing_seen", "phrasing_held_out"}
    assert metrics["accuracy"] == fabricated_metrics(fabricated_preds(2))["accuracy"]
    assert metrics["ablation_mean"]["accuracy"] == fabricated_metrics(fabricated_preds(3))["accuracy"]
    assert metrics["vision_encoder_random"] is True and metrics["checkpoint"] == "sft_video_32"
    assert metrics["demo_seconds"] == 3.5 and metrics["settings"]["N_VIDEOS"] == "24"


def test_report_has_the_tables_the_timeline_and_the_caveats(fake_run):
    out, data = fake_run
    _, text = run_report(out, data)
    columns = "| model (seconds) | mean (ablation) | no_time (ablation) |"
    for first in ("| category | n ", "| subset | n ", "| duration | n ", "| phrasing | n ", "| metric "):
        assert any(line.startswith(first) and line.endswith(columns) for line in text.splitlines()), first
    for needle in ("RANDOMLY INITIALISED", "synthetic", "no image stage", "| needle_when |", "| 30-60s |",
                   "| phrasing_held_out |", "| mIoU |", "| R@0.7 |", "![timeline](timeline.png)",
                   "scripts/demo_temporal.sh", "## Time and memory", "## Settings", "`time_encoding`"):
        assert needle in text, needle
    for png in ("timeline.png", "loss_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_card_sets_the_likeliest_option_beside_the_written_answers(fake_run):
    out, data = fake_run
    metrics, text = run_report(out, data)
    assert metrics["choices"]["ranked"] == 0.75 and metrics["ablation_mean"]["choices"]["n"] == 4
    assert "| order | 4 | 25.0% / 50.0% / 75.0% |" in text and "| all | 4 |" in text
    for name in RUNS:   # no multiple-choice records: the key says so and the card has no such section
        path = out / f"metrics_{name}.json"
        write_json(path, {**json.loads(path.read_text()), "choices": None})
    metrics, text = run_report(out, data)
    assert metrics["choices"] is None and "offer their answers" not in text


def test_a_missing_ablation_is_left_out(fake_run):
    out, data = fake_run
    (out / "metrics_no_time.json").unlink()
    metrics, text = run_report(out, data)
    assert metrics["ablation_no_time"] is None and metrics["ablation_mean"] is not None
    assert "no_time (ablation)" not in text and "mean (ablation)" in text


def test_no_model_metrics_is_one_line(fake_run):
    out, data = fake_run
    (out / "metrics_temporal.json").unlink()
    with pytest.raises(SystemExit) as e:
        run_report(out, data)
    assert "metrics_temporal.json: not found" in str(e.value) and "\n" not in str(e.value)


def test_timeline_rows_are_span_questions_one_per_video_taking_turns():
    from report_temporal import pick_timeline_rows
    preds = fabricated_preds(2)
    rows = pick_timeline_rows(preds, n=3)
    assert [r["category"] for r in rows] == ["needle_when", "grounding", "needle_when"]
    assert len({r["id"].split("-")[0] for r in rows}) == 3 and all(r["span"] for r in rows)
    assert pick_timeline_rows([p for p in preds if p["category"] == "order"]) == []


def test_demo_temporal_end_to_end_at_toy_sizes(tmp_path):
    """The whole script at toy sizes (tiny tower, a few short clips): every step runs and the card comes out."""
    out, data = tmp_path / "out", tmp_path / "data"
    env = {**os.environ, **TOY, "OUT_DIR": str(out), "DATA_DIR": str(data),
           "TOWER_FILE": str(tmp_path / "tower.safetensors")}
    run = subprocess.run(["bash", "scripts/demo_temporal.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ablation_mean"] and metrics["ablation_no_time"] and metrics["grounding"]
    times = json.loads((out / "demo_times.json").read_text())
    for name in ("data", "tokenizer", "features_1", "features_2", "pretrain", "sft_video", "eval", "eval_mean",
                 "eval_no_time", "report", "total"):
        assert name in times, name
    assert "sft_image" not in times and (out / "timeline.png").is_file() and (out / "report.md").is_file()
    assert {times["lanes"][f"eval{s}"] for s in ("", "_mean", "_no_time")} == {"train:model", "train:mean", "train:no_time"}


def test_demo_temporal_with_oracle_features_trains_and_scores_on_them(tmp_path):
    """ORACLE=1 at toy sizes: the true scene state is cached beside the CLIP features, and both stages and
    eval read it (--feature_dir), while the CLIP cache is still made for its frame times."""
    out, data = tmp_path / "out", tmp_path / "data"
    env = {**os.environ, **TOY, "ORACLE": "1", "ABLATIONS": "", "OUT_DIR": str(out), "DATA_DIR": str(data),
           "TOWER_FILE": str(tmp_path / "tower.safetensors")}
    run = subprocess.run(["bash", "scripts/demo_temporal.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    oracle = data / "features" / "oracle"
    commands = {line.split("] ", 1)[0]: line for line in run.stdout.splitlines() if line.startswith("==> [")}
    for name in ("pretrain", "sft_video", "eval"):
        assert f"--feature_dir {oracle}" in commands[f"==> [{name}"], name
    assert (oracle / "manifest.json").is_file() and "oracle" in json.loads((out / "demo_times.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["n"] > 0


@pytest.mark.parametrize("folders", ["given", "default", "default oracle"])
def test_demo_temporal_rejects_an_unknown_ablation(tmp_path, folders):
    """Checked before anything is written; reached with the default folders too (their defaults evaluate)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT_DIR", "DATA_DIR", "ORACLE")}
    env.update({"ABLATIONS": "mean nope", **({"ORACLE": "1"} if "oracle" in folders else {})})
    if folders == "given":
        env.update({"OUT_DIR": str(tmp_path / "out"), "DATA_DIR": str(tmp_path / "d")})
    run = subprocess.run(["bash", "scripts/demo_temporal.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and run.stderr.strip() == "error: ABLATIONS: unknown ablation 'nope' (known: mean no_time)"
    assert not (tmp_path / "out").exists()
