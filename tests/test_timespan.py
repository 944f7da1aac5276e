"""dataset/timespan.py: the span answer format round-trips, looser spellings parse, IoU is right."""
import pytest

from dataset.timespan import format_span, parse_span, temporal_iou


def test_the_documented_format_round_trips():
    assert format_span(3.5, 5.0) == "from 3.5 s to 5.0 s"
    assert parse_span(format_span(0.4, 12.0)) == (0.4, 12.0)
    assert format_span(0.04, 1.96) == "from 0.0 s to 2.0 s"   # one decimal
    assert parse_span("The blue circle moves from 3.5 s to 5.0 s.") == (3.5, 5.0)


@pytest.mark.parametrize("text, span", [
    ("from 3 s to 5 seconds", (3.0, 5.0)),
    ("between 2 and 4.5 s", (2.0, 4.5)),
    ("1.5-3.0s", (1.5, 3.0)),
    ("from 6.0 s to 2.0 s", (2.0, 6.0)),   # reversed: put in order
])
def test_looser_spellings_parse(text, span):
    assert parse_span(text) == span


@pytest.mark.parametrize("text", ["no time here", "at 5 s", "the 3 red squares", ""])
def test_text_without_a_span_gives_none(text):
    assert parse_span(text) is None


def test_temporal_iou():
    assert temporal_iou((0, 2), (1, 3)) == pytest.approx(1 / 3)
    assert temporal_iou((0, 1), (2, 3)) == 0.0
    assert temporal_iou((1, 4), (1, 4)) == 1.0
    assert temporal_iou(None, (1, 2)) == 0.0
    with pytest.raises(ValueError):
        format_span(5, 3)
