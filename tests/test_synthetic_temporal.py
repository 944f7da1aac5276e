"""Tests for dataset/synthetic_temporal.py (and scripts/make_temporal.py): decodable clips, loadable records,
spans and counts that match the rendered pixels, conflicting pairs, held-out wordings and combos, determinism."""

import json
import re
from dataclasses import replace

import decord
import numpy as np
import pytest

import dataset.synthetic_temporal as st
from dataset.metrics import exact_match
from dataset.synthetic import COLOURS, SHAPES
from dataset.vlm_dataset import ConversationDataset
from make_temporal import parse_args
from model.chat import ChatEncoder

SEED, N_VIDEOS, N_TEST = 0, 12, 12
SETTINGS = st.Settings(fps=4, size=64, min_seconds=4, max_seconds=20, test_max_seconds=40)   # long enough for every action
SPLITS = ("pretrain", "sft_video", "test")
COLOUR_TOLERANCE = 50    # RGB distance after an H.264 round trip that still counts as "that colour"
MIN_OBJECT_PIXELS = 60   # the thin ring covers about 220 pixels at 64 px
OBJECT = re.compile(rf"the ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("temporal")
    settings = st.Settings(**{**SETTINGS.__dict__, "codec": st.pick_codec()})
    meta = st.generate(out, N_VIDEOS, N_TEST, SEED, settings, workers=2)
    held_out, train, test = st.plan_dataset(SEED, N_VIDEOS, N_TEST, settings)
    scenes = {v.scene.name: v.scene for v in train + test}
    return out, meta, held_out, scenes


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_frames(path):
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def scene_of(record, scenes):
    return scenes[record["video"].removeprefix("videos/").removesuffix(".mp4")]


def user_questions(record):
    return [t["content"].split("\n")[-1] for t in record["conversations"] if t["role"] == "user"]


def exact_mask(pixels, colour):
    return (pixels == np.array(COLOURS[colour], np.uint8)).all(axis=-1)


def centroids(masks):
    return np.array([np.argwhere(m).mean(axis=0) if m.any() else (np.nan, np.nan) for m in masks])


def test_videos_decode_with_their_frame_count_and_duration(suite):
    out, meta, _, scenes = suite
    videos = sorted((out / "videos").glob("*.mp4"))
    assert len(videos) == meta["counts"]["train_videos"] + meta["counts"]["test_videos"] == len(scenes)
    durations = {r["video"]: r["duration"] for split in SPLITS for r in read_jsonl(out / f"{split}.jsonl")}
    assert len(durations) == len(videos)
    for path in videos:
        reader = decord.VideoReader(str(path))
        scene = scenes[path.stem]
        assert len(reader) == scene.frames and reader[0].shape == (64, 64, 3)
        assert reader.get_avg_fps() == pytest.approx(SETTINGS.fps)
        assert durations[f"videos/{path.name}"] == pytest.approx(len(reader) / SETTINGS.fps)


def test_durations_stay_in_range_and_test_clips_run_longer(suite):
    out, _, _, scenes = suite
    train = [s.duration for name, s in scenes.items() if name.startswith("v")]
    test = [s.duration for name, s in scenes.items() if name.startswith("t")]
    originals = [s.duration for name, s in scenes.items() if name.startswith("v") and s.source is None]
    assert all(SETTINGS.min_seconds <= d <= SETTINGS.max_seconds for d in originals)
    assert all(d <= SETTINGS.max_seconds for d in train)
    assert all(d <= SETTINGS.test_max_seconds for d in test) and max(test) > SETTINGS.max_seconds


def test_every_record_loads_through_the_conversation_dataset(suite, tokenizer, frame_encoder):
    out = suite[0]
    chat = ChatEncoder(tokenizer, 2)
    for split in SPLITS:
        data = ConversationDataset(out / f"{split}.jsonl", chat, num_frames=4, max_len=8192,
                                   preprocess=frame_encoder.clip_inputs, for_generation=split == "test", strict=True)
        for i in range(len(data)):
            item = data[i]
            assert len(item["media"]) == 1
            if split == "test":
                assert item["duration"] > 0 and item["phrasing"] in ("seen", "held_out")


def test_records_carry_their_fields_and_each_category_is_tested(suite):
    out, meta, _, _ = suite
    for split in SPLITS:
        for record in read_jsonl(out / f"{split}.jsonl"):
            turns = record["conversations"]
            assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
            assert turns[0]["content"].startswith("<video>\n")
            assert sum(t["content"].count("<video>") for t in turns) == 1
            assert record["duration"] > 0
            assert ("subset" in record) == ("phrasing" in record) == (split == "test")
    test = read_jsonl(out / "test.jsonl")
    assert {r["category"] for r in test} == set(st.CATEGORIES)
    assert {r["subset"] for r in test} == {"seen", "novel_combo"}
    assert {r["phrasing"] for r in test} == {"seen", "held_out"}
    followups = [r for r in test if r["category"] == "followup"]
    assert followups and all(len(r["conversations"]) == 4 for r in followups)
    assert all(len(r["conversations"]) == 2 for r in test if r["category"] != "followup")
    assert meta["test_categories"] == {c: sum(r["category"] == c for r in test) for c in sorted(st.CATEGORIES)}


def test_two_way_test_questions_list_their_options_as_choices_in_the_order_asked(suite):
    out = suite[0]
    test = read_jsonl(out / "test.jsonl")
    offered = [r for r in test if "choices" in r]
    assert {r["id"].rsplit("-", 1)[-1] for r in offered} <= {"order_first", "speed", "reversed_direction",
                                                              "reversed_presence"}
    assert {r["id"].rsplit("-", 1)[-1] for r in test if r["id"].endswith(("-order_first", "-speed"))} \
        <= {r["id"].rsplit("-", 1)[-1] for r in offered}
    for record in offered:
        question, answer = record["conversations"][-2]["content"], record["conversations"][-1]["content"]
        assert answer in record["choices"] and len(record["choices"]) == 2
        if not record["category"] == "reversed":   # the options are named in the question, in that order
            assert question.index(record["choices"][0]) < question.index(record["choices"][1])
    assert not any("choices" in r for split in ("pretrain", "sft_video") for r in read_jsonl(out / f"{split}.jsonl"))


def span_frames(record, scene):
    start, end = record["span"]
    assert 0 <= start <= end <= (scene.frames - 1) / scene.fps
    assert (np.array(record["span"]) * 2).round(6).tolist() == (np.array(record["span"]) * 2).round().tolist()
    return round(start * scene.fps), round(end * scene.fps)


def asked_colour(record):
    return next(OBJECT.search(t["content"])[1] for t in record["conversations"] if OBJECT.search(t["content"]))


def test_grounding_spans_match_the_rendered_pixels(suite):
    """Visible exactly inside a visibility span; moving exactly inside a motion span (resting just outside)."""
    out, _, _, scenes = suite
    checked = {"visible": 0, "moving": 0}
    for record in read_jsonl(out / "test.jsonl"):
        if "span" not in record:
            continue
        scene = scene_of(record, scenes)
        first, last = span_frames(record, scene)
        masks = exact_mask(st.render_scene(scene, 64), asked_colour(record))
        form = record["id"].rsplit("-", 1)[-1]
        if form in ("grounding_visible", "needle_when", "followup_when"):
            shown = masks.any(axis=(1, 2))
            assert shown.tolist() == [first <= f <= last for f in range(scene.frames)], record["id"]
            decoded = read_frames(out / record["video"]).astype(np.float32)
            near = np.linalg.norm(decoded - np.array(COLOURS[asked_colour(record)]), axis=-1) < COLOUR_TOLERANCE
            assert ((near.sum(axis=(1, 2)) > MIN_OBJECT_PIXELS) == shown).all(), record["id"]
            checked["visible"] += 1
        else:
            path = centroids(masks[max(first - 1, 0):last + 2])
            moving = (np.abs(np.diff(path, axis=0)) > 1e-6).any(axis=1).tolist()
            expected = [first <= f < last for f in range(max(first - 1, 0), min(last + 1, scene.frames - 1))]
            assert moving == expected, record["id"]
            checked["moving"] += 1
    assert checked["visible"] and checked["moving"]


def direction_runs(values) -> list:
    signs = [int(s) for s in np.sign(np.round(np.diff(values), 6)) if s != 0]
    return [s for i, s in enumerate(signs) if i == 0 or s != signs[i - 1]]


def test_counts_match_the_rendered_repetitions(suite):
    out, _, _, scenes = suite
    checked = 0
    for record in read_jsonl(out / "test.jsonl"):
        if not record["id"].endswith("-count_repeats"):
            continue
        scene = scene_of(record, scenes)
        colour = asked_colour(record)
        kind = "bounce" if "bounce" in user_questions(record)[0] else "hop"
        event = next(e for e in scene.events if e.kind == kind and e.colour == colour)
        path = centroids(exact_mask(st.render_scene(scene, 64), colour)[event.start:event.end + 1])
        runs = direction_runs(path[:, 1] if kind == "bounce" else path[:, 0])
        rendered = len(runs) - 1 if kind == "bounce" else runs.count(-1)   # a hop is one run upwards
        assert str(rendered) == record["conversations"][-1]["content"], record["id"]
        checked += 1
    assert checked


def test_pair_members_are_their_originals_frames_reversed_or_every_second(suite):
    out, _, _, scenes = suite
    members = [s for s in scenes.values() if s.source is not None]
    assert {m.pair for m in members} == {"reversed", "sped_up"}
    for member in members:
        original = st.render_scene(member.source, 64)
        expected = original[::-1] if member.pair == "reversed" else original[::2]
        assert np.array_equal(st.render_scene(member, 64), expected), member.name
        decoded, decoded_original = read_frames(out / st.video_path(member)), read_frames(out / st.video_path(member.source))
        again = decoded_original[::-1] if member.pair == "reversed" else decoded_original[::2]
        assert np.abs(decoded.astype(int) - again.astype(int)).mean() < 3, member.name


def test_pair_questions_are_asked_alike_and_answered_differently(suite):
    out = suite[0]
    by_id = {r["id"]: r for r in read_jsonl(out / "test.jsonl")}
    pairs = 0
    for record_id, record in by_id.items():
        if record["category"] not in ("reversed", "speed_change") or "-rev-" in record_id or "-fast-" in record_id:
            continue
        name, form = record_id.rsplit("-", 1)
        twin = by_id[f"{name}-{'rev' if record['category'] == 'reversed' else 'fast'}-{form}"]
        assert user_questions(twin) == user_questions(record)
        assert twin["conversations"][-1]["content"] != record["conversations"][-1]["content"]
        pairs += 1
    assert pairs >= 2


def template_regex(template):
    return re.compile(".+".join(re.escape(part) for part in re.split(r"\{\w+\}", template)))


def test_held_out_phrasings_never_appear_in_training(suite):
    out = suite[0]
    held_out = [template_regex(t) for entry in st.PHRASINGS.values() for t in entry["held_out"]]
    for split in ("pretrain", "sft_video"):
        for record in read_jsonl(out / f"{split}.jsonl"):
            for question in user_questions(record):
                assert not any(p.fullmatch(question) for p in held_out), question
    test = read_jsonl(out / "test.jsonl")
    held_out_records = [r for r in test if r["phrasing"] == "held_out"]
    assert all(any(p.fullmatch(user_questions(r)[-1]) for p in held_out) for r in held_out_records)


CAPTION_EVENT = re.compile(r"(?:The|the) (\w+) (\w+) (appears|leaves|moves|bounces|hops|turns)")
VERB_ACTION = {"appears": "appear", "leaves": "leave", "moves": "move", "bounces": "bounce", "hops": "hop",
               "turns": "turn"}


def test_held_out_combos_never_appear_in_training(suite):
    out, meta, held_out, scenes = suite
    assert [list(c) for c in held_out] == meta["held_out"]
    seen_actions = set()
    for record in read_jsonl(out / "pretrain.jsonl"):
        for colour, shape, verb in CAPTION_EVENT.findall(record["conversations"][1]["content"]):
            combo = (colour, shape, VERB_ACTION[verb])
            assert combo not in set(held_out), record["id"]
            seen_actions.add(combo[2])
    assert seen_actions == set(st.ACTIONS)
    for record in read_jsonl(out / "test.jsonl"):
        novel = bool(st.scene_combos(scene_of(record, scenes)) & set(held_out))
        assert (record["subset"] == "novel_combo") == novel


def test_same_seed_gives_identical_files_and_pixels(suite, tmp_path):
    out, _, _, scenes = suite
    settings = st.Settings(**{**SETTINGS.__dict__, "codec": st.pick_codec()})
    st.generate(tmp_path, N_VIDEOS, N_TEST, SEED, settings, workers=1)
    for name in [f"{s}.jsonl" for s in SPLITS] + ["meta.json"]:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name
    for name in sorted(scenes):
        path = f"videos/{name}.mp4"
        assert np.array_equal(read_frames(out / path), read_frames(tmp_path / path)), name


def test_reversal_and_speed_up_keep_events_on_the_grid():
    settings = st.Settings(**{**SETTINGS.__dict__, "codec": "libx264"})
    for pair in ("reversed", "sped_up"):
        scene = st.make_scene("probe", st.item_rng(1, 99), settings, (8, 30), None, pair=pair)
        member = st.pair_member(scene)
        for event in scene.events + member.events:
            owner = scene if event in scene.events else member
            assert event.start % owner.grid == 0 and event.end % owner.grid == 0
        if pair == "reversed":
            twice = st.pair_member(replace_name(member, scene))
            assert twice.events == scene.events


def replace_name(member, scene):
    return replace(member, name=scene.name, source=None, pair="reversed")


BAD_ARGUMENTS = [["--n_videos", "0"], ["--n_videos", "2", "--size", "63"],
                 ["--n_videos", "2", "--min_seconds", "20", "--max_seconds", "10"],
                 ["--n_videos", "2", "--offset_share", "1.5"],
                 ["--n_videos", "2", "--offset_share", "0.5", "--max_seconds", "30", "--clock_max", "30"]]


@pytest.mark.parametrize("bad", BAD_ARGUMENTS)
def test_bad_arguments_are_rejected(tmp_path, bad):
    with pytest.raises(SystemExit) as error:
        parse_args(["--out", str(tmp_path), *bad])
    assert error.value.code == 2


def test_test_max_seconds_defaults_to_twice_the_training_maximum(tmp_path):
    args = parse_args(["--out", str(tmp_path), "--n_videos", "2", "--max_seconds", "30"])
    assert args.test_max_seconds == 60 and args.fps == 4 and args.size == 64 and args.min_seconds == 4
    assert args.offset_share == 0 and args.clock_max == 60   # windows, when asked for, end by the test's longest


def test_held_out_wordings_recombine_words_of_the_seen_ones():
    words = lambda text: set(re.findall(r"[a-z]+", text.lower()))  # noqa: E731
    seen = set().union(*(words(t) for form in st.PHRASINGS.values() for t in form["seen"]))
    for name, form in st.PHRASINGS.items():
        assert len(form["seen"]) >= 4 and len(form["held_out"]) >= 2, name
        assert not set(form["seen"]) & set(form["held_out"]), name
        for template in form["held_out"]:
            assert words(template) <= seen, (name, template, words(template) - seen)


def test_every_after_wording_frame_is_also_a_before_one():
    # A frame seen with one relation only would let the frame, not "after" / "before", decide the answer:
    # with "Before X, what happens?" alone, the held-out "Right after X, what happens?" was read as before.
    def frames(form, relation):
        return {t.lower().replace(relation, "REL") for t in st.PHRASINGS[form]["seen"]
                if relation in t.lower() and not re.search(r"\b(next|last)\b", t.lower())}
    after, before = frames("order_after", "after"), frames("order_before", "before")
    assert after == before and len(after) >= 5


def test_seen_wordings_only_choose_among_the_first_ones_and_change_nothing_else():
    settings = st.Settings(**{**SETTINGS.__dict__, "codec": "libx264"})
    _, train, test = st.plan_dataset(SEED, N_VIDEOS, N_TEST, settings)
    few, many = (st.build_splits(SEED, train, test, replace(settings, seen_wordings=n)) for n in (2, st.SEEN_WORDINGS))
    first_two = {t for form in st.PHRASINGS.values() for t in form["seen"][:2]}
    regexes = [template_regex(t) for t in first_two]
    texts = [turn["content"].replace("<video>\n", "") for r in few["sft_video"] for turn in r["conversations"]
             if turn["role"] == "user" and r["category"] != "caption"]
    asked = [t for t in texts if t not in st.CAPTION_PROMPTS]
    assert asked and all(any(rx.fullmatch(t) for rx in regexes) for t in asked)
    assert few["pretrain"] == many["pretrain"]
    for a, b in zip(few["sft_video"] + few["test"], many["sft_video"] + many["test"], strict=True):
        answers = lambda r: [t["content"] for t in r["conversations"] if t["role"] == "assistant"]  # noqa: E731
        assert a["id"] == b["id"] and answers(a) == answers(b)
    held_out = [(a, b) for a, b in zip(few["test"], many["test"]) if a["phrasing"] == "held_out"]
    assert held_out and sum(a == b for a, b in held_out) > len(held_out) // 2   # a follow-up's opener is a seen one


def test_more_order_questions_add_distinct_ones_and_leave_the_rest_alone():
    settings = st.Settings(**{**SETTINGS.__dict__, "codec": "libx264"})
    _, train, test = st.plan_dataset(SEED, N_VIDEOS, N_TEST, settings)
    one, three = st.build_splits(SEED, train, test, settings), st.build_splits(SEED, train, test, replace(settings, order_questions=3))
    assert one["test"] == three["test"] and one["pretrain"] == three["pretrain"]
    added = 0
    for plain, more in zip(one["sft_video"], three["sft_video"]):
        plain_counts, more_counts = st.tally(plain["_categories"]), st.tally(more["_categories"])
        added += more_counts.pop("order", 0) - plain_counts.pop("order", 0)
        assert more_counts == plain_counts
    assert added > 0
    for video in train:
        options = st.question_options(video.scene, np.random.default_rng(0))
        questions = st.training_questions(options, np.random.default_rng(1), 3)
        for form, candidates in options.items():
            chosen = [q for q in questions if q.form == form]
            wanted = min(3, len(candidates)) if st.PHRASINGS[form]["category"] == "order" else 1
            assert len(chosen) == wanted and all(q in candidates for q in chosen), form
            assert len({(q.form, tuple(q.fills.items()), q.answer) for q in chosen}) == wanted, form


def test_timeline_order_answers_tell_the_events_first_and_change_nothing_else():
    settings = st.Settings(**{**SETTINGS.__dict__, "codec": "libx264"})
    _, train, test = st.plan_dataset(SEED, N_VIDEOS, N_TEST, settings)
    plain, told = st.build_splits(SEED, train, test, replace(settings, order_answers="event")), st.build_splits(
        SEED, train, test, replace(settings, order_answers="timeline"))
    assert plain["pretrain"] == told["pretrain"]
    captions = {st.video_path(v.scene): st.caption(v.scene) for v in train + test}
    changed = 0
    for a, b in zip(plain["test"], told["test"], strict=True):
        answer, reasoned = a["conversations"][-1]["content"], b["conversations"][-1]["content"]
        if a["category"] == "order":
            assert reasoned == f"{captions[a['video']]} Answer: {answer}." and exact_match(answer, [reasoned])
            changed += 1
        else:   # followups included: their openers stay bare, so no test question is asked with the timeline told
            assert a == b
        assert a["conversations"][:-1] == b["conversations"][:-1]
    assert changed > 0
    for record in told["sft_video"]:
        answers = [t["content"] for t in record["conversations"][1::2]]
        told_at = [i for i, text in enumerate(answers) if text.startswith(captions[record["video"]])]
        assert told_at == list(range(len(answers) - len(told_at), len(answers))), record["id"]   # all at the end
        for text in answers[:len(answers) - len(told_at)]:
            assert st.ANSWER_MARKER not in text


def test_restated_order_answers_repeat_the_anchor_first_and_change_nothing_else():
    settings = st.Settings(**{**SETTINGS.__dict__, "codec": "libx264"})
    _, train, test = st.plan_dataset(SEED, N_VIDEOS, N_TEST, settings)
    plain, restated = st.build_splits(SEED, train, test, replace(settings, order_answers="event")), st.build_splits(
        SEED, train, test, settings)   # restated: the default
    assert plain["pretrain"] == restated["pretrain"]
    changed = 0
    for a, b in zip(plain["test"] + plain["sft_video"], restated["test"] + restated["sft_video"], strict=True):
        assert a["conversations"][0::2] == b["conversations"][0::2]   # the same questions, in the same order
        for question, answer, said in zip(a["conversations"][0::2], a["conversations"][1::2], b["conversations"][1::2]):
            if said != answer:   # an order question about an anchor event (a followup's opener too)
                relation, anchor, event = re.fullmatch(r"(after|before) (the .+)\. Answer: (.+)\.", said["content"]).groups()
                assert anchor in question["content"] and event == answer["content"]
                assert (relation == "before") == ("before" in question["content"].lower())
                assert exact_match(answer["content"], [said["content"]])
                changed += 1
            else:
                assert st.ANSWER_MARKER not in said["content"]
    assert changed > 0


def test_some_training_conversations_also_ask_for_the_caption(suite):
    out, meta, _, _ = suite
    captions = {r["video"]: r["conversations"][1]["content"] for r in read_jsonl(out / "pretrain.jsonl")}
    described = 0
    for record in read_jsonl(out / "sft_video.jsonl"):
        turns = record["conversations"]
        asked = [i for i in range(0, len(turns), 2) if turns[i]["content"].split("\n")[-1] in st.CAPTION_PROMPTS]
        assert len(asked) <= 1
        if asked:
            assert turns[asked[0] + 1]["content"] == captions[record["video"]]
            described += 1
    assert 0 < described < len(captions) and meta["sft_questions_by_category"]["caption"] == described


def test_windows_move_every_time_of_a_training_text_by_the_records_offset_and_leave_the_test_alone():
    settings = st.Settings(**{**SETTINGS.__dict__, "codec": "libx264"})
    _, train, test = st.plan_dataset(SEED, N_VIDEOS, N_TEST, settings)
    plain = st.build_splits(SEED, train, test, settings)
    windowed = st.build_splits(SEED, train, test, replace(settings, offset_share=1.0, clock_max=50.0))
    assert windowed["test"] == plain["test"] and not any("time_offset" in r for r in plain["pretrain"] + plain["sft_video"])
    time = re.compile(r"(\d+\.\d) s\b")
    for a, b in zip(plain["pretrain"] + plain["sft_video"], windowed["pretrain"] + windowed["sft_video"], strict=True):
        offset = b.get("time_offset", 0.0)
        assert offset == int(offset) and offset + b["duration"] <= 50.0
        assert offset >= 1 or b["duration"] > 49.0   # every clip that fits a window gets one at share 1
        shifted = [{**t, "content": time.sub(lambda m: f"{float(m.group(1)) + offset:.1f} s", t["content"])}
                   for t in a["conversations"]]
        assert {k: v for k, v in b.items() if k != "time_offset"} == {**a, "conversations": shifted}
    assert any(b.get("time_offset", 0) > 0 for b in windowed["sft_video"])
