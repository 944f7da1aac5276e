"""Answers that are times: the one span format ("from 3.5 s to 5.0 s"), its parser, and temporal IoU."""
import re

_NUMBER = r"(\d+(?:\.\d+)?)"
# The documented format first; then the looser spellings a user (or another dataset) writes.
_SPAN = [re.compile(p, re.IGNORECASE) for p in (
    rf"from\s+{_NUMBER}\s*s(?:ec(?:ond)?s?)?\s+to\s+{_NUMBER}\s*s(?:ec(?:ond)?s?)?\b",
    rf"between\s+{_NUMBER}\s*(?:s(?:ec(?:ond)?s?)?)?\s+and\s+{_NUMBER}\s*s(?:ec(?:ond)?s?)?\b",
    rf"{_NUMBER}\s*s?\s*(?:-|–|to)\s*{_NUMBER}\s*s(?:ec(?:ond)?s?)?\b",
)]


def format_time(seconds: float) -> str:
    """3.5 → "3.5 s"; one decimal, the resolution answers are given in."""
    return f"{max(0.0, seconds):.1f} s"


def format_span(start: float, end: float) -> str:
    """The answer format for a span of time: "from 3.5 s to 5.0 s"."""
    if end < start:
        raise ValueError(f"a span ends after it starts, got {start} to {end}")
    return f"from {format_time(start)} to {format_time(end)}"


def parse_span(text: str):
    """(start, end) in seconds of the first span written in `text`, or None; a reversed span is put in order."""
    for pattern in _SPAN:
        found = pattern.search(text)
        if found:
            a, b = float(found.group(1)), float(found.group(2))
            return (a, b) if a <= b else (b, a)
    return None


def temporal_iou(predicted, truth) -> float:
    """Intersection over union of two (start, end) spans; 0 when either is missing or both are points."""
    if predicted is None or truth is None:
        return 0.0
    inter = max(0.0, min(predicted[1], truth[1]) - max(predicted[0], truth[0]))
    union = max(predicted[1], truth[1]) - min(predicted[0], truth[0])
    return inter / union if union > 0 else 0.0
