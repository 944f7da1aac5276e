"""dataset/metrics.py: exact match and caption metrics (BLEU-4, ROUGE-L, CIDEr) against hand-computed answers."""
import importlib.util
import math
import sys

import pytest

from dataset.metrics import CaptionMetricsUnavailable, caption_scores, exact_match

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
