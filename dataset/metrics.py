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
"""
import re
import sys
from collections import defaultdict

# Categories whose answers are free-form captions, scored with caption metrics (eval.py --caption_categories).
CAPTION_CATEGORIES = ("caption",)
INSTALL_HINT = "caption metrics (BLEU-4, ROUGE-L, CIDEr) need `pip install pycocoevalcap`; skipped"


class CaptionMetricsUnavailable(Exception):
    """pycocoevalcap is not installed; the message says how to install it."""


def normalise(text: str) -> str:
    """Lower case, punctuation and extra spaces removed: 'A red circle.' == 'a red  circle'."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def exact_match(prediction: str, references: list[str]) -> bool:
    """The prediction equals one of the references once both are normalised."""
    return any(normalise(prediction) == normalise(ref) for ref in references)


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


def summarise(preds, skipped, seconds, caption_categories=CAPTION_CATEGORIES) -> dict:
    """A scored run's metrics: accuracy overall, by category and by subset, caption metrics, counts, time."""
    def accuracy(rows):
        return round(sum(r["correct"] for r in rows) / len(rows), 4) if rows else 0.0
    groups = {"by_category": defaultdict(list), "by_subset": defaultdict(list)}
    for p in preds:
        if p["category"]:
            groups["by_category"][p["category"]].append(p)
        if p["subset"]:
            groups["by_subset"][p["subset"]].append(p)
    return {"accuracy": accuracy(preds), "n": len(preds), "skipped": skipped,
            **{name: {k: accuracy(v) for k, v in sorted(g.items())} for name, g in groups.items()},
            "caption_metrics": caption_metrics(preds, caption_categories), "seconds": round(seconds, 2)}


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
