"""Visual tokens in the LM: slot splicing, slot/media count checks, VideoSummary order and padding."""
import pytest
import torch

from dataset.vlm_dataset import visual_inputs
from model.config import VisionConfig
from model.video_summary import MeanSummary, TemporalSummary

PAD = 3   # vision_token_id of the tiny models
K = 2


def ids_with_slots(first_slot=5, length=12, media=1):
    torch.manual_seed(0)
    ids = torch.randint(4, 64, (1, length))
    for m in range(media):
        start = first_slot + m * (K + 2)
        ids[0, start:start + K] = PAD
    return ids


def features(n=1, t=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g), torch.ones(n, t, dtype=torch.bool)


def test_visual_tokens_are_written_into_the_slots_in_media_order(make_vlm):
    model = make_vlm()
    ids = ids_with_slots(media=2)
    frames, mask = features(n=2)
    x = model.embed(ids, frames, mask)
    slots = (ids[0] == PAD).nonzero().flatten()
    vis = model.visual_tokens(frames, mask)
    torch.testing.assert_close(x[0, slots], vis.reshape(2 * K, -1))
    others = ids[0] != PAD
    torch.testing.assert_close(x[0, others], model.lm.embed_tokens(ids[0, others]))


def test_changing_the_frames_changes_logits_only_from_the_first_slot_on(make_vlm):
    model = make_vlm()
    ids = ids_with_slots(first_slot=5)
    a = model(ids, features=features(seed=0)[0], frame_mask=features()[1])
    b = model(ids, features=features(seed=1)[0], frame_mask=features()[1])
    torch.testing.assert_close(a[0, :5], b[0, :5])
    assert (a[0, 5:] - b[0, 5:]).abs().amax(-1).min() > 1e-6


@pytest.mark.parametrize("media", [0, 2])
def test_slot_count_must_match_media_count(make_vlm, media):
    model = make_vlm()
    ids = ids_with_slots(media=1)   # K slots = room for exactly one media item
    frames, mask = features(n=media) if media else (None, None)
    with pytest.raises(ValueError, match="visual slots"):
        model(ids, features=frames, frame_mask=mask)


def test_media_without_slots_is_rejected(make_vlm):
    model = make_vlm()
    with pytest.raises(ValueError):
        model(torch.randint(4, 64, (1, 6)), features=features()[0], frame_mask=features()[1])


def summary_cfg(kind):
    return VisionConfig(clip_dim=16, num_frames=4, summary=kind, num_visual_tokens=K, summary_dim=16,
                        summary_layers=1, summary_heads=2)


def test_temporal_summary_sees_frame_order_and_mean_summary_does_not():
    torch.manual_seed(0)
    frames, mask = features()
    reverse = frames.flip(1)
    temporal, mean = TemporalSummary(summary_cfg("temporal")), MeanSummary(summary_cfg("mean"))
    assert not torch.allclose(temporal(frames, mask), temporal(reverse, mask), atol=1e-4)
    torch.testing.assert_close(mean(frames, mask), mean(reverse, mask))


@pytest.mark.parametrize("kind", ["temporal", "mean"])
def test_padded_frames_do_not_change_the_summary(kind):
    torch.manual_seed(0)
    summary = (TemporalSummary if kind == "temporal" else MeanSummary)(summary_cfg(kind))
    image = torch.randn(1, 1, 16)
    alone = summary(image, torch.ones(1, 1, dtype=torch.bool))
    garbage = torch.cat([image, 100 * torch.randn(1, 3, 16)], dim=1)
    padded = summary(garbage, torch.tensor([[True, False, False, False]]))
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_image_batched_with_a_video_gets_the_same_tokens_as_alone(make_vlm):
    model = make_vlm()
    image, video = torch.randn(1, 16), torch.randn(4, 16)
    frames, mask, _ = visual_inputs([("features", image), ("features", video.half())])
    assert frames.shape == (2, 4, 16) and mask.tolist() == [[True, False, False, False], [True] * 4]
    together = model.visual_tokens(frames, mask)
    alone = model.visual_tokens(image[None], torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-5)


def test_too_many_frames_for_the_temporal_embeddings_is_an_error():
    summary = TemporalSummary(summary_cfg("temporal"))
    with pytest.raises(ValueError, match="frames"):
        summary(torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool))


# ---------------------------------------------------------------- absolute time ("seconds")

def seconds_summary():
    torch.manual_seed(0)
    cfg = summary_cfg("temporal")
    cfg.time_encoding = "seconds"
    return TemporalSummary(cfg).eval()


def test_the_seconds_summary_reads_the_clock_not_only_the_frame_order():
    summary = seconds_summary()
    frames, mask = features()
    short = torch.tensor([[0.25, 0.75, 1.25, 1.75]])     # a 2-s clip
    long = short * 15                                  # the same frames spread over a 30-s video
    assert not torch.allclose(summary(frames, mask, short), summary(frames, mask, long), atol=1e-4)
    torch.testing.assert_close(summary(frames, mask, short), summary(frames, mask, short.clone()))


def test_the_seconds_summary_takes_more_frames_than_num_frames():
    summary = seconds_summary()   # built for num_frames=4
    many = torch.randn(1, 12, 16)
    tokens = summary(many, torch.ones(1, 12, dtype=torch.bool), torch.arange(12.0)[None])
    assert tokens.shape == (1, K, 16) and torch.isfinite(tokens).all()


def test_the_seconds_summary_refuses_frames_of_unknown_time_but_not_padding():
    summary = seconds_summary()
    frames, mask = features()
    times = torch.tensor([[0.0, 1.0, float("nan"), 3.0]])
    with pytest.raises(ValueError, match="time in seconds"):
        summary(frames, mask, times)
    with pytest.raises(ValueError, match="time in seconds"):
        summary(frames, mask, None)
    padded = summary(frames, torch.tensor([[True, True, False, False]]), times)
    assert torch.isfinite(padded).all()


def test_visual_inputs_carry_frame_times_and_mark_the_unknown():
    video, image = torch.randn(3, 16), torch.randn(1, 16)
    visual = visual_inputs([("features", video, torch.tensor([0.5, 1.5, 2.5])), ("features", image)])
    assert visual.frame_times.shape == (2, 3)
    assert visual.frame_times[0].tolist() == [0.5, 1.5, 2.5] and torch.isnan(visual.frame_times[1]).all()
