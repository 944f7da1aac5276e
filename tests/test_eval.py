"""eval.py: batch scoring (exact match, caption metrics), one-shot --prompt answers, clean one-line errors, normalisation."""
import importlib.util
import json

import pytest

from conftest import run_python


def eval_py(*flags):
    return run_python("eval.py", *flags)


def one_error_line(result):
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def batch_run(video_checkpoint, synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = eval_py(f"--weight={video_checkpoint}", f"--data_path={synthetic / 'test.jsonl'}",
                     f"--out={out / 'preds.jsonl'}", f"--metrics_out={out / 'metrics.json'}",
                     "--max_new_tokens=8", "--batch_size=8")
    assert result.returncode == 0, result.stderr
    preds = [json.loads(line) for line in (out / "preds.jsonl").read_text().splitlines()]
    return preds, json.loads((out / "metrics.json").read_text())


def test_batch_mode_writes_predictions_and_metrics(batch_run, synthetic):
    preds, metrics = batch_run
    lines = [json.loads(line) for line in (synthetic / "test.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [r["id"] for r in lines]
    assert metrics["n"] == len(lines) and metrics["skipped"] == 0
    assert metrics["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds), abs=1e-4)
    assert set(metrics["by_category"]) == {r["category"] for r in lines}
    assert set(metrics["by_subset"]) == {"standard", "novel_combo"}
    for p, r in zip(preds, lines):
        assert p["reference"] == r["conversations"][-1]["content"]
        assert p["category"] == r["category"] and p["subset"] == r["subset"]


def test_predictions_are_words_not_empty(batch_run):
    preds, _ = batch_run
    assert any(p["prediction"] for p in preds)


def test_prompt_mode_answers_as_batch_mode_does(batch_run, video_checkpoint, synthetic):
    preds, _ = batch_run
    caption = next(p for p in preds if p["category"] == "caption")
    record = next(json.loads(line) for line in (synthetic / "test.jsonl").read_text().splitlines()
                  if json.loads(line)["id"] == caption["id"])
    question = record["conversations"][0]["content"].removeprefix("<video>\n")   # the prompt it was asked in
    video = synthetic / record["video"]
    result = eval_py(f"--weight={video_checkpoint}", f"--video={video}", f"--prompt={question}",
                     "--max_new_tokens=8")
    assert result.returncode == 0, result.stderr
    # Same greedy decoding of the same prompt; batch mode only adds left padding.
    assert result.stdout.strip() == caption["prediction"]


def test_text_only_prompt_without_media(video_checkpoint):
    result = eval_py(f"--weight={video_checkpoint}", "--prompt=Hello", "--max_new_tokens=4")
    assert result.returncode == 0, result.stderr


def test_missing_weight_lists_what_out_dir_holds(video_checkpoint):
    line = one_error_line(eval_py("--weight=sft_video_999", f"--out_dir={video_checkpoint.parent}",
                                  "--prompt=hi"))
    assert "sft_video_999" in line and video_checkpoint.name in line


@pytest.mark.parametrize("content", [None, b"", b"plain text, not a video\n"])
def test_missing_or_corrupt_video_is_one_line_naming_it(video_checkpoint, tmp_path, content):
    video = tmp_path / "clip.mp4"
    if content is not None:
        video.write_bytes(content)
    line = one_error_line(eval_py(f"--weight={video_checkpoint}", f"--video={video}", "--prompt=hi"))
    assert str(video) in line


def test_normalise_ignores_case_punctuation_and_spacing():
    from dataset.metrics import normalise
    assert normalise("A red  circle.") == normalise("a red circle") == "a red circle"
    assert normalise("  Left!\n") == "left"
    assert normalise("The red, then the blue") == "the red then the blue"
    assert normalise("left") != normalise("right")


needs_coco = pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None,
                                reason="pip install pycocoevalcap (in requirements.txt)")


@needs_coco
def test_batch_mode_scores_captions_with_bleu_rouge_cider(batch_run):
    from dataset.metrics import caption_scores
    preds, metrics = batch_run
    captions = [p for p in preds if p["category"] == "caption"]
    scores = metrics["caption_metrics"]
    assert set(scores) == {"bleu4", "rouge_l", "cider", "n", "categories"}
    assert scores["n"] == len(captions) > 0 and scores["categories"] == ["caption"]
    assert all(p["references"] == [p["reference"]] for p in preds)   # the test split has one reference each
    assert scores == {**caption_scores([p["prediction"] for p in captions], [p["references"] for p in captions]),
                      "categories": ["caption"]}
    assert 0 <= scores["bleu4"] <= 1 and 0 <= scores["rouge_l"] <= 1 and scores["cider"] >= 0


def fake_preds():
    rows = [("caption", "a red circle moves left", ["A red circle moves left."]),
            ("caption", "a blue square moves up", ["a blue square moves down", "A blue square moves up."]),
            ("caption", "a green star stays still", ["a green triangle stays still"]),
            ("colour", "red", ["red"]), ("colour", "blue", ["green"])]
    from dataset.metrics import exact_match
    return [{"id": str(i), "category": c, "subset": "", "prediction": p, "reference": refs[0], "references": refs,
             "correct": exact_match(p, refs)} for i, (c, p, refs) in enumerate(rows)]


@needs_coco
def test_caption_categories_choose_the_answers_that_get_caption_metrics():
    from dataset.metrics import summarise
    preds = fake_preds()
    default = summarise(preds, 0, 1.0)
    assert default["accuracy"] == 0.6 and default["by_category"] == {"caption": 0.6667, "colour": 0.5}
    assert default["caption_metrics"]["n"] == 3 and default["caption_metrics"]["categories"] == ["caption"]
    assert summarise(preds, 0, 1.0, ["colour"])["caption_metrics"]["n"] == 2
    assert summarise(preds, 0, 1.0, ["count"])["caption_metrics"] is None


def test_without_pycocoevalcap_eval_still_scores_and_says_so_in_one_line(monkeypatch, capsys):
    import sys
    for name in ("pycocoevalcap", "pycocoevalcap.bleu.bleu", "pycocoevalcap.rouge.rouge", "pycocoevalcap.cider.cider"):
        monkeypatch.setitem(sys.modules, name, None)   # import now raises ImportError
    from dataset.metrics import summarise
    metrics = summarise(fake_preds(), 0, 1.0)
    assert metrics["caption_metrics"] is None and metrics["accuracy"] == 0.6 and metrics["n"] == 5
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install pycocoevalcap" in lines[0]


# ---------------------------------------------------------------- time: grounding, duration, phrasing

def timed_records(synthetic):
    """Test records given the time fields: two grounding questions (one by category, one by "span"),
    durations in three buckets, both phrasings, and two malformed records that must be skipped."""
    from dataset.timespan import format_span

    def asking(record, question, answer, **fields):
        turns = [{"role": "user", "content": f"<video>\n{question}"}, {"role": "assistant", "content": answer}]
        return {**record, "conversations": turns, **fields}
    base = [json.loads(line) for line in (synthetic / "test.jsonl").read_text().splitlines()]
    return [
        asking({**base[0], "category": "grounding"}, "When does the ring move?", format_span(1.0, 3.0),
               duration=8, phrasing="seen"),
        asking({**base[1], "category": "when"}, "When does it stop?", format_span(0.5, 2.0), span=[0.5, 2.0],
               duration=45.0, phrasing="held_out"),
        {**base[2], "duration": 150, "phrasing": "seen"},
        {k: v for k, v in base[3].items() if k != "phrasing"},   # the synthetic test's records carry one
        {**base[4], "span": [3.0, 1.0]},
        {**base[5], "phrasing": "sometimes"},
    ]


@pytest.fixture(scope="module")
def timed_run(video_checkpoint, synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_timed")
    data = out / "timed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in timed_records(synthetic)))

    def run(*flags):
        result = eval_py(f"--weight={video_checkpoint}", f"--data_path={data}", f"--media_root={synthetic}",
                         f"--out={out / 'preds.jsonl'}", f"--metrics_out={out / 'metrics.json'}",
                         "--max_new_tokens=8", *flags)
        assert result.returncode == 0, result.stderr
        preds = [json.loads(line) for line in (out / "preds.jsonl").read_text().splitlines()]
        return preds, json.loads((out / "metrics.json").read_text()), result
    return run


def test_batch_mode_scores_grounding_duration_and_phrasing(timed_run):
    preds, metrics, result = timed_run()
    assert metrics["n"] == 4 and metrics["skipped"] == 2
    assert result.stderr.count("warning: skipped") == 2 and '"span"' in result.stderr and '"phrasing"' in result.stderr
    grounding = metrics["grounding"]
    assert set(grounding) == {"miou", "r@0.3", "r@0.5", "r@0.7", "n", "unparsed"}
    assert grounding["n"] == 2 and 0 <= grounding["unparsed"] <= 2
    assert all(0 <= grounding[k] <= 1 for k in ("miou", "r@0.3", "r@0.5", "r@0.7"))
    assert grounding["r@0.3"] >= grounding["r@0.5"] >= grounding["r@0.7"]
    assert list(metrics["by_duration"]) == ["0-10s", "30-60s", "120s+"]
    assert list(metrics["grounding_by_duration"]) == ["0-10s", "30-60s"]
    assert set(metrics["by_phrasing"]) == {"phrasing_seen", "phrasing_held_out"}
    assert all(0 <= v <= 1 for group in ("by_duration", "grounding_by_duration", "by_phrasing")
               for v in metrics[group].values())
    assert metrics["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds), abs=1e-4)
    assert [p.get("span") for p in preds] == [[1.0, 3.0], [0.5, 2.0], None, None]
    assert all(0 <= p["iou"] <= 1 for p in preds[:2]) and not any("iou" in p for p in preds[2:])
    assert [p.get("duration") for p in preds] == [8, 45, 150, None]
    assert [p.get("phrasing") for p in preds] == ["seen", "held_out", "seen", None]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["grounding"] == grounding and summary["by_phrasing"] == metrics["by_phrasing"]


def test_grounding_categories_choose_whose_reference_is_the_true_span(timed_run):
    _, metrics, _ = timed_run("--grounding_categories", "count")
    assert metrics["grounding"]["n"] == 1   # only the record with its own "span"


@pytest.fixture(scope="module")
def multiple_choice(synthetic, tmp_path_factory):
    """The synthetic test records, every other one offering its answer and another record's as choices."""
    lines = [json.loads(line) for line in (synthetic / "test.jsonl").read_text().splitlines()][:10]
    answers = [r["conversations"][-1]["content"] for r in lines]
    for i, r in enumerate(lines[::2]):
        other = next(a for a in answers if a != answers[2 * i])
        r["choices"] = [other, answers[2 * i]] if i % 2 else [answers[2 * i], other]
    path = tmp_path_factory.mktemp("choices") / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_each_choice_is_scored_by_the_likelihood_training_gives_that_answer(video_checkpoint, multiple_choice, synthetic):
    import torch
    from dataset.vlm_dataset import ConversationDataset, collate, visual_inputs
    from model.engine import Engine, SamplingOptions
    engine = Engine.load(weight=str(video_checkpoint))
    rows = [p for batch in engine.answer_dataset(multiple_choice, SamplingOptions(max_new_tokens=8), batch_size=4,
                                                 media_root=synthetic) for p in batch.predictions]
    cfg, records = engine.model.vision_cfg, [json.loads(line) for line in multiple_choice.read_text().splitlines()]
    assert ["choice" in p for p in rows] == ["choices" in r for r in records]
    for p, r in zip(rows, records):
        if "choices" not in r:
            continue
        answered = [{**r, "conversations": r["conversations"][:-1] + [{"role": "assistant", "content": c}]}
                    for c in r["choices"]]
        path = multiple_choice.parent / "answered.jsonl"
        path.write_text("".join(json.dumps(a) + "\n" for a in answered))
        data = ConversationDataset(path, engine.chat, cfg.num_frames, engine.max_seq_len, media_root=synthetic,
                                   preprocess=engine.encoder.clip_inputs)
        batch = collate([data[0], data[1]], pad_id=engine.chat.pad_id)
        with torch.no_grad():
            losses = [float(engine.model(batch["input_ids"][k:k + 1], batch["labels"][k:k + 1],
                                         *visual_inputs(batch["media"][k:k + 1], engine.encoder))[0]) for k in (0, 1)]
        assert p["choice_scores"] == pytest.approx([-x for x in losses], abs=2e-3)
        assert p["choice"] == r["choices"][losses.index(min(losses))]
        assert p["choice_correct"] == (p["choice"] == r["conversations"][-1]["content"])
        assert p["answered_a_choice"] == (p["prediction"].lower() in [c.lower() for c in r["choices"]])


def test_metrics_set_the_likeliest_choice_beside_the_generated_answers(video_checkpoint, multiple_choice, synthetic,
                                                                     tmp_path):
    result = eval_py(f"--weight={video_checkpoint}", f"--data_path={multiple_choice}", "--max_new_tokens=8",
                     f"--media_root={synthetic}",
                     f"--out={tmp_path / 'preds.jsonl'}", f"--metrics_out={tmp_path / 'metrics.json'}")
    assert result.returncode == 0, result.stderr
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    offered = [p for p in preds if "choice" in p]
    choices = json.loads((tmp_path / "metrics.json").read_text())["choices"]
    assert choices["n"] == len(offered) == 5
    assert choices["ranked"] == pytest.approx(sum(p["choice_correct"] for p in offered) / 5, abs=1e-4)
    assert choices["generated"] == pytest.approx(sum(p["correct"] for p in offered) / 5, abs=1e-4)
    assert sum(c["n"] for c in choices["by_category"].values()) == 5
    printed = json.loads(result.stdout.strip().splitlines()[-1])["choices"]
    assert printed == {k: v for k, v in choices.items() if k != "by_category"}
