"""Converters: each public format's records (as published) → our schema, loadable by ConversationDataset."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import convert_data
from conftest import run_python
from dataset.converters import (Options, Skip, SourceError, convert_records, from_minimind, read_msvd_mapping,
                                read_nextqa_mapping)
from dataset.vlm_dataset import ConversationDataset
from model.chat import IGNORE, ChatEncoder

# One fixture per source format, following each project's published field names: two good records
# and one bad one. (ShareGPT4Video's timestamp/keyframe values are illustrative; nothing reads them.)
# A fixture given as a string is the file's text (Charades-STA lines, NExT-QA csv), a dict a JSON object.
FIXTURES = {
    "llava-video": ("0_30_s_academic_oe_v0_1_qa_processed.json", [
        {"id": "RW587", "conversations": [
            {"from": "human", "value": "<image>\nWhat does the man take out of the fridge?"},
            {"from": "gpt", "value": "He takes out a bottle of milk."}],
         "data_source": "0_30_s_academic_v0_1", "video": "academic_source/Charades/RW587.mp4"},
        {"id": "1006-8968804598", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the boy holding?"},
            {"from": "gpt", "value": "A red ball."},
            {"from": "human", "value": "What does he do with it?"},
            {"from": "gpt", "value": "He throws it to the dog."}],
         "data_source": "0_30_s_nextqa", "video": "NextQA/NExTVideo/1006/8968804598.mp4"},
        {"id": "ytb_bad", "conversations": [
            {"from": "human", "value": "<image>\nWhat happens next?"}, {"from": "gpt", "value": "It rains."}],
         "data_source": "0_30_s_youtube_v0_1"},
    ]),
    "sharegpt4video": ("sharegpt4video_40k.jsonl", [
        {"video_id": "j5JqNXjGufw", "video_path": "panda/j5JqNXjGufw.mp4", "timestamp": [0.0, 2.0],
         "keyframe": [0, 48], "zip_folder": "panda_videos_16.zip", "captions": [
             {"idx": "0", "content": "A white kitten sits on a wooden floor."},
             {"idx": "1", "content": "The kitten stands up and walks towards the camera."},
             {"idx": "-1", "content": "A white kitten sits on a wooden floor, then walks towards the camera."}]},
        {"video_id": "c7a3e1d0", "video_path": "ego4d/c7a3e1d0.mp4", "timestamp": [0.0], "keyframe": [0],
         "zip_folder": "ego4d_videos_1.zip", "captions": [
             {"idx": "0", "content": "Hands chop an onion on a board."},
             {"idx": "-1", "content": "Someone chops an onion on a cutting board."}]},
        {"video_id": "nocap", "video_path": "panda/nocap.mp4", "timestamp": [0.0], "keyframe": [0],
         "zip_folder": "panda_videos_1.zip", "captions": [{"idx": "0", "content": "A car."}]},
    ]),
    "videoinstruct": ("VideoInstruct100K.json", [
        {"video_id": "v_k_ZXmr8pmrs", "q": "What is the man doing in the video?",
         "a": "The man is cleaning a window with a squeegee."},
        {"video_id": "v_3qkNnr1_78I", "q": "Describe the video.", "a": "Two people play table tennis."},
        {"video_id": "v_mTDRTiTnsjQ", "q": "What sport is shown?"},
    ]),
    "msrvtt-qa": ("test_qa.json", [
        {"answer": "clip", "category_id": 14, "id": 158581, "question": "what is a computer program used for?",
         "video_id": 7010},
        {"answer": "man", "category_id": 3, "id": 158582, "question": "who is talking?", "video_id": 7011},
        {"answer": "", "category_id": 3, "id": 158583, "question": "what is he doing?", "video_id": 7012},
    ]),
    "msvd-qa": ("test_qa.json", [
        {"answer": "man", "id": 0, "question": "who is slicing a tomato?", "video_id": 1},
        {"answer": "slice", "id": 1, "question": "what is the man doing?", "video_id": 2},
        {"answer": "dog", "id": 2, "question": "what is running?", "video_id": "clip-3"},
    ]),
    "minimind-v": ("sft_vlm_data.jsonl", [
        {"conversations": [{"role": "user", "content": "提供给定图像的简要描述。\n<image>"},
                           {"role": "assistant", "content": "橄榄油是健康的烹饪原料。"}],
         "image": "GCC_train_002582585.jpg"},
        {"conversations": [{"role": "user", "content": "<image>\n<image>\nAre these the same animal?"},
                           {"role": "assistant", "content": "No, a dog and a cat."}],
         "image": "dog.jpg, cat.jpg"},
        {"conversations": [{"role": "user", "content": "<image>\n<image>\n描述图像。"},
                           {"role": "assistant", "content": "一只猫。"}],
         "image": "cat.jpg"},
    ]),
    "cinego": ("sft_video.jsonl", [
        {"conversations": [{"role": "user", "content": "<image>\nWhat is the person doing?"},
                           {"role": "assistant", "content": "The person is stirring a pot."}],
         "image": "academic_source/Charades/0AMBV.mp4"},
        {"conversations": [{"role": "user", "content": "<image>\nWhere is this?"},
                           {"role": "assistant", "content": "In a kitchen."},
                           {"role": "user", "content": "Is anyone else there?"},
                           {"role": "assistant", "content": "No."}],
         "image": "academic_source/Charades/0AYPZ.mp4"},
        {"conversations": [{"role": "user", "content": "<image>\nWhat moves?"},
                           {"role": "assistant", "content": "A cat."}],
         "image": "clips/cat.gif"},
    ]),
    "charades-sta": ("charades_sta_test.txt",
                     "3MSZA 24.3 30.4##person turn a light on.\n"
                     "AO8RW 0.0 6.9##a person is putting a book on a shelf.\n"
                     "Y6R7T 12.5 8.0##person sitting down on a chair.\n"),
    "activitynet-captions": ("val_1.json", {
        "v_k_ZXmr8pmrs": {"duration": 82.73, "timestamps": [[0.28, 55.15], [13.79, 54.32], [50.1, 90.0]],
                          "sentences": ["A man stands at a window holding a squeegee.",
                                        " He wipes the glass from top to bottom.",
                                        " He steps back and looks at the clean window."]},
        "v_3qkNnr1_78I": {"duration": 30.0, "timestamps": [[2.0, 12.5]],
                          "sentences": ["Two people hit a small ball across a table."]},
        "v_mTDRTiTnsjQ": {"duration": 40.0, "timestamps": [[1.0, 5.0], [6.0, 9.0]],
                          "sentences": ["A dog runs across a yard."]},
    }),
    "nextqa": ("val.csv",
               "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n"
               "2440175990,1203,640,480,why did the boy run to the door,1,0,CW,"
               "to hide,to get the ball,to open it,to meet his dad,to leave\n"
               "3238737531,900,640,360,what does the girl do after picking up the ball,3,4,TN,"
               "sits down,cries,kicks it,throws it to the dog,rolls it away\n"
               "3238737531,900,640,360,how many dogs are there,7,5,DC,one,two,three,four,five\n"),
}
MSVD_MAPPING = "-4wsuPCjDBc_5_15 vid1\n-7KMZQEsJW4_205_208 vid2\n"
NEXTQA_MAPPING = {"2440175990": "0000/2440175990", "3238737531": "1006/3238737531"}

# What the two good records of each fixture become: (id, media kind, source path, user texts, answers, category).
EXPECTED = {
    "llava-video": [
        ("RW587", "video", "academic_source/Charades/RW587.mp4",
         ["<video>\nWhat does the man take out of the fridge?"], ["He takes out a bottle of milk."], None),
        ("1006-8968804598", "video", "NextQA/NExTVideo/1006/8968804598.mp4",
         ["<video>\nWhat is the boy holding?", "What does he do with it?"],
         ["A red ball.", "He throws it to the dog."], None)],
    "sharegpt4video": [
        ("j5JqNXjGufw", "video", "panda/j5JqNXjGufw.mp4", ["<video>\nDescribe the video in detail."],
         ["A white kitten sits on a wooden floor, then walks towards the camera."], "caption"),
        ("c7a3e1d0", "video", "ego4d/c7a3e1d0.mp4", ["<video>\nDescribe the video in detail."],
         ["Someone chops an onion on a cutting board."], "caption")],
    "videoinstruct": [
        ("v_k_ZXmr8pmrs_0", "video", "v_k_ZXmr8pmrs.mp4", ["<video>\nWhat is the man doing in the video?"],
         ["The man is cleaning a window with a squeegee."], None),
        ("v_3qkNnr1_78I_1", "video", "v_3qkNnr1_78I.mp4", ["<video>\nDescribe the video."],
         ["Two people play table tennis."], None)],
    "msrvtt-qa": [
        ("msrvtt_158581", "video", "video7010.mp4", ["<video>\nwhat is a computer program used for?"],
         ["clip"], "qa"),
        ("msrvtt_158582", "video", "video7011.mp4", ["<video>\nwho is talking?"], ["man"], "qa")],
    "msvd-qa": [
        ("msvd_0", "video", "-4wsuPCjDBc_5_15.avi", ["<video>\nwho is slicing a tomato?"], ["man"], "qa"),
        ("msvd_1", "video", "-7KMZQEsJW4_205_208.avi", ["<video>\nwhat is the man doing?"], ["slice"], "qa")],
    "minimind-v": [
        ("sft_vlm_data_0", "image", "GCC_train_002582585.jpg", ["提供给定图像的简要描述。\n<image>"],
         ["橄榄油是健康的烹饪原料。"], None),
        ("sft_vlm_data_1", "image", ["dog.jpg", "cat.jpg"], ["<image>\n<image>\nAre these the same animal?"],
         ["No, a dog and a cat."], None)],
    "cinego": [
        ("sft_video_0", "video", "academic_source/Charades/0AMBV.mp4", ["<video>\nWhat is the person doing?"],
         ["The person is stirring a pot."], None),
        ("sft_video_1", "video", "academic_source/Charades/0AYPZ.mp4", ["<video>\nWhere is this?", "Is anyone else there?"],
         ["In a kitchen.", "No."], None)],
    "charades-sta": [
        ("3MSZA_0", "video", "3MSZA.mp4", ["<video>\nWhen does this happen: person turn a light on?"],
         ["from 24.3 s to 30.4 s"], "grounding"),
        ("AO8RW_1", "video", "AO8RW.mp4",
         ["<video>\nFind the moment in the video: a person is putting a book on a shelf. When does it start and end?"],
         ["from 0.0 s to 6.9 s"], "grounding")],
    "activitynet-captions": [
        ("v_k_ZXmr8pmrs_dense", "video", "v_k_ZXmr8pmrs.mp4", ["<video>\nDescribe what happens, with times."],
         ["from 0.3 s to 55.1 s: A man stands at a window holding a squeegee.\n"
          "from 13.8 s to 54.3 s: He wipes the glass from top to bottom.\n"
          "from 50.1 s to 82.7 s: He steps back and looks at the clean window."], "dense_caption"),
        ("v_k_ZXmr8pmrs_0", "video", "v_k_ZXmr8pmrs.mp4",
         ["<video>\nFind the moment in the video: A man stands at a window holding a squeegee. "
          "When does it start and end?"], ["from 0.3 s to 55.1 s"], "grounding")],
    "nextqa": [
        ("nextqa_2440175990_0", "video", "0000/2440175990.mp4",
         ["<video>\nwhy did the boy run to the door?\n(A) to hide\n(B) to get the ball\n(C) to open it\n"
          "(D) to meet his dad\n(E) to leave"], ["(B) to get the ball"], "CW"),
        ("nextqa_3238737531_4", "video", "1006/3238737531.mp4",
         ["<video>\nwhat does the girl do after picking up the ball?\n(A) sits down\n(B) cries\n(C) kicks it\n"
          "(D) throws it to the dog\n(E) rolls it away"], ["(D) throws it to the dog"], "TN")],
}
BAD_REASON = {"llava-video": "missing_field", "sharegpt4video": "no_caption", "videoinstruct": "missing_field",
              "msrvtt-qa": "missing_field", "msvd-qa": "bad_field", "minimind-v": "marker_count",
              "cinego": "unknown_media_type", "charades-sta": "bad_span",
              "activitynet-captions": "count_mismatch", "nextqa": "bad_field"}
# Records written from the two good source records: one each, but a dense caption plus one grounding
# sample per event for an ActivityNet video (3 events and 1 event).
WRITTEN = {"activitynet-captions": 6}


def write_fixture(folder: Path, fmt: str) -> Path:
    name, records = FIXTURES[fmt]
    path = folder / name
    if isinstance(records, str):
        path.write_text(records, encoding="utf-8")
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def convert(tmp_path, fmt, **options):
    source = write_fixture(tmp_path, fmt)
    if fmt == "msvd-qa":
        (tmp_path / "youtube_mapping.txt").write_text(MSVD_MAPPING)
        options.setdefault("msvd_mapping", read_msvd_mapping(tmp_path / "youtube_mapping.txt"))
    if fmt == "nextqa":
        (tmp_path / "map_vid_vidorID.json").write_text(json.dumps(NEXTQA_MAPPING))
        options.setdefault("nextqa_mapping", read_nextqa_mapping(tmp_path / "map_vid_vidorID.json"))
    opts = Options(out_dir=str(tmp_path / "out"), media_root=str(tmp_path / "media"), **options)
    counts = Counter()
    return list(convert_records(fmt, source, opts, counts)), counts


def user_and_answers(record):
    turns = record["conversations"]
    return ([t["content"] for t in turns if t["role"] == "user"],
            [t["content"] for t in turns if t["role"] == "assistant"])


@pytest.mark.parametrize("fmt", sorted(FIXTURES))
def test_converts_good_records_and_skips_the_bad_one(tmp_path, fmt):
    records, counts = convert(tmp_path, fmt)
    assert counts == Counter(read=3, written=WRITTEN.get(fmt, 2), **{BAD_REASON[fmt]: 1})
    for record, (rid, kind, source, users, answers, category) in zip(records, EXPECTED[fmt]):
        assert record["id"] == rid
        assert user_and_answers(record) == (users, answers)
        assert record.get("category") == category
        other = "image" if kind == "video" else "video"
        assert other not in record
        # Paths are written relative to the output folder and point at media_root/<source path>.
        sources = source if isinstance(source, list) else [source]
        written = record[kind] if isinstance(record[kind], list) else [record[kind]]
        assert [(tmp_path / "out" / p).resolve() for p in written] == \
               [(tmp_path / "media" / s).resolve() for s in sources]


def test_source_fields_are_kept(tmp_path):
    llava, _ = convert(tmp_path, "llava-video")
    assert [r["source"] for r in llava] == ["0_30_s_academic_v0_1", "0_30_s_nextqa"]
    share, _ = convert(tmp_path, "sharegpt4video")
    assert [r["source"] for r in share] == ["panda_videos_16", "ego4d_videos_1"]


class StandInCache(dict):
    """Stands in for a FeatureCache: cached CLIP features by media path, without frame times."""

    def get_times(self, key):
        return None


@pytest.mark.parametrize("fmt", sorted(FIXTURES))
def test_converted_output_loads_and_round_trips_the_text(tmp_path, fmt, tokenizer):
    records, _ = convert(tmp_path, fmt)
    out = tmp_path / "out" / "data.jsonl"
    out.parent.mkdir()
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    chat = ChatEncoder(tokenizer, 2)
    media = {p for r in records for kind in ("video", "image") for p in
             ([r[kind]] if isinstance(r.get(kind), str) else r.get(kind, []))}
    cache = StandInCache({p: torch.zeros(4, 8) for p in media})
    data = ConversationDataset(out, chat, num_frames=4, max_len=512, cache=cache)
    for i, (_, kind, source, users, answers, _) in enumerate(EXPECTED[fmt]):
        item = data[i]
        assert "error" not in item, item.get("error")
        n_media = len(source) if isinstance(source, list) else 1
        assert len(item["media"]) == n_media
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert ids.count(chat.vision_pad) == 2 * n_media
        learned = tokenizer.decode([t for t in labels if t != IGNORE])
        assert learned == "".join(a + "<|im_end|>" for a in answers)
        text = tokenizer.decode([t for t in ids if t != chat.vision_pad])
        for user in users:
            assert user.replace("<video>", "").replace("<image>", "") in text


def test_without_media_root_paths_are_kept_as_given(tmp_path):
    source = write_fixture(tmp_path, "llava-video")
    records = list(convert_records("llava-video", source, Options(out_dir=str(tmp_path / "elsewhere")), Counter()))
    assert records[0]["video"] == "academic_source/Charades/RW587.mp4"


def test_video_ext_auto_finds_the_existing_file(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "v_k_ZXmr8pmrs.mkv").write_bytes(b"x")
    (media / "v_3qkNnr1_78I.webm").write_bytes(b"x")
    records, counts = convert(tmp_path, "videoinstruct", video_ext="auto")
    assert [r["video"] for r in records] == ["../media/v_k_ZXmr8pmrs.mkv", "../media/v_3qkNnr1_78I.webm"]
    (media / "v_3qkNnr1_78I.webm").unlink()
    records, counts = convert(tmp_path, "videoinstruct", video_ext="auto")
    assert counts["video_not_found"] == 1 and len(records) == 1


def test_msvd_without_mapping_uses_vid_names_and_unknown_ids_are_skipped(tmp_path):
    records, _ = convert(tmp_path, "msvd-qa", msvd_mapping=None)
    assert [Path(r["video"]).name for r in records] == ["vid1.avi", "vid2.avi"]
    records, counts = convert(tmp_path, "msvd-qa", msvd_mapping={"vid1": "-4wsuPCjDBc_5_15"})
    assert counts["unknown_video_id"] == 1 and len(records) == 1


def test_question_word_category_and_override(tmp_path):
    records, _ = convert(tmp_path, "msrvtt-qa", category_from_question=True)
    assert [r["category"] for r in records] == ["what", "who"]
    records, _ = convert(tmp_path, "msrvtt-qa", category="msrvtt")
    assert [r["category"] for r in records] == ["msrvtt", "msrvtt"]


def test_sharegpt4video_keyframe_turn_lists_keyframe_captions_in_order(tmp_path):
    records, _ = convert(tmp_path, "sharegpt4video", keyframe_turn=True)
    users, answers = user_and_answers(records[0])
    assert len(users) == 2 and users[1] == "Describe what happens in the video, step by step."
    assert answers[1] == ("1. A white kitten sits on a wooden floor.\n"
                          "2. The kitten stands up and walks towards the camera.")


def test_minimind_expanded_placeholder_and_marker_insertion():
    expanded = {"conversations": [{"role": "user", "content": "@" * 196 + "\nDescribe it."},
                                  {"role": "assistant", "content": "A cat."}], "image": "a.jpg"}
    assert from_minimind(expanded, 0, Options())["conversations"][0]["content"] == "<image>\nDescribe it."
    no_marker = {"conversations": [{"role": "user", "content": "Describe it."},
                                   {"role": "assistant", "content": "A cat."}], "image": "clip.mp4"}
    assert from_minimind(no_marker, 0, Options())["conversations"][0]["content"] == "<video>\nDescribe it."
    swapped = {"conversations": [{"role": "assistant", "content": "A cat."},
                                 {"role": "user", "content": "<image>"}], "image": "a.jpg"}
    with pytest.raises(Skip, match="expected a 'user' turn"):
        from_minimind(swapped, 0, Options())


def make_mp4(path: Path):
    from dataset.synthetic import pick_codec, write_mp4
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    frames[:, :, :16] = 200
    write_mp4(path, frames, 4, pick_codec())


def test_cli_converts_and_training_loader_reads_the_real_video(tmp_path, tokenizer, frame_encoder):
    source = write_fixture(tmp_path, "llava-video")
    make_mp4(tmp_path / "media" / "academic_source" / "Charades" / "RW587.mp4")
    out = tmp_path / "converted" / "llava.jsonl"
    result = run_python("scripts/convert_data.py", "--format", "llava-video", "--input", source,
                        "--media_root", tmp_path / "media", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "read 3, written 2" in result.stdout and "skipped missing_field: 1" in result.stdout
    assert "ytb_bad" in result.stderr and str(source) in result.stderr
    data = ConversationDataset(out, ChatEncoder(tokenizer, 2), num_frames=4, max_len=512,
                               preprocess=frame_encoder.clip_inputs)
    item = data[0]
    assert "error" not in item, item.get("error")
    assert item["media"][0][0] == "clip_inputs" and item["media"][0][1].shape[0] == 4
    assert "video file not found" in data[1]["error"]   # the second video was never written


def test_cli_strict_stops_with_one_line_naming_the_record(tmp_path):
    source = write_fixture(tmp_path, "videoinstruct")
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as stop:
        convert_data.main(["--format", "videoinstruct", "--input", str(source), "--out", str(out), "--strict"])
    assert stop.value.code == f"error: {source}[2] (id v_mTDRTiTnsjQ): missing or empty 'a'"
    assert not out.exists() and not (tmp_path / "out.jsonl.tmp").exists()


def test_cli_unreadable_input_is_one_line_error(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"video_id": 1, ')
    with pytest.raises(SystemExit) as stop:
        convert_data.main(["--format", "msrvtt-qa", "--input", str(bad), "--out", str(tmp_path / "o.jsonl")])
    assert stop.value.code.startswith(f"error: {bad}: not valid JSON")


def test_temporal_records_keep_the_span_as_numbers(tmp_path):
    charades, _ = convert(tmp_path, "charades-sta")
    assert [r["span"] for r in charades] == [[24.3, 30.4], [0.0, 6.9]]
    assert "duration" not in charades[0]   # Charades-STA's lines carry no video length
    activitynet, _ = convert(tmp_path, "activitynet-captions")
    dense, *grounding = activitynet[:4]
    # The third event's end (90.0) overruns the 82.73 s video and is clipped to it, in text and numbers.
    assert dense["spans"] == [[0.28, 55.15], [13.79, 54.32], [50.1, 82.73]]
    assert [r["span"] for r in grounding] == dense["spans"]
    assert user_and_answers(grounding[2])[1] == ["from 50.1 s to 82.7 s"]
    assert {r["duration"] for r in activitynet[:4]} == {82.73} and activitynet[4]["duration"] == 30.0


def test_charades_sta_malformed_lines_are_skipped_with_their_reason(tmp_path):
    source = tmp_path / "charades_sta_train.txt"
    source.write_text("3MSZA 24.3 30.4##person turn a light on.\n\n"
                      "3MSZA 24.3 30.4 person turn a light on.\n"     # no ##
                      "3MSZA soon 30.4##person opens a door.\n"       # not a number
                      "3MSZA 1.0 2.0 3.0##person sits.\n"             # too many fields
                      "3MSZA nan 2.0##person sits.\n"
                      "3MSZA 1.0 2.0##  .\n", encoding="utf-8")
    skipped = []
    records = list(convert_records("charades-sta", source, Options(), counts := Counter(),
                                   lambda where, _, skip: skipped.append((where, skip.reason))))
    assert len(records) == 1 and records[0]["video"] == "3MSZA.mp4"
    assert counts == Counter(read=6, written=1, malformed_line=2, bad_span=2, missing_field=1)
    assert skipped[0] == (f"{source}:3", "malformed_line")   # the blank line is no record


def test_activitynet_bad_events_skip_the_video_naming_the_event(tmp_path):
    source = tmp_path / "train.json"
    good = {"timestamps": [[1.0, 5.0]], "sentences": ["A cat jumps."]}
    source.write_text(json.dumps({
        "v_a": {**good, "duration": 10.0, "timestamps": [[5.0, 1.0]]},
        "v_b": {**good, "duration": 10.0, "timestamps": [[12.0, 15.0]]},
        "v_c": {**good, "duration": "long"},
        "v_d": {**good, "duration": 10.0, "sentences": ["  "]},
        "v_e": [1, 2],
        "v_f": {**good, "duration": 10.0, "timestamps": [[-0.4, 5.0]]}}))
    messages = {}
    records = list(convert_records("activitynet-captions", source, Options(), counts := Counter(),
                                   lambda where, rid, skip: messages.update({rid: str(skip)})))
    assert counts == Counter(read=6, written=2, bad_span=2, bad_field=1, missing_field=1, malformed_json=1)
    assert messages["v_a"] == "timestamp 0: 5.0 to 1.0 ends before it starts"
    assert messages["v_b"] == "timestamp 0 starts at 12.0 s, after the video's 10.0 s"
    assert records[1]["span"] == [0.0, 5.0]   # clipped at the start as well
    with pytest.raises(SourceError, match="expected a JSON object keyed by video id"):
        source.write_text("[]")
        list(convert_records("activitynet-captions", source, Options(), Counter()))


def test_nextqa_references_choices_mapping_and_missing_columns(tmp_path, tokenizer):
    records, _ = convert(tmp_path, "nextqa")
    out = tmp_path / "out" / "nextqa.jsonl"
    out.parent.mkdir()
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    data = ConversationDataset(out, ChatEncoder(tokenizer, 2), num_frames=4, max_len=512, for_generation=True,
                               cache=StandInCache({r["video"]: torch.zeros(4, 8) for r in records}))
    assert data[0]["references"] == ["(B) to get the ball", "B", "to get the ball"]
    assert data[0]["choices"] == ["(A) to hide", "(B) to get the ball", "(C) to open it", "(D) to meet his dad",
                                  "(E) to leave"]
    assert len(data[0]["choice_ids"]) == 5   # eval.py ranks each as the answer
    records, counts = convert(tmp_path, "nextqa", nextqa_mapping={"2440175990": "0000/2440175990"})
    assert counts["unknown_video_id"] == 1 and len(records) == 1
    records, _ = convert(tmp_path, "nextqa", nextqa_mapping=None)
    assert [Path(r["video"]).name for r in records] == ["2440175990.mp4", "3238737531.mp4"]
    headless = tmp_path / "train.csv"
    headless.write_text("video,question,answer\n1,why,0\n")
    with pytest.raises(SourceError, match="lacks column.s. qid, type, a0, a1, a2, a3, a4"):
        list(convert_records("nextqa", headless, Options(), Counter()))


def test_cli_nextqa_video_map(tmp_path):
    source = write_fixture(tmp_path, "nextqa")
    (tmp_path / "map.json").write_text(json.dumps(NEXTQA_MAPPING))
    (tmp_path / "media").mkdir()
    out = tmp_path / "converted" / "nextqa.jsonl"
    convert_data.main(["--format", "nextqa", "--input", str(source), "--video_map", str(tmp_path / "map.json"),
                       "--media_root", str(tmp_path / "media"), "--out", str(out)])
    assert [json.loads(line)["video"] for line in out.read_text().splitlines()] == \
           ["../media/0000/2440175990.mp4", "../media/1006/3238737531.mp4"]
    (tmp_path / "map.json").write_text('["0000/2440175990"]')
    with pytest.raises(SystemExit) as stop:
        convert_data.main(["--format", "nextqa", "--input", str(source), "--video_map", str(tmp_path / "map.json"),
                           "--out", str(out)])
    assert stop.value.code == \
           f"error: {tmp_path / 'map.json'}: expected a JSON object of video id → '<folder>/<video id>'"
    with pytest.raises(SystemExit):
        convert_data.parse_args(["--format", "msvd-qa", "--input", "x", "--out", "y", "--video_map", "m.json"])
