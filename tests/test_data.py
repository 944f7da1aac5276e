"""Data path: bad samples become errors (or raise with strict), collate, feature cache, frame sampling, media errors."""
import json

import numpy as np
import pytest
import torch

from dataset.features import FeatureCache, FeatureWriter, open_cache, cache_folder
from dataset.media import MediaError, read_clip, read_image, read_video, uniform_indices
from dataset.vlm_dataset import ConversationDataset, collate, visual_inputs
from model.chat import IGNORE, BadSample, ChatEncoder

VIDEO = "videos/v00000.mp4"
OTHER_VIDEO = "videos/v00001.mp4"


@pytest.fixture(scope="module")
def chat(tokenizer):
    return ChatEncoder(tokenizer, 2)


def record(media=VIDEO, question="<video>\nWhat colour?", answer="red", kind="video"):
    return {"id": "x", kind: media, "category": "colour",
            "conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def make_dataset(path, chat, synthetic, frame_encoder=None, **kw):
    kw.setdefault("max_len", 128)
    return ConversationDataset(path, chat, num_frames=4, media_root=synthetic,
                               preprocess=frame_encoder.clip_inputs if frame_encoder else None, **kw)


BAD_LINES = {
    "missing media": (record(media="videos/nope.mp4"), "videos/nope.mp4"),
    "too many markers": (record(question="<video> and <video>"), "marker"),
    "no marker": (record(question="What colour?"), "marker"),
    "malformed json": ('{"id": "x", "conversations": [', "malformed JSON"),
    "not an object": ("[1, 2]", "not a JSON object"),
    "too long": (record(answer="red " * 200), "max_len"),
    "no assistant answer": ({"id": "x", "conversations": [{"role": "user", "content": "hi"}]}, "assistant"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_sample_comes_back_as_an_error_naming_the_file(tmp_path, chat, synthetic, frame_encoder, case):
    line, detail = BAD_LINES[case]
    path = write_jsonl(tmp_path / "data.jsonl", [record(), line])
    data = make_dataset(path, chat, synthetic, frame_encoder)
    assert "error" not in data[0]
    error = data[1]["error"]
    assert error.startswith(f"{path}:2: ") and detail in error and "\n" not in error


@pytest.mark.parametrize("case", ["missing media", "malformed json", "too long"])
def test_strict_raises_instead(tmp_path, chat, synthetic, frame_encoder, case):
    path = write_jsonl(tmp_path / "data.jsonl", [BAD_LINES[case][0]])
    data = make_dataset(path, chat, synthetic, frame_encoder, strict=True)
    with pytest.raises(BadSample, match=str(path)):
        data[0]


def test_collate_drops_bad_items_and_counts_them(tmp_path, chat, synthetic, frame_encoder, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", [record(), record(media="videos/nope.mp4"), record(OTHER_VIDEO)])
    data = make_dataset(path, chat, synthetic, frame_encoder)
    batch = collate([data[i] for i in range(3)], pad_id=chat.pad_id)
    assert batch["skipped"] == 1 and batch["size"] == 2
    assert batch["input_ids"].shape[0] == 2 and len(batch["media"]) == 2
    assert "nope.mp4" in capsys.readouterr().err
    empty = collate([data[1]], pad_id=chat.pad_id)
    assert empty["skipped"] == 1 and empty["size"] == 0 and "input_ids" not in empty


def fake_item(n, label_from=0):
    ids = torch.arange(10, 10 + n)
    labels = torch.where(torch.arange(n) >= label_from, ids, torch.full_like(ids, IGNORE))
    return {"input_ids": ids, "labels": labels, "media": [], "id": str(n), "category": "", "subset": ""}


def test_right_padding_for_training():
    batch = collate([fake_item(3), fake_item(5, label_from=2)], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], [10, 11, 12, 13, 14]]
    assert batch["labels"].tolist() == [[10, 11, 12, IGNORE, IGNORE], [IGNORE, IGNORE, 12, 13, 14]]
    assert batch["attention_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]


def test_left_padding_for_generation():
    batch = collate([fake_item(3), fake_item(5)], pad_id=0, left_pad=True)
    assert batch["input_ids"].tolist() == [[0, 0, 10, 11, 12], [10, 11, 12, 13, 14]]
    assert batch["attention_mask"].tolist() == [[False] * 2 + [True] * 3, [True] * 5]
    assert batch["labels"][0, :2].tolist() == [IGNORE, IGNORE]
    assert batch["id"] == ["3", "5"]


def test_for_generation_ends_with_the_assistant_prompt_and_keeps_the_reference(tmp_path, chat, synthetic,
                                                                               frame_encoder):
    path = write_jsonl(tmp_path / "data.jsonl", [record(answer="red")])
    item = make_dataset(path, chat, synthetic, frame_encoder, for_generation=True)[0]
    assert item["reference"] == "red"
    assert chat.tok.decode(item["input_ids"]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "red" not in chat.tok.decode(item["input_ids"])


def test_feature_writer_and_cache_round_trip_in_fp16_shards(tmp_path):
    torch.manual_seed(0)
    feats = {f"videos/{i}.mp4": torch.randn(4, 8) for i in range(5)}
    writer = FeatureWriter(tmp_path, shard_size=2)
    for key, f in feats.items():
        writer.add(key, f)
    writer.flush()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest) == set(feats)
    assert len(set(manifest.values())) == 3 == len(list(tmp_path.glob("shard_*.safetensors")))
    cache = FeatureCache(tmp_path)
    assert len(cache) == 5 and "videos/0.mp4" in cache and cache.get("videos/none.mp4") is None
    for key, f in feats.items():
        got = cache.get(key)
        assert got.dtype == torch.float16 and torch.equal(got, f.half())
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_a_second_writer_adds_to_an_existing_cache(tmp_path):
    first = FeatureWriter(tmp_path, shard_size=2)
    first.add("a", torch.zeros(1, 2))
    first.flush()
    second = FeatureWriter(tmp_path, shard_size=2)
    second.add("b", torch.ones(1, 2))
    second.flush()
    cache = FeatureCache(tmp_path)
    assert cache.get("a").sum() == 0 and cache.get("b").sum() == 2


def test_rewriting_a_key_keeps_every_key_readable(tmp_path):
    # Shard names come from the number of shards the manifest still names; once a re-added key
    # orphans a shard, the next flush reuses a live shard's name and overwrites its tensors.
    writer = FeatureWriter(tmp_path, shard_size=2)
    for value in (1.0, 2.0):
        writer.add("a", torch.full((1, 2), value))
        writer.add("b", torch.full((1, 2), value))
    writer.add("c", torch.full((1, 2), 3.0))
    writer.flush()
    cache = FeatureCache(tmp_path)
    assert [float(cache.get(k)[0, 0]) for k in "abc"] == [2.0, 2.0, 3.0]


def test_the_cache_keeps_each_media_frame_times_and_duration(synthetic, feature_cache, chat, tmp_path):
    clip = read_clip(synthetic / VIDEO, "video", 4)
    times, duration = FeatureCache(feature_cache).get_times(VIDEO)
    np.testing.assert_allclose(times.numpy(), clip.times)
    assert duration == pytest.approx(clip.duration) and duration == pytest.approx(2.0)   # 16 frames at 8 fps
    path = write_jsonl(tmp_path / "data.jsonl", [record(VIDEO)])
    (kind, _, entry_times), = make_dataset(path, chat, synthetic, cache=FeatureCache(feature_cache))[0]["media"]
    assert kind == "features" and entry_times.tolist() == times.tolist()


def test_a_cache_written_without_times_gives_none(tmp_path):
    writer = FeatureWriter(tmp_path)
    writer.add("a.mp4", torch.ones(4, 8))
    writer.flush()
    assert FeatureCache(tmp_path).get_times("a.mp4") is None and FeatureCache(tmp_path).get_times("b.mp4") is None
    with pytest.raises(ValueError, match="may not start"):
        writer.add("@times/a.mp4", torch.ones(4, 8))


def test_online_media_carry_their_frame_times(tmp_path, chat, synthetic, frame_encoder):
    path = write_jsonl(tmp_path / "data.jsonl", [record(VIDEO)])
    (kind, _, times), = make_dataset(path, chat, synthetic, frame_encoder)[0]["media"]
    assert kind == "clip_inputs" and times.tolist() == [0.25, 0.75, 1.25, 1.75]   # frames 2, 6, 10, 14 at 8 fps


def test_dataset_uses_cached_features_and_pixels_for_the_rest(tmp_path, chat, synthetic, frame_encoder,
                                                              vision_cfg):
    online = frame_encoder.encode(read_video(synthetic / VIDEO, 4))
    folder = cache_folder(tmp_path, vision_cfg)
    writer = FeatureWriter(folder)
    writer.add(VIDEO, online)
    writer.flush()
    cache = open_cache(tmp_path, vision_cfg)
    assert cache is not None and VIDEO in cache

    path = write_jsonl(tmp_path / "data.jsonl", [record(VIDEO), record(OTHER_VIDEO)])
    data = make_dataset(path, chat, synthetic, frame_encoder, cache=cache)
    assert data.uncached() == {OTHER_VIDEO}
    (kind0, x0, _), = data[0]["media"]
    (kind1, x1, _), = data[1]["media"]
    assert kind0 == "features" and x0.dtype == torch.float16 and x0.shape == online.shape
    assert kind1 == "clip_inputs" and x1.shape == (4, 3, 32, 32)
    frames, mask, _ = visual_inputs([(kind0, x0)], frame_encoder)
    torch.testing.assert_close(frames[0], online, atol=2e-3, rtol=2e-3)


def test_uncached_media_without_an_encoder_is_a_bad_sample(tmp_path, chat, synthetic):
    path = write_jsonl(tmp_path / "data.jsonl", [record()])
    assert "not in the feature cache" in make_dataset(path, chat, synthetic)[0]["error"]


def test_images_are_one_frame_and_videos_num_frames(tmp_path, chat, synthetic, frame_encoder):
    image = sorted((synthetic / "images").iterdir())[0].relative_to(synthetic).as_posix()
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"id": "y", "image": [image], "video": VIDEO, "conversations": [
            {"role": "user", "content": "<video> then <image>"}, {"role": "assistant", "content": "ok"}]}])
    media = make_dataset(path, chat, synthetic, frame_encoder)[0]["media"]
    assert [x.shape[0] for _, x, _ in media] == [4, 1]   # marker order, not key order
    assert read_image(synthetic / image).shape[0] == 1


def test_uniform_indices_take_segment_centres():
    assert uniform_indices(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert uniform_indices(10, 1).tolist() == [5]


def test_uniform_indices_repeat_frames_of_a_short_clip_within_range():
    idx = uniform_indices(3, 8)
    assert len(idx) == 8 and idx.min() >= 0 and idx.max() <= 2
    assert sorted(set(idx.tolist())) == [0, 1, 2] and list(idx) == sorted(idx)


def test_read_video_samples_the_requested_frame_count(synthetic):
    frames = read_video(synthetic / VIDEO, 5)
    assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.uint8


@pytest.mark.parametrize("content", [b"", b"this is not a video\n" * 10])
def test_unreadable_video_raises_media_error_naming_the_file(tmp_path, content):
    path = tmp_path / "clip.mp4"
    path.write_bytes(content)
    with pytest.raises(MediaError) as error:
        read_video(path, 4)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_image_raises_media_error_naming_the_file(tmp_path):
    with pytest.raises(MediaError, match="nope.png"):
        read_image(tmp_path / "nope.png")


def test_for_generation_lists_the_answer_and_the_records_extra_references(tmp_path, chat, synthetic, frame_encoder):
    line = {**record(answer="red"), "references": ["Red.", "crimson", "red", "crimson"]}
    path = write_jsonl(tmp_path / "data.jsonl", [line, record(answer="blue")])
    data = make_dataset(path, chat, synthetic, frame_encoder, for_generation=True)
    assert data[0]["reference"] == "red" and data[0]["references"] == ["red", "Red.", "crimson"]
    assert data[1]["references"] == ["blue"]
    batch = collate([data[0], data[1]], pad_id=chat.pad_id, left_pad=True)
    assert batch["references"] == [["red", "Red.", "crimson"], ["blue"]]


@pytest.mark.parametrize("references", [3, ["red", 3], {"a": "red"}])
def test_references_that_are_not_strings_make_a_bad_sample(tmp_path, chat, synthetic, frame_encoder, references):
    path = write_jsonl(tmp_path / "data.jsonl", [{**record(), "references": references}])
    error = make_dataset(path, chat, synthetic, frame_encoder, for_generation=True)[0]["error"]
    assert error.startswith(f"{path}:1: ") and '"references"' in error
    assert "error" not in make_dataset(path, chat, synthetic, frame_encoder)[0]   # training ignores them


def test_for_generation_carries_span_duration_and_phrasing_into_the_batch(tmp_path, chat, synthetic, frame_encoder):
    timed = {**record(), "span": [1, 2.5], "duration": 12, "phrasing": "held_out"}
    path = write_jsonl(tmp_path / "data.jsonl", [timed, record()])
    data = make_dataset(path, chat, synthetic, frame_encoder, for_generation=True)
    assert (data[0]["span"], data[0]["duration"], data[0]["phrasing"]) == ([1.0, 2.5], 12.0, "held_out")
    assert (data[1]["span"], data[1]["duration"], data[1]["phrasing"]) == (None, None, None)
    batch = collate([data[0], data[1]], pad_id=chat.pad_id, left_pad=True)
    assert batch["span"] == [[1.0, 2.5], None] and batch["duration"] == [12.0, None]
    assert batch["phrasing"] == ["held_out", None]


def test_for_generation_encodes_the_conversation_once_per_choice(tmp_path, chat, synthetic, frame_encoder):
    path = write_jsonl(tmp_path / "data.jsonl", [{**record(answer="red"), "choices": ["blue", "red"]}, record()])
    data = make_dataset(path, chat, synthetic, frame_encoder, for_generation=True)
    trained = make_dataset(path, chat, synthetic, frame_encoder)[0]   # the record as training reads it
    assert data[0]["choices"] == ["blue", "red"] and data[1]["choices"] is None and data[1]["choice_ids"] == []
    answer, prompt = data[0]["choice_ids"][1], data[0]["input_ids"].tolist()   # answered "red", its own answer
    ids, labels = trained["input_ids"].tolist(), trained["labels"].tolist()
    assert answer == [t for t, label in zip(ids, labels) if label != IGNORE]   # what training scores, and only it
    assert prompt + answer == ids[:len(prompt) + len(answer)]
    batch = collate([data[0], data[1]], pad_id=chat.pad_id, left_pad=True)
    assert batch["choices"] == [["blue", "red"], None] and batch["media_counts"] == [1, 1]


BAD_TIMING = {
    "span not a pair": ({"span": [1.0]}, '"span"'),
    "span ends first": ({"span": [3.0, 1.0]}, '"span"'),
    "span of words": ({"span": ["1 s", "2 s"]}, '"span"'),
    "span of booleans": ({"span": [False, True]}, '"span"'),
    "duration a word": ({"duration": "long"}, '"duration"'),
    "negative duration": ({"duration": -1}, '"duration"'),
    "unknown phrasing": ({"phrasing": "novel"}, '"phrasing"'),
    "one choice": ({"choices": ["red"]}, '"choices"'),
    "a repeated choice": ({"choices": ["red", "red"]}, '"choices"'),
    "an empty choice": ({"choices": ["red", " "]}, '"choices"'),
    "choices a string": ({"choices": "red or blue"}, '"choices"'),
}


@pytest.mark.parametrize("case", BAD_TIMING)
def test_a_malformed_span_duration_phrasing_or_choices_makes_a_bad_sample(tmp_path, chat, synthetic, frame_encoder, case):
    fields, detail = BAD_TIMING[case]
    path = write_jsonl(tmp_path / "data.jsonl", [record(), {**record(), **fields}])
    data = make_dataset(path, chat, synthetic, frame_encoder, for_generation=True)
    error = data[1]["error"]
    assert "error" not in data[0]
    assert error.startswith(f"{path}:2: ") and detail in error and "\n" not in error
    with pytest.raises(BadSample, match=f"{path}:2: "):
        make_dataset(path, chat, synthetic, frame_encoder, for_generation=True, strict=True)[1]
    assert "error" not in make_dataset(path, chat, synthetic, frame_encoder)[1]   # training ignores them


def test_a_model_that_reads_times_does_not_use_a_cache_without_them(tmp_path, vision_cfg, capsys):
    import dataclasses
    folder = cache_folder(tmp_path, vision_cfg)
    writer = FeatureWriter(folder)
    writer.add(VIDEO, torch.ones(4, 8))
    writer.flush()
    assert open_cache(tmp_path, vision_cfg) is not None   # the index model does not need them
    seconds = dataclasses.replace(vision_cfg, time_encoding="seconds")
    assert open_cache(tmp_path, seconds) is None
    assert "without frame times" in capsys.readouterr().err
    writer.add(OTHER_VIDEO, torch.ones(4, 8), times=[0.0, 0.5, 1.0, 1.5], duration=2.0)
    writer.flush()
    assert open_cache(tmp_path, seconds) is None   # one media without times is enough to refuse it
    timed = FeatureWriter(tmp_path / "timed")
    timed.add(VIDEO, torch.ones(4, 8), times=[0.0, 0.5, 1.0, 1.5], duration=2.0)
    timed.flush()
    cache = open_cache(tmp_path, seconds, feature_dir=str(tmp_path / "timed"))
    assert cache is not None and cache.get_times(VIDEO)[1] == 2.0


def test_rerunning_extraction_gives_an_old_cache_its_frame_times(tmp_path, synthetic, vision_file):
    import extract_features
    from conftest import CLIP_MODEL, CLIP_SIZE
    folder = tmp_path / "cache"
    old = FeatureWriter(folder)
    old.add(VIDEO, torch.ones(4, 8))   # as caches were written before frame times were kept
    old.flush()
    data = write_jsonl(tmp_path / "data.jsonl", [record(VIDEO)])
    extract_features.main(["--data", str(data), "--media_root", str(synthetic), "--clip_model", CLIP_MODEL,
                           "--clip_image_size", str(CLIP_SIZE), "--clip_pretrained", str(vision_file),
                           "--num_frames", "4", "--out", str(folder), "--num_workers", "0"])
    cache = FeatureCache(folder)
    assert cache.has_times() and cache.get_times(VIDEO)[0].tolist() == [0.25, 0.75, 1.25, 1.75]


def test_a_segment_model_gives_each_media_the_slots_its_duration_asks_for(tmp_path, chat, synthetic, frame_encoder):
    from model.config import VisionConfig
    from functools import partial
    from model.video_summary import media_slot_counts
    counter = partial(media_slot_counts, VisionConfig(num_visual_tokens=8, segment_seconds=1.0))
    image = next((synthetic / "images").iterdir()).relative_to(synthetic).as_posix()
    path = write_jsonl(tmp_path / "data.jsonl", [record(VIDEO), record(image, "<image>\nWhat?", kind="image")])
    data = make_dataset(path, chat, synthetic, frame_encoder, slot_counts=counter)
    # Frames at 0.25, 0.75, 1.25, 1.75 s: two 1-s segments, a pair each; an image is one segment.
    assert [int((data[i]["input_ids"] == chat.vision_pad).sum()) for i in range(2)] == [4, 2]
    fixed = make_dataset(path, chat, synthetic, frame_encoder)
    assert [int((fixed[i]["input_ids"] == chat.vision_pad).sum()) for i in range(2)] == [2, 2]
