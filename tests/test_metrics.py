"""dataset/metrics.py: exact match and caption metrics (BLEU-4, ROUGE-L, CIDEr) against hand-computed answers."""
import importlib.util
import math
import sys

import pytest

from dataset.metrics import CaptionMetricsUnavailable, caption_scores, exact_match, final_answer

needs_coco = pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None,
                                reason="pip install pycocoevalcap (in requirements.txt)")

CORPUS = ["a red circle moves left", "a blue square moves up", "a green triangle stays still",
          "a yellow star moves right then stops"]
REFS = [[c] for c in CORPUS]


@needs_coco
def test_identical_caption_scores_one_after_normalising():
    scores = caption_scores(["The red circle moves LEFT."], [["the red circle moves left"]])
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-4)
    assert scores["rouge_l"] == pytest.approx(1.0, abs=1e-4)
    assert scores["n"] == 1


@needs_coco
def test_bleu4_against_a_hand_computation():
    # 5 words each, one differs at the end: clipped precisions 4/5, 3/4, 2/3, 1/2; no brevity penalty.
    scores = caption_scores(["the red circle moves left"], [["the red circle moves right"]])
    assert scores["bleu4"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-4)   # 0.6687


@needs_coco
def test_bleu4_brevity_penalty_against_a_hand_computation():
    # Every n-gram of the 4-word prediction is in the 5-word reference: BLEU-4 = exp(1 - 5/4).
    scores = caption_scores(["the red circle moves"], [["the red circle moves left"]])
    assert scores["bleu4"] == pytest.approx(math.exp(1 - 5 / 4), abs=1e-4)   # 0.7788


@needs_coco
def test_rouge_l_against_a_hand_computation():
    # LCS("a red circle moves left", "the red circle moves right quickly") = "red circle moves" = 3 words:
    # precision 3/5, recall 3/6, F with beta 1.2 = (1 + b²) P R / (R + b² P).
    p, r, b2 = 3 / 5, 3 / 6, 1.2 ** 2
    scores = caption_scores(["a red circle moves left"], [["the red circle moves right quickly"]])
    assert scores["rouge_l"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), abs=1e-4)   # 0.5367


@needs_coco
def test_several_references_take_the_best_match():
    refs = [["a blue square moves up", "the red circle moves left"]]
    scores = caption_scores(["the red circle moves left"], refs)
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-4) and scores["rouge_l"] == pytest.approx(1.0, abs=1e-4)
    # Against the first reference alone: LCS "moves", P = R = 1/5.
    assert caption_scores(["the red circle moves left"], [refs[0][:1]])["rouge_l"] == pytest.approx(0.2, abs=1e-4)


@needs_coco
def test_cider_is_ten_for_exact_copies_and_lower_for_worse_captions():
    exact = caption_scores(CORPUS, REFS)["cider"]
    close = caption_scores(["a red circle moves right"] + CORPUS[1:], REFS)["cider"]
    far = caption_scores(["a blue square stays up"] + CORPUS[1:], REFS)["cider"]
    assert exact == pytest.approx(10.0, abs=1e-4)   # cosine 1 at every n-gram order, x10
    assert exact > close > far


@needs_coco
def test_cider_needs_more_than_one_caption():
    # idf comes from the scored references: with one caption every n-gram has idf log(1/1) = 0.
    assert caption_scores(["a red circle moves left"], [["a red circle moves left"]])["cider"] == 0.0


def test_mismatched_or_empty_references_are_refused():
    with pytest.raises(ValueError):
        caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        caption_scores(["a"], [[]])


def test_missing_pycocoevalcap_says_how_to_install(monkeypatch):
    for name in ("pycocoevalcap", "pycocoevalcap.bleu.bleu", "pycocoevalcap.rouge.rouge", "pycocoevalcap.cider.cider"):
        monkeypatch.setitem(sys.modules, name, None)   # import now raises ImportError
    with pytest.raises(CaptionMetricsUnavailable, match="pip install pycocoevalcap"):
        caption_scores(CORPUS, REFS)


def test_exact_match_is_normalised_and_accepts_any_reference():
    assert exact_match("Left!", ["left"])
    assert exact_match("moves up", ["moves left", "Moves up."])
    assert not exact_match("moves up", ["moves left"])


def test_a_reasoned_answer_is_scored_on_what_follows_its_last_marker():
    reference = "At 0.0 s the red ring is on screen. The red ring leaves at 3.0 s. Answer: the red ring leaves."
    assert exact_match("At 0.0 s the blue ring is on screen. answer: The red ring leaves", [reference])
    assert exact_match("the red ring leaves", [reference])   # a bare answer against a reasoned reference
    assert not exact_match("The red ring leaves at 3.0 s. Answer: the red ring appears.", [reference])
    assert not exact_match("At 0.0 s the red ring is on screen. The red ring leaves at 3.0 s.", [reference])
    assert final_answer("no marker here") == "no marker here"
    assert final_answer("Answer: a. Answer: b") == " b"


# ---------------------------------------------------------------- grounding, duration, phrasing

def scored(answer, reference="from 0.0 s to 10.0 s", category="grounding", span=(0.0, 10.0), **fields):
    """A prediction row as the engine builds it."""
    from dataset.metrics import grounding_score
    row = {"id": "x", "category": category, "subset": "", "prediction": answer, "reference": reference,
           "references": [reference], "correct": exact_match(answer, [reference])}
    return {**row, **grounding_score(answer, reference, category, span), **fields}


# IoU with the true span 0-10 s: 1, 0.5, 0.3, 0 (disjoint), 0 (no span in the answer).
GROUNDED = [scored("from 0.0 s to 10.0 s"), scored("from 0.0 s to 5.0 s"), scored("between 0 and 3 s"),
            scored("from 20.0 s to 30.0 s"), scored("I do not know")]


def test_grounding_score_takes_the_records_span_or_the_reference_in_a_grounding_category():
    from dataset.metrics import grounding_score
    assert grounding_score("from 1.0 s to 3.0 s", "the blue one", "order", span=[1.0, 2.0]) == \
        {"span": [1.0, 2.0], "iou": pytest.approx(0.5)}
    assert grounding_score("1-3 s", "from 1.0 s to 3.0 s", "grounding") == {"span": [1.0, 3.0], "iou": 1.0}
    assert grounding_score("1-3 s", "from 1.0 s to 3.0 s", "when", categories=["when"])["iou"] == 1.0
    assert grounding_score("from 1.0 s to 3.0 s", "from 1.0 s to 3.0 s", "colour") == {}   # not a grounding category
    assert grounding_score("anything", "no span here", "grounding") == {}   # no true span: unscored
    assert grounding_score("no span", "from 1.0 s to 3.0 s", "grounding")["iou"] == 0.0


def test_known_ious_give_known_miou_recall_and_unparsed():
    from dataset.metrics import summarise
    assert [r["iou"] for r in GROUNDED] == pytest.approx([1.0, 0.5, 0.3, 0.0, 0.0])
    metrics = summarise(GROUNDED + [scored("red", "red", "colour", None)], 0, 1.0)
    assert metrics["grounding"] == {"miou": 0.36, "r@0.3": 0.6, "r@0.5": 0.4, "r@0.7": 0.2, "n": 5, "unparsed": 1}
    # "correct" stays exact match: the first grounding answer and the colour answer
    assert metrics["accuracy"] == round(2 / 6, 4) and metrics["n"] == 6


def test_grounding_is_none_without_grounding_predictions_and_other_groups_are_empty():
    from dataset.metrics import summarise
    metrics = summarise([scored("red", "red", "colour", None)], 0, 1.0)
    assert "iou" not in scored("red", "red", "colour", None)
    assert metrics["grounding"] is None
    assert metrics["by_duration"] == metrics["grounding_by_duration"] == metrics["by_phrasing"] == {}


def test_duration_buckets_are_fixed_and_in_order():
    from dataset.metrics import DURATION_BUCKETS, duration_bucket, summarise
    assert [name for name, _, _ in DURATION_BUCKETS] == ["0-10s", "10-30s", "30-60s", "60-120s", "120s+"]
    seconds = {0: "0-10s", 9.99: "0-10s", 10: "10-30s", 29.9: "10-30s", 30: "30-60s", 60: "60-120s",
               119.9: "60-120s", 120: "120s+", 5000: "120s+"}
    assert {s: duration_bucket(s) for s in seconds} == seconds
    with pytest.raises(ValueError):
        duration_bucket(-1)
    rows = [scored("from 0.0 s to 10.0 s", duration=150.0), scored("from 0.0 s to 5.0 s", duration=12.0),
            scored("I do not know", duration=20.0), scored("red", "red", "colour", None, duration=3.0),
            scored("blue", "red", "colour", None)]   # no duration: in no bucket
    metrics = summarise(rows, 0, 1.0)
    assert list(metrics["by_duration"]) == ["0-10s", "10-30s", "120s+"]
    assert metrics["by_duration"] == {"0-10s": 1.0, "10-30s": 0.0, "120s+": 1.0}
    assert metrics["grounding_by_duration"] == {"10-30s": 0.25, "120s+": 1.0}


def test_by_phrasing_has_exactly_the_documented_keys_over_records_that_have_the_field():
    from dataset.metrics import summarise
    answers = [("red", "seen"), ("blue", "held_out"), ("red", "held_out"), ("red", None)]   # the reference is red
    rows = [scored(answer, "red", "colour", None, **({"phrasing": phrasing} if phrasing else {}))
            for answer, phrasing in answers]
    assert summarise(rows, 0, 1.0)["by_phrasing"] == {"phrasing_seen": 1.0, "phrasing_held_out": 0.5}
    assert summarise(rows[:1], 0, 1.0)["by_phrasing"] == {"phrasing_seen": 1.0}


def test_existing_metrics_keys_are_all_still_there():
    from dataset.metrics import summarise
    metrics = summarise(GROUNDED, 2, 1.234)
    assert {"accuracy", "n", "skipped", "by_category", "by_subset", "caption_metrics", "seconds"} <= set(metrics)
    assert metrics["skipped"] == 2 and metrics["seconds"] == 1.23 and metrics["by_category"] == {"grounding": 0.2}
