"""Scoring answers against references: normalised exact match for questions, BLEU-4 / ROUGE-L / CIDEr for captions.

Caption scores come from pycocoevalcap's pure-Python Bleu, Rouge and Cider scorers (no Java).
Its PTBTokenizer needs Java, so text goes through `normalise` instead: lower case, punctuation
replaced by spaces, split on whitespace, joined by single spaces (the scorers split on spaces).
- BLEU-4 is corpus-level, as in the COCO caption evaluation: clipped n-gram counts summed over
  all captions, brevity penalty against the closest reference length. A caption shorter than
  4 words has no 4-grams, so BLEU-4 on very short captions is near 0 by construction.
- ROUGE-L is the mean over captions of the LCS-based F-score with beta = 1.2, taking the best
  precision and the best recall over a caption's references.
- CIDEr (pycocoevalcap's `Cider`: clipped tf-idf n-gram cosine, Gaussian length penalty, x10)
  takes its idf from the references of the captions being scored, so it is only meaningful on a
  set of many captions: on a single caption every n-gram's idf is 0 and CIDEr is 0.

An answer that reasons first ends with ANSWER_MARKER and its answer ("… Answer: the blue circle appears."):
exact match compares what follows the last marker, in the prediction and in the reference alike.

Answers that are spans of time (grounding questions) are also scored by temporal IoU against the
true span (dataset/timespan.py); see docs/metrics.md for mIoU, R@k and the duration buckets.
"""
import math
import re
import sys
from collections import defaultdict

from dataset.timespan import parse_span, temporal_iou

# Categories whose answers are free-form captions, scored with caption metrics (eval.py --caption_categories).
CAPTION_CATEGORIES = ("caption",)
# Categories whose reference text is the true span when a record carries no "span" (eval.py --grounding_categories).
GROUNDING_CATEGORIES = ("grounding",)
# R@k: the share of grounding answers whose IoU with the true span is at least k.
RECALL_THRESHOLDS = (0.3, 0.5, 0.7)
# Fixed, so runs on different data stay comparable: (name, lower bound inclusive, upper bound exclusive), seconds.
DURATION_BUCKETS = (("0-10s", 0, 10), ("10-30s", 10, 30), ("30-60s", 30, 60), ("60-120s", 60, 120),
                    ("120s+", 120, math.inf))
PHRASINGS = ("seen", "held_out")
ANSWER_MARKER = "Answer:"   # "<reasoning> Answer: <answer>": exact match scores the part after it
INSTALL_HINT = "caption metrics (BLEU-4, ROUGE-L, CIDEr) need `pip install pycocoevalcap`; skipped"


class CaptionMetricsUnavailable(Exception):
    """pycocoevalcap is not installed; the message says how to install it."""


def normalise(text: str) -> str:
    """Lower case, punctuation and extra spaces removed: 'A red circle.' == 'a red  circle'."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def final_answer(text: str) -> str:
    """What follows the last ANSWER_MARKER (any case), or the whole text where there is none."""
    found = text.lower().rfind(ANSWER_MARKER.lower())
    return text if found < 0 else text[found + len(ANSWER_MARKER):]


def exact_match(prediction: str, references: list[str]) -> bool:
    """The prediction's final answer equals one reference's once both are normalised."""
    return any(normalise(final_answer(prediction)) == normalise(final_answer(ref)) for ref in references)


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU-4, mean ROUGE-L and mean CIDEr of predictions[i] against references[i] (one or more each)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need one list of references per prediction, got {len(predictions)} and {len(references)}")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise CaptionMetricsUnavailable(INSTALL_HINT) from None
    hypotheses = {i: [normalise(p)] for i, p in enumerate(predictions)}
    truths = {i: [normalise(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(truths, hypotheses, verbose=0)
    rouge, _ = Rouge().compute_score(truths, hypotheses)
    cider, _ = Cider().compute_score(truths, hypotheses)
    return {"bleu4": round(float(bleu[3]), 4), "rouge_l": round(float(rouge), 4), "cider": round(float(cider), 4),
            "n": len(predictions)}


def accuracy(rows) -> float:
    return share(rows, "correct")


def summarise(preds, skipped, seconds, caption_categories=CAPTION_CATEGORIES) -> dict:
    """A scored run's metrics: accuracy overall, by category, subset, duration and phrasing, caption metrics,
    grounding metrics (over the predictions that carry an "iou", see grounding_score), counts, time."""
    groups = {"by_category": defaultdict(list), "by_subset": defaultdict(list)}
    for p in preds:
        if p["category"]:
            groups["by_category"][p["category"]].append(p)
        if p["subset"]:
            groups["by_subset"][p["subset"]].append(p)
    grounded = [p for p in preds if p.get("iou") is not None]
    return {"accuracy": accuracy(preds), "n": len(preds), "skipped": skipped,
            **{name: {k: accuracy(v) for k, v in sorted(g.items())} for name, g in groups.items()},
            "caption_metrics": caption_metrics(preds, caption_categories),
            "grounding": grounding_metrics(grounded),
            "by_duration": {name: accuracy(rows) for name, rows in by_duration(preds).items()},
            "grounding_by_duration": {name: mean_iou(rows) for name, rows in by_duration(grounded).items()},
            "by_phrasing": {f"phrasing_{k}": accuracy(rows) for k, rows in by_phrasing(preds).items()},
            "choices": choice_metrics([p for p in preds if "choice" in p]),
            "seconds": round(seconds, 2)}


def share(rows, key: str) -> float:
    return round(sum(bool(r[key]) for r in rows) / len(rows), 4) if rows else 0.0


def choice_figures(rows) -> dict:
    return {"generated": accuracy(rows), "answered_a_choice": share(rows, "answered_a_choice"),
            "ranked": share(rows, "choice_correct"), "n": len(rows)}


def choice_metrics(rows) -> dict | None:
    """Over the multiple-choice records: the generated answers' accuracy, the share of them that are one of
    the offered choices, and the accuracy of the likeliest choice (model/choices.py); overall and by category."""
    if not rows:
        return None
    categories = defaultdict(list)
    for row in rows:
        categories[row["category"]].append(row)
    return {**choice_figures(rows), "by_category": {k: choice_figures(v) for k, v in sorted(categories.items())}}


def grounding_score(answer: str, reference: str, category: str, span=None,
                    categories=GROUNDING_CATEGORIES) -> dict:
    """{"span": the true span, "iou": IoU of the answer's span with it} for a grounding question, else {}.

    The true span is the record's "span"; without one, in a grounding category, the span written in the
    reference (a reference with no readable span leaves the question unscored). An answer with no
    readable span scores IoU 0."""
    truth = tuple(span) if span is not None else parse_span(reference) if category in categories else None
    if truth is None:
        return {}
    return {"span": list(truth), "iou": temporal_iou(parse_span(answer), truth)}


def grounding_metrics(rows) -> dict | None:
    """mIoU, R@k, count and unparsed answers of the grounding predictions; None when there are none."""
    if not rows:
        return None
    # Spans given to a tenth of a second can give an IoU a float's hair under k that means k.
    recall = {f"r@{k}": round(sum(r["iou"] >= k - 1e-9 for r in rows) / len(rows), 4) for k in RECALL_THRESHOLDS}
    return {"miou": mean_iou(rows), **recall, "n": len(rows),
            "unparsed": sum(parse_span(r["prediction"]) is None for r in rows)}


def mean_iou(rows) -> float:
    return round(sum(r["iou"] for r in rows) / len(rows), 4) if rows else 0.0


def duration_bucket(seconds: float) -> str:
    """The DURATION_BUCKETS name holding `seconds`."""
    if not seconds >= 0:
        raise ValueError(f"a duration is a number of seconds >= 0, got {seconds!r}")
    return next(name for name, low, high in DURATION_BUCKETS if low <= seconds < high)


def by_duration(rows) -> dict:
    """{bucket: rows} over the rows that carry a duration, in DURATION_BUCKETS order."""
    found = defaultdict(list)
    for r in rows:
        if r.get("duration") is not None:
            found[duration_bucket(r["duration"])].append(r)
    return {name: found[name] for name, _, _ in DURATION_BUCKETS if name in found}


def by_phrasing(rows) -> dict:
    """{"seen" / "held_out": rows} over the rows that carry a phrasing."""
    found = {k: [r for r in rows if r.get("phrasing") == k] for k in PHRASINGS}
    return {k: v for k, v in found.items() if v}


def caption_metrics(preds, categories) -> dict | None:
    """BLEU-4 / ROUGE-L / CIDEr over the predictions in caption categories; None when there are none or
    pycocoevalcap is missing (then one line on stderr says how to install it)."""
    rows = [p for p in preds if p["category"] in categories]
    if not rows:
        return None
    try:
        scores = caption_scores([p["prediction"] for p in rows], [p["references"] for p in rows])
    except CaptionMetricsUnavailable as e:
        print(f"note: {e}", file=sys.stderr)
        return None
    return {**scores, "categories": sorted(set(categories))}
