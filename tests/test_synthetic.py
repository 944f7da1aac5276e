"""Tests for dataset/synthetic.py (and scripts/make_synthetic.py): decodable videos, jsonl schema, held-out combos, pixels."""

import json
import re

import decord
import numpy as np
import pytest

import dataset.synthetic as ms
from make_synthetic import parse_args

SIZE, FRAMES, N_VIDEOS, SEED = 64, 16, 12, 7
SPLITS = ("pretrain", "sft_image", "sft_video", "test")
COLOUR_TOLERANCE = 50  # max RGB distance after an H.264 round trip that still counts as "that colour"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    meta = ms.generate(out, n_videos=N_VIDEOS, seed=SEED, size=SIZE, frames=FRAMES, workers=2)
    return out, meta


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_frames(path):
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def colour_mask(frames, colour):
    distance = np.linalg.norm(frames.astype(np.float32) - np.array(ms.COLOURS[colour], np.float32), axis=-1)
    return distance < COLOUR_TOLERANCE


def template_regex(template):
    """A template as a full-match regex, one named group per placeholder."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(part) if i % 2 == 0 else rf"(?P<{part}>\w+(?: \w+)?)"
                              for i, part in enumerate(parts)))


def parse_question(text, phrasings=("seen", "held_out")):
    """(form, phrasing, fills) of every template a question text (marker stripped) is a wording of."""
    found = []
    for form, entry in ms.PHRASINGS.items():
        for phrasing in phrasings:
            for template in entry[phrasing]:
                if m := template_regex(template).fullmatch(text):
                    found.append((form, phrasing, m.groupdict()))
    return found


def user_texts(record):
    return [t["content"].split("\n")[-1] for t in record["conversations"] if t["role"] == "user"]


def direction_object(question):
    """(colour, shape) a direction question asks about."""
    (form, _, fills), = parse_question(question.split("\n")[-1])
    assert form == "direction", question
    return tuple(fills["object"].split())


def caption_objects(caption):
    """(colour, shape, motion) of every object a canonical video caption names."""
    thing = r"an? (\w+) (\w+)"
    action = r"(?:moves (\w+)|stays (still))"
    if m := re.fullmatch(rf"{thing} {action}\.", caption, re.I):
        return [(m[1], m[2], m[3] or m[4])]
    if m := re.fullmatch(rf"{thing} {action}\. {thing} (?:appears|leaves)\.", caption, re.I):
        return [(m[1], m[2], m[3] or m[4]), (m[5], m[6], "still")]
    if m := re.fullmatch(rf"{thing} moves (\w+), then {thing} moves (\w+)\.", caption, re.I):
        return [(m[1], m[2], m[3]), (m[4], m[5], m[6])]
    raise AssertionError(f"not a canonical caption: {caption!r}")


def test_every_video_decodes_with_expected_frames_and_size(dataset):
    out, meta = dataset
    videos = sorted((out / "videos").glob("*.mp4"))
    assert len(videos) == meta["counts"]["train_videos"] + meta["counts"]["test_videos"]
    for path in videos:
        reader = decord.VideoReader(str(path))
        assert len(reader) == FRAMES
        assert reader[0].shape == (SIZE, SIZE, 3)


def test_jsonl_schema_markers_and_media(dataset):
    out, _ = dataset
    for split in SPLITS:
        records = read_jsonl(out / f"{split}.jsonl")
        assert records
        for record in records:
            media_keys = [k for k in ("video", "image") if k in record]
            assert len(media_keys) == 1
            media_key = media_keys[0]
            assert (out / record[media_key]).is_file()
            turns = record["conversations"]
            assert len(turns) >= 2 and len(turns) % 2 == 0
            assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
            text = "".join(t["content"] for t in turns)
            marker = f"<{media_key}>"
            assert text.count("<video>") + text.count("<image>") == 1
            assert turns[0]["content"].startswith(marker + "\n")
            expected_category = "multi" if len(turns) > 2 else record["category"]
            assert record["category"] == expected_category
            assert ("subset" in record) == (split == "test")


def test_held_out_combos_cover_every_value_and_pair():
    held_out = ms.choose_held_out(SEED)
    assert len(held_out) == 12 and held_out == ms.choose_held_out(SEED)
    remaining = [c for c in ms.all_combos() if c not in held_out]
    assert ms.held_out_is_learnable(held_out, remaining)


def test_training_videos_never_use_held_out_combos(dataset):
    out, meta = dataset
    held_out = {tuple(c) for c in meta["held_out"]}
    captions = [r["conversations"][1]["content"] for r in read_jsonl(out / "pretrain.jsonl") if "video" in r]
    assert len(captions) == N_VIDEOS
    for caption in captions:
        for combo in caption_objects(caption):
            assert combo not in held_out, caption


def test_test_split_has_both_subsets_all_categories_and_fresh_videos(dataset):
    out, meta = dataset
    held_out = {tuple(c) for c in meta["held_out"]}
    records = read_jsonl(out / "test.jsonl")
    assert {r["subset"] for r in records} == {"novel_combo", "standard"}
    assert {r["category"] for r in records} == set(ms.TEST_CATEGORY_ORDER)
    assert all(r["video"].startswith("videos/t") for r in records)
    captions = [r for r in records if r["category"] == "caption"]
    assert all(parse_question(user_texts(r)[0])[0][0] == "video_caption" for r in captions)
    for record in records:
        if record["category"] != "direction":
            continue
        primary = (*direction_object(record["conversations"][0]["content"]), record["conversations"][1]["content"])
        assert (primary in held_out) == (record["subset"] == "novel_combo")


def test_same_seed_gives_identical_text_files(dataset, tmp_path):
    out, _ = dataset
    ms.generate(tmp_path, n_videos=N_VIDEOS, seed=SEED, size=SIZE, frames=FRAMES, workers=1)
    for name in [f"{s}.jsonl" for s in SPLITS] + ["meta.json"]:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def write_scene(tmp_path, kind, primary, second=None, first_mover=None):
    rng = ms.item_rng(0, 99)
    objects = ms.place_objects(rng, kind, primary, second, SIZE, FRAMES, first_mover)
    scene = ms.VideoScene("probe", kind, objects, first_mover)
    path = tmp_path / "probe.mp4"
    ms.write_media((scene, path, ms.RenderSettings(SIZE, FRAMES, 8, ms.pick_codec())))
    return read_frames(path)


def test_right_moving_object_centroid_increases(tmp_path):
    frames = write_scene(tmp_path, "single", ("red", "circle", "right"))
    masks = colour_mask(frames, "red")
    assert all(mask.sum() > 50 for mask in masks)
    centroid_x = [np.nonzero(mask)[1].mean() for mask in masks]
    assert all(b > a for a, b in zip(centroid_x, centroid_x[1:]))
    assert centroid_x[-1] - centroid_x[0] > 0.5 * SIZE


def test_appearing_object_only_in_second_half(tmp_path):
    frames = write_scene(tmp_path, "appear", ("red", "circle", "still"), ("green", "square", "still"))
    green_pixels = colour_mask(frames, "green").sum(axis=(1, 2))
    red_pixels = colour_mask(frames, "red").sum(axis=(1, 2))
    half = FRAMES // 2
    assert (green_pixels[:half] == 0).all() and (green_pixels[half:] > 50).all()
    assert (red_pixels > 50).all()


def test_generated_test_videos_move_as_their_answers_say(dataset):
    out, _ = dataset
    direction_lines = [r for r in read_jsonl(out / "test.jsonl") if r["category"] == "direction"]
    for record in direction_lines:
        colour = direction_object(record["conversations"][0]["content"])[0]
        motion = record["conversations"][1]["content"]
        ys, xs = zip(*(np.nonzero(m) for m in colour_mask(read_frames(out / record["video"]), colour)))
        dx, dy = xs[-1].mean() - xs[0].mean(), ys[-1].mean() - ys[0].mean()
        expected = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1), "still": (0, 0)}[motion]
        assert np.sign(round(dx / 4)) == expected[0] and np.sign(round(dy / 4)) == expected[1], (record["id"], dx, dy)


def test_left_and_right_visit_the_same_positions_in_reverse():
    right = ms.SceneObject("red", "circle", "right", *ms.motion_endpoints("right", 30.0, SIZE), (0, 15), (0, 15))
    left = ms.SceneObject("red", "circle", "left", *ms.motion_endpoints("left", 30.0, SIZE), (0, 15), (0, 15))
    path_right = [right.centre_at(f) for f in range(FRAMES)]
    path_left = [left.centre_at(f) for f in range(FRAMES)]
    assert path_right == path_left[::-1]


BAD_ARGUMENTS = [["--n_videos", "0"], ["--n_videos", "2", "--size", "63"], ["--n_videos", "2", "--frames", "2"]]


@pytest.mark.parametrize("bad", BAD_ARGUMENTS)
def test_bad_arguments_are_rejected(tmp_path, bad):
    with pytest.raises(SystemExit) as error:
        parse_args(["--out", str(tmp_path), *bad])
    assert error.value.code == 2


def test_ring_is_hollow_and_round():
    xs, ys = ms.pixel_grid(64)
    ring = ms.shape_mask("ring", (32.0, 32.0), 40.0, xs, ys)
    assert not ring[32, 32] and ring[32, 32 + 18] and ring[32 + 18, 32]   # hole in the middle, rim at 18 px
    assert not ring[32, 32 + 21] and not ring[13, 13]                     # nothing outside the circle
    disc = ms.shape_mask("circle", (32.0, 32.0), 40.0, xs, ys)
    assert (ring & ~disc).sum() == 0 and abs(ring.sum() / disc.sum() - (1 - ms.RING_INNER ** 2)) < 0.05


def test_training_draws_sequence_videos_more_often_and_test_does_not():
    _, train, test, _ = ms.make_all_scenes(seed=3, n_videos=2000, n_images=0, n_test=2000, size=64, frames=8)
    share = lambda scenes: sum(s.kind == "sequence" for s in scenes) / len(scenes)  # noqa: E731
    standard = [s for s in test if s.subset == "standard"]
    weights = ms.TRAIN_KIND_WEIGHTS
    assert weights["sequence"] > weights["single"]
    assert abs(share(train) - weights["sequence"] / sum(weights.values())) < 0.04
    assert abs(share(standard) - 1 / 4) < 0.04   # uniform over the four kinds


def test_two_object_images_bind_colour_to_shape_in_pixels_and_text(tmp_path):
    """Two-object images: distinct colours and shapes at opposite sides, both named in the caption,
    the questions ask about the first, and the pixels show each colour on its own side."""
    _, _, _, images = ms.make_all_scenes(seed=5, n_videos=1, n_images=400, n_test=1, size=64, frames=8)
    pairs = [s for s in images if len(s.objects) == 2]
    assert abs(len(pairs) / len(images) - ms.TWO_OBJECT_IMAGE_FRACTION) < 0.08
    for scene in pairs[:40]:
        first, second = scene.objects
        assert first.colour != second.colour and first.shape != second.shape
        assert (first.position, second.position) in ms.OPPOSITE_POSITIONS + tuple(p[::-1] for p in ms.OPPOSITE_POSITIONS)
        qa = {question.category: question.answer for question in ms.image_questions(scene)}
        assert qa["colour"] == first.colour and qa["shape"] == first.shape and qa["count"] == "two"
        assert f"{first.colour} {first.shape}" in qa["caption"] and f"{second.colour} {second.shape}" in qa["caption"]
        pixels = ms.render_image(scene, 64)
        for obj in scene.objects:
            mask = colour_mask(pixels[None], obj.colour)[0]
            ys, xs = np.nonzero(mask)
            assert abs(xs.mean() - obj.centre[0]) < 8 and abs(ys.mean() - obj.centre[1]) < 8


def test_sequence_training_asks_about_both_movers_and_the_test_about_the_first_only(dataset):
    out, _ = dataset
    captions = {}
    for record in read_jsonl(out / "pretrain.jsonl"):
        if "video" in record:
            captions[record["video"]] = record["conversations"][1]["content"]
    checked = 0
    for record in read_jsonl(out / "sft_video.jsonl"):
        objects = caption_objects(captions[record["video"]])
        turns = record["conversations"]
        asked = {(direction_object(q["content"]), a["content"]) for q, a in zip(turns[::2], turns[1::2])
                 if a["content"] in ms.MOTIONS}
        expected = {((c, s), m) for c, s, m in objects}
        if ", then" in captions[record["video"]]:
            assert asked == expected, record["id"]   # both objects' directions, each bound to its object
            checked += 1
        else:
            assert len(asked) == 1, record["id"]
    assert checked > 0
    for record in read_jsonl(out / "test.jsonl"):
        assert len(record["conversations"]) == 2


# ---------------------------------------------------------------- question wordings


def test_every_question_kind_has_four_seen_and_two_held_out_distinct_wordings():
    assert {entry["category"] for entry in ms.PHRASINGS.values()} == set(ms.TEST_CATEGORY_ORDER) | {"position"}
    templates = [t for entry in ms.PHRASINGS.values() for phrasing in ("seen", "held_out") for t in entry[phrasing]]
    for form, entry in ms.PHRASINGS.items():
        seen = 3 if form in ms.CAPTION_FORMS else 4   # the captions keep the three prompts they always had
        assert len(entry["seen"]) == seen and len(entry["held_out"]) == 2, form
    assert len(set(templates)) == len(templates) - 1   # "Give a short caption." serves both caption forms
    for form, entry in ms.PHRASINGS.items():   # a wording tells its own form and set, never another's
        for phrasing in ("seen", "held_out"):
            for template in entry[phrasing]:
                fills = {name: "red circle" if name == "object" else "x" for name in
                         re.findall(r"\{(\w+)\}", template)}
                matches = {(f, p) for f, p, _ in parse_question(template.format(**fills))}
                assert {p for _, p in matches} == {phrasing}, template
                assert form in {f for f, _ in matches}, template


def test_held_out_wordings_recombine_words_of_the_seen_ones():
    words = lambda text: set(re.findall(r"[a-z]+", text.lower()))  # noqa: E731
    seen = set().union(*(words(t) for entry in ms.PHRASINGS.values() for t in entry["seen"]))
    for form, entry in ms.PHRASINGS.items():
        for template in entry["held_out"]:
            assert words(template) <= seen, (form, template, words(template) - seen)


def test_training_files_use_seen_wordings_only(dataset):
    out, _ = dataset
    for split in ("pretrain", "sft_image", "sft_video"):
        for record in read_jsonl(out / f"{split}.jsonl"):
            assert "phrasing" not in record
            for text in user_texts(record):
                found = parse_question(text)
                assert found and all(phrasing == "seen" for _, phrasing, _ in found), (split, record["id"], text)


def test_held_out_wordings_never_appear_in_training(dataset):
    out, _ = dataset
    training_text = "\n".join(text for split in ("pretrain", "sft_image", "sft_video")
                              for record in read_jsonl(out / f"{split}.jsonl") for text in user_texts(record))
    for entry in ms.PHRASINGS.values():
        for template in entry["held_out"]:
            regex = template_regex(template)
            assert not any(regex.fullmatch(line) for line in training_text.splitlines()), template
    held_out_texts = {text for record in read_jsonl(out / "test.jsonl") if record["phrasing"] == "held_out"
                      for text in user_texts(record)}
    assert held_out_texts and not held_out_texts & set(training_text.splitlines())


def test_test_records_carry_their_phrasing_and_both_sets_occur(dataset):
    out, meta = dataset
    records = read_jsonl(out / "test.jsonl")
    assert {r["phrasing"] for r in records} == {"seen", "held_out"}
    for record in records:
        (text,) = user_texts(record)
        found = parse_question(text)
        assert found and {phrasing for _, phrasing, _ in found} == {record["phrasing"]}, (record["id"], text)
        assert record["category"] in {ms.PHRASINGS[form]["category"] for form, _, _ in found}
    assert meta["test_phrasing"] == {k: sum(r["phrasing"] == k for r in records) for k in ("seen", "held_out")}
    assert meta["phrasings"] == ms.PHRASINGS
    _, _, test, _ = ms.make_all_scenes(seed=3, n_videos=0, n_images=0, n_test=300, size=64, frames=8)
    many = ms.build_splits(3, [], test, [])["test"]
    assert abs(sum(r["phrasing"] == "held_out" for r in many) / len(many) - ms.HELD_OUT_PHRASING_PROBABILITY) < 0.04


def test_the_answer_does_not_depend_on_the_wording(dataset):
    """Every wording of a question, seen or held out, carries the same category and answer; and each test
    record's answer is its scene's answer to that kind of question, whichever wording it got."""
    out, _ = dataset
    _, train, test, images = ms.make_all_scenes(SEED, N_VIDEOS, N_VIDEOS, 60, SIZE, FRAMES)
    questions = [q for s in train for q in ms.video_questions(s) + ms.second_mover_questions(s)]
    questions += [q for s in images for q in ms.image_questions(s)]
    for question in questions + [q for s in test for q in ms.video_questions(s)]:
        for phrasing in ("seen", "held_out"):
            drawn = {ms.worded(np.random.default_rng(i), question, phrasing) for i in range(40)}
            assert {(c, a) for c, _, a in drawn} == {(question.category, question.answer)}
            assert {t for _, t, _ in drawn} == {t.format(**question.fills) for t in ms.PHRASINGS[question.form][phrasing]}
    answers = {(s.name, q.category): q.answer for s in test for q in ms.video_questions(s)}
    records = read_jsonl(out / "test.jsonl")
    assert len(records) == len(answers)
    for record in records:
        key = (record["video"].removeprefix("videos/").removesuffix(".mp4"), record["category"])
        assert record["conversations"][1]["content"] == answers[key], record["id"]
