"""Visual tokens in the LM: slot splicing, slot/media count checks, VideoSummary order and padding."""
import pytest
import torch

from dataset.vlm_dataset import visual_inputs
from model.config import VisionConfig
from model.video_summary import MeanSummary, TemporalSummary, media_token_count, segment_plan, visual_token_counts

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
    assert not torch.allclose(temporal(frames, mask)[0], temporal(reverse, mask)[0], atol=1e-4)
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
    torch.testing.assert_close(together[:K], alone, atol=1e-5, rtol=1e-5)


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
    assert not torch.allclose(summary(frames, mask, short)[0], summary(frames, mask, long)[0], atol=1e-4)
    torch.testing.assert_close(summary(frames, mask, short), summary(frames, mask, short.clone()))


def test_the_seconds_summary_takes_more_frames_than_num_frames():
    summary = seconds_summary()   # built for num_frames=4
    many = torch.randn(1, 12, 16)
    tokens, token_mask = summary(many, torch.ones(1, 12, dtype=torch.bool), torch.arange(12.0)[None])
    assert tokens.shape == (1, K, 16) and token_mask is None and torch.isfinite(tokens).all()


def test_the_seconds_summary_refuses_frames_of_unknown_time_but_not_padding():
    summary = seconds_summary()
    frames, mask = features()
    times = torch.tensor([[0.0, 1.0, float("nan"), 3.0]])
    with pytest.raises(ValueError, match="time in seconds"):
        summary(frames, mask, times)
    with pytest.raises(ValueError, match="time in seconds"):
        summary(frames, mask, None)
    padded, _ = summary(frames, torch.tensor([[True, True, False, False]]), times)
    assert torch.isfinite(padded).all()


def test_visual_inputs_carry_frame_times_and_mark_the_unknown():
    video, image = torch.randn(3, 16), torch.randn(1, 16)
    visual = visual_inputs([("features", video, torch.tensor([0.5, 1.5, 2.5])), ("features", image)])
    assert visual.frame_times.shape == (2, 3)
    assert visual.frame_times[0].tolist() == [0.5, 1.5, 2.5] and torch.isnan(visual.frame_times[1]).all()


# ---------------------------------------------------------------- a token budget that grows with duration


def test_one_second_segments_of_one_frame_a_second_give_each_frame_its_own_segment():
    times = torch.arange(16.0)[None]                         # 0..15 s at 1 fps: stored times may be a hair off
    times[0, 7] -= 1e-5
    segment, counts = segment_plan(torch.ones(1, 16, dtype=torch.bool), times, 1.0, 128)
    assert segment[0].tolist() == list(range(16)) and counts.tolist() == [16]


def test_past_the_cap_segments_grow_longer_and_stay_in_time_order_none_empty():
    times = torch.arange(121.0)[None]                       # a 120-s video
    segment, counts = segment_plan(torch.ones(1, 121, dtype=torch.bool), times, 1.0, 32)
    assert counts.tolist() == [32]
    assert (segment[0].diff() >= 0).all() and set(segment[0].tolist()) == set(range(32))


def test_padding_and_unknown_times_do_not_change_the_segments():
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    times = torch.tensor([[0.0, 2.0, 4.0, float("nan")], [0.0, 1.0, float("nan"), 3.0]])
    segment, counts = segment_plan(mask, times, 2.0, 8)
    assert segment[0, :3].tolist() == [0, 1, 2] and counts[0] == 3
    assert segment[1].tolist() == [0, 1, 2, 3]               # a clock with a hole: timed by frame index


def segment_cfg(kind="temporal", time_encoding="seconds", cap=16):
    return VisionConfig(clip_dim=16, num_frames=64, summary=kind, num_visual_tokens=cap, summary_dim=16,
                        summary_layers=1, summary_heads=2, time_encoding=time_encoding, segment_seconds=2.0)


def test_a_long_video_gets_more_tokens_than_a_short_clip_up_to_the_cap():
    cfg = segment_cfg(cap=16)
    assert media_token_count(cfg, 2, torch.tensor([0.0, 1.0])) == 2          # 2 s: one segment, a pair
    assert media_token_count(cfg, 10, torch.arange(10.0)) == 10              # 10 s: five 2-s segments
    assert media_token_count(cfg, 60, torch.arange(60.0)) == 16              # 60 s: the cap
    assert media_token_count(cfg, 1, torch.zeros(1)) == 2                    # an image
    fixed = VisionConfig(num_visual_tokens=8)
    assert media_token_count(fixed, 60, torch.arange(60.0)) == 8


@pytest.mark.parametrize("kind, encoding", [("temporal", "seconds"), ("temporal", "none"), ("mean", "index")])
def test_media_of_different_lengths_in_one_batch_get_the_tokens_they_get_alone(make_vlm, kind, encoding):
    model = make_vlm(summary=kind, time_encoding=encoding, num_frames=12, num_visual_tokens=8, segment_seconds=1.0)
    torch.manual_seed(1)
    short, long = torch.randn(3, 16), torch.randn(12, 16)
    batch = visual_inputs([("features", short, torch.arange(3.0)), ("features", long, torch.arange(12.0))])
    assert visual_token_counts(model.vision_cfg, batch.frame_mask, batch.frame_times).tolist() == [6, 8]
    together = model.visual_tokens(*batch)
    alone = [model.visual_tokens(*visual_inputs([entry])) for entry in
             [("features", short, torch.arange(3.0)), ("features", long, torch.arange(12.0))]]
    assert together.shape == (14, 32)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_segment_tokens_come_in_time_order_pairs_and_fill_the_slots(make_vlm):
    model = make_vlm(time_encoding="seconds", num_frames=8, num_visual_tokens=8, segment_seconds=1.0)
    frames, times = torch.randn(1, 3, 16), torch.arange(3.0)[None]
    mask = torch.ones(1, 3, dtype=torch.bool)
    tokens, token_mask = model.summary(frames, mask, times)
    assert tokens.shape == (1, 6, 16) and token_mask.all()
    late = frames.clone()
    late[0, 2] += 5                                          # the last second changes: its pair is the last one
    changed = (model.summary(late, mask, times)[0] - tokens).abs().amax(-1)[0]
    assert changed[4:].min() > changed[:4].max()           # its own pair moves most (attention spreads the rest)
    ids = torch.tensor([[5, 6] + [PAD] * 6 + [7]])
    x = model.embed(ids, frames, mask, times)
    torch.testing.assert_close(x[0, 2:8], model.visual_tokens(frames, mask, times))
    with pytest.raises(ValueError, match="visual slots"):
        model.embed(torch.tensor([[5] + [PAD] * 8]), frames, mask, times)   # 8 slots for 6 tokens


def test_a_segment_model_takes_more_frames_than_it_was_built_for_when_it_reads_seconds(make_vlm):
    model = make_vlm(time_encoding="seconds", num_frames=4, num_visual_tokens=64, segment_seconds=1.0)
    frames, times = torch.randn(1, 30, 16), torch.arange(30.0)[None]
    vis = model.visual_tokens(frames, torch.ones(1, 30, dtype=torch.bool), times)
    assert vis.shape == (60, 32) and torch.isfinite(vis).all()
