"""What the local lmms-eval tasks (benchmarks/tasks/) call: our jsonl records as lmms-eval docs, prompts and scores.

The task YAMLs name these functions (`!function benchmarks.local_tasks.NAME`); the records are read
by `datasets`' json loader, one doc per line. Scoring reuses dataset/metrics.py, so a checkpoint's
figure here is eval.py's: normalised exact match against the last assistant turn plus the record's
"references", and for a grounding question (a "span", or a grounding category) temporal IoU.

Media paths in a record are relative to the task's `media_root` (lmms_eval_specific_kwargs; a
relative media_root is taken from the repository root), as eval.py takes them relative to
--media_root or the jsonl's folder.
"""
from pathlib import Path

from dataset.metrics import CAPTION_CATEGORIES, GROUNDING_CATEGORIES, exact_match, grounding_score
from dataset.vlm_dataset import as_list, extra_references
from model.chat import MEDIA_MARKER

ROOT = Path(__file__).resolve().parents[1]
MIN_CHOICES = 2   # a question with one possible answer is no multiple choice


def media_root(kwargs) -> Path:
    root = Path((kwargs or {}).get("media_root") or ".")
    return root if root.is_absolute() else ROOT / root


def split_content(text: str, pools: dict, root: Path) -> list:
    """A user turn's text → lmms-eval content parts: text pieces, and one media part per <video>/<image>
    marker (the marker and the newline after it), each the next path of its kind. The Engine-side
    wrapper writes a media part back as "<kind>\\n", so the turn's text comes back unchanged."""
    parts = []
    for piece in MEDIA_MARKER.split(text):
        if piece in ("<video>", "<image>"):
            kind = piece[1:-1]
            if not pools[kind]:
                raise ValueError(f"more <{kind}> markers than {kind} paths")
            parts.append({"type": kind, "url": str(root / pools[kind].pop(0))})
        else:
            if parts and parts[-1]["type"] != "text" and piece.startswith("\n"):
                piece = piece[1:]
            if piece:
                parts.append({"type": "text", "text": piece})
    return parts


def doc_to_messages(doc, lmms_eval_specific_kwargs=None) -> list:
    """Every turn before the reference (the last assistant turn), as lmms-eval chat messages."""
    pools = {kind: as_list(doc.get(kind)) for kind in ("video", "image")}
    root = media_root(lmms_eval_specific_kwargs)
    messages = []
    for turn in doc["conversations"][:-1]:
        content = split_content(turn["content"], pools, root) if turn["role"] == "user" else \
            [{"type": "text", "text": turn["content"]}]
        messages.append({"role": turn["role"], "content": content})
    return messages


def question_parts(doc, kwargs=None) -> list:
    """The parts of the last user turn (the question the reference answers)."""
    return doc_to_messages(doc, kwargs)[-1]["content"]


def doc_to_visual(doc, lmms_eval_specific_kwargs=None) -> list:
    """The media paths of the question's turn, in marker order (simple-mode tasks)."""
    return [p["url"] for p in question_parts(doc, lmms_eval_specific_kwargs) if p["type"] != "text"]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    """The question's text without its markers (the wrapper puts one before it per visual)."""
    return "".join(p["text"] for p in question_parts(doc, lmms_eval_specific_kwargs) if p["type"] == "text")


def references(doc) -> list:
    """eval.py's references: the last assistant turn, then the record's optional "references"."""
    reference = doc["conversations"][-1]["content"]
    return [reference] + [r for r in extra_references({"references": doc.get("references") or []})
                          if r != reference]


def doc_to_target(doc) -> str:
    return doc["conversations"][-1]["content"]


def process_results(doc, results) -> dict:
    """exact_match (0/1) for every doc; for a grounding question also miou (its temporal IoU)."""
    answer = results[0].strip()
    scores = {"exact_match": float(exact_match(answer, references(doc)))}
    grounded = grounding_score(answer, doc_to_target(doc), doc.get("category") or "", doc.get("span"),
                               GROUNDING_CATEGORIES)
    if grounded:
        scores["miou"] = grounded["iou"]
    return scores


# ---------------------------------------------------------------- multiple choice

def with_choices(dataset):
    """process_docs of the multiple-choice task: each question gets as options every distinct reference
    of its category in the split, sorted; caption and grounding questions (free answers) and
    categories with a single answer are dropped. The same split gives the same options every run."""
    answers = {}
    for doc in dataset:
        answers.setdefault(doc.get("category") or "", set()).add(doc_to_target(doc))
    kept = {c for c, a in answers.items() if len(a) >= MIN_CHOICES and c not in (*CAPTION_CATEGORIES, *GROUNDING_CATEGORIES)}
    dataset = dataset.filter(lambda doc: (doc.get("category") or "") in kept and doc.get("span") is None)
    return dataset.map(lambda doc: {"choices": sorted(answers[doc.get("category") or ""])})


def doc_to_choice(doc) -> list:
    return doc["choices"]


def doc_to_choice_index(doc) -> int:
    """The reference's place among the options (lmms-eval's multiple-choice target)."""
    return doc["choices"].index(doc_to_target(doc))
