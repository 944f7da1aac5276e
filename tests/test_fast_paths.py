"""Speed work that must not change results: the skipping frame decoder, joint projections, the
unpadded generation path, logits on labelled positions only."""
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from dataset.media import decode_sampled, read_video, uniform_indices
from test_media_formats import H264, MPEG4, first_available, frame_index, index_frame

LONG_FRAMES = 72   # 6 groups of pictures of 12 frames: sparse samples need real seeks


def write_long_clip(path, codec, frames=LONG_FRAMES, gop=12):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.time_base = Fraction(1, 24)
        if codec == "libx264":   # B-frames (some of them references) are what the decoder may skip
            stream.options = {"x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=3:b-pyramid=normal"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i % 36, 48, 64), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 24)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def long_h264(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    codec = first_available(*H264)
    write_long_clip(path, codec)
    return path


@pytest.mark.parametrize("indices", [uniform_indices(LONG_FRAMES, 8), [0, 0, 71, 71], [70, 3, 40, 3],
                                     list(range(0, LONG_FRAMES, 5)), [11, 12, 13, 35, 36]])
def test_skipping_decoder_returns_exactly_the_frames_decord_returns(long_h264, indices):
    import decord
    reference = decord.VideoReader(str(long_h264), num_threads=1).get_batch(list(indices)).asnumpy()
    frames = decode_sampled(long_h264, np.asarray(indices), LONG_FRAMES)
    assert frames is not None and np.array_equal(frames, reference)
    assert [frame_index(f) for f in frames] == [i % 36 for i in indices]


def test_sparse_sampling_goes_through_the_skipping_decoder(long_h264, monkeypatch):
    import decord

    def refuse(self, indices):
        raise AssertionError("decord decoded the frames")

    monkeypatch.setattr(decord.VideoReader, "get_batch", refuse)
    frames = read_video(long_h264, 8)   # 72 frames for 8 samples: sparse
    assert [frame_index(f) for f in frames] == [i % 36 for i in uniform_indices(LONG_FRAMES, 8)]


def test_other_codecs_and_wrong_frame_counts_fall_back_to_decord(tmp_path, long_h264):
    path = tmp_path / "clip.avi"
    write_long_clip(path, first_available(*MPEG4))
    assert decode_sampled(path, np.array([0, 40]), LONG_FRAMES) is None   # mpeg4: not a skipping codec
    assert [frame_index(f) for f in read_video(path, 4)] == [i % 36 for i in uniform_indices(LONG_FRAMES, 4)]
    assert decode_sampled(long_h264, np.array([0, 40]), LONG_FRAMES + 1) is None


# ---------------------------------------------------------------- the language model

def test_joint_projections_match_the_separate_linears_and_freezing_changes_nothing(make_vlm):
    lm = make_vlm().lm
    attn, mlp = lm.layers[0].attn, lm.layers[0].mlp
    x = torch.randn(2, 5, 32)
    separate = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
    torch.testing.assert_close(attn.joint(x), separate, atol=1e-6, rtol=0)
    ids = torch.randint(4, 64, (2, 7))
    plain = lm(lm.embed_tokens(ids))
    with lm.frozen_weights():
        assert attn.joined is not None and mlp.joined is not None
        frozen = lm(lm.embed_tokens(ids))
    assert attn.joined is None and mlp.joined is None   # nothing stale is kept after generation
    assert torch.equal(plain, frozen)


def test_a_wrapped_or_hooked_projection_is_not_bypassed(make_vlm):
    attn = make_vlm().lm.layers[0].attn
    x = torch.randn(1, 3, 32)
    before = attn.joint(x)
    handle = attn.v_proj.register_forward_hook(lambda module, inputs, out: out * 0)   # as an adapter might
    after = attn.joint(x)
    handle.remove()
    v_width = attn.v_proj.out_features
    assert torch.equal(after[..., -v_width:], torch.zeros_like(after[..., -v_width:]))
    torch.testing.assert_close(after[..., :-v_width], before[..., :-v_width], atol=1e-6, rtol=0)


def test_last_only_logits_are_the_last_row_of_the_full_logits(make_vlm):
    lm = make_vlm().lm
    x = lm.embed_tokens(torch.randint(4, 64, (2, 9)))
    torch.testing.assert_close(lm(x, last_only=True), lm(x)[:, -1:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("prompt_len", [6, 0])   # SFT-like labels, and every position labelled
def test_loss_on_labelled_positions_only_has_the_full_logits_gradients(make_vlm, prompt_len):
    model = make_vlm().train()
    ids = torch.randint(4, 64, (2, 10))
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    loss_sum, count = model(ids, labels)
    loss_sum.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(ids)   # every position through the head, the ignored ones dropped by the loss
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                  ignore_index=-100, reduction="sum")
    reference.backward()
    assert int(count) == 2 * (9 - max(prompt_len - 1, 0))
    torch.testing.assert_close(loss_sum, reference)
    for name, grad in fast.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-6, rtol=1e-5, msg=name)
