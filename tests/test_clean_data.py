"""clean_data.py: each drop reason, media check levels, path relocation, report."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clean_data
from clean_data import script_shares
from conftest import run_python
from dataset.vlm_dataset import ConversationDataset
from model.chat import ChatEncoder


def sample(rid, question="<video>\nWhat colour is the square?", answer="It is red.", **media):
    media = media or {"video": "videos/good.mp4"}
    return {"id": rid, **media, "conversations": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}]}


# (line, the reason it is dropped or None if kept)
LINES = [
    (sample("good"), None),
    (sample("good"), "duplicate"),
    (sample("other_question", question="<video>\nWhat shape is it?", answer="A square."), None),
    (sample("image", question="<image>\nWhat is this?", answer="A red square.", image="images/good.png"), None),
    ({"id": "text_only", "conversations": [{"role": "user", "content": "Say hello."},
                                           {"role": "assistant", "content": "Hello."}]}, None),
    (sample("missing", video="videos/nope.mp4"), "media_missing"),
    (sample("zero_bytes", video="videos/empty.mp4"), "media_unreadable"),
    (sample("text_as_mp4", video="videos/notes.mp4"), "media_unreadable"),
    (sample("text_as_png", question="<image>\nWhat is this?", image="images/fake.png"), "media_unreadable"),
    ('{"id": "broken", "conversations": [', "malformed_json"),
    ({"id": "swapped", "video": "videos/good.mp4", "conversations": [
        {"role": "assistant", "content": "<video>red"}, {"role": "user", "content": "What colour?"}]}, "bad_turns"),
    (sample("two_markers", question="<video>\n<video>\nSame clip twice?"), "marker_mismatch"),
    (sample("empty", question="<video>", answer=" "), "too_short"),
    (sample("long", answer="red " * 100), "too_long"),
    (sample("chinese", question="<video>\n这个正方形是什么颜色？", answer="红色。"), "wrong_language"),
]


def make_mp4(path: Path):
    from dataset.synthetic import pick_codec, write_mp4
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    frames[:, :16] = 220
    write_mp4(path, frames, 4, pick_codec())


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    (tmp_path / "videos").mkdir()
    (tmp_path / "images").mkdir()
    make_mp4(tmp_path / "videos" / "good.mp4")
    (tmp_path / "videos" / "empty.mp4").write_bytes(b"")
    (tmp_path / "videos" / "notes.mp4").write_text("these are my notes, not a video\n")
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "images" / "good.png")
    (tmp_path / "images" / "fake.png").write_text("not a png")
    lines = [line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line, _ in LINES]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def clean(folder, *flags, out=None, capsys=None):
    """Run the cleaner in-process (or as a subprocess without capsys) → (stdout, kept ids)."""
    out = out or folder / "clean.jsonl"
    argv = ["--data", folder / "data.jsonl", "--out", out, *flags]
    if capsys is None:
        result = run_python("scripts/clean_data.py", *argv)
        assert result.returncode == 0, result.stderr
        stdout = result.stdout
    else:
        clean_data.main([str(a) for a in argv])
        stdout = capsys.readouterr().out
    kept = [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()]
    return stdout, kept


def table(stdout) -> dict:
    rows = [line.split() for line in stdout.splitlines() if line and not line.startswith(" ")]
    return {name: int(n) for name, n in rows}


def test_each_bad_record_is_dropped_for_its_reason(dataset_dir):
    report = dataset_dir / "report.json"
    stdout, kept = clean(dataset_dir, "--lang", "en", "--max_chars", "200", "--workers", "2",
                         "--report", report)
    assert kept == [line["id"] for line, reason in LINES if reason is None]
    expected = {}
    for _, reason in LINES:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert table(stdout) == {"read": len(LINES), "kept": len(kept), **expected}
    summary = json.loads(report.read_text())
    assert summary["read"] == len(LINES) and summary["kept"] == len(kept) and summary["dropped"] == expected
    assert summary["examples"]["malformed_json"] == ["line 10: malformed JSON (Expecting value)"]
    assert any("empty file" in e for e in summary["examples"]["media_unreadable"])


def test_media_check_levels(dataset_dir, capsys):
    _, kept = clean(dataset_dir, "--check_media", "exists", "--workers", "1", capsys=capsys)
    assert "text_as_mp4" in kept and "text_as_png" in kept           # non-empty files pass "exists"
    assert "zero_bytes" not in kept and "missing" not in kept
    _, kept = clean(dataset_dir, "--check_media", "decode", "--workers", "1", capsys=capsys)
    assert not {"text_as_mp4", "text_as_png", "zero_bytes", "missing"} & set(kept) and "good" in kept
    _, kept = clean(dataset_dir, "--check_media", "none", capsys=capsys)
    assert {"text_as_mp4", "zero_bytes", "missing"} <= set(kept)


def test_language_filter_keeps_the_chosen_script(dataset_dir, capsys):
    _, kept = clean(dataset_dir, "--lang", "zh", "--check_media", "none", capsys=capsys)
    assert "chinese" in kept and "good" not in kept and "text_only" not in kept


def test_token_limit_counts_visual_slots(dataset_dir, tokenizer_dir, tokenizer, capsys):
    chat = ChatEncoder(tokenizer, 8)
    good_tokens = len(chat.encode(LINES[0][0]["conversations"])[0])
    _, kept = clean(dataset_dir, "--check_media", "none", "--tokenizer", tokenizer_dir,
                    "--num_visual_tokens", "8", "--max_tokens", str(good_tokens), capsys=capsys)
    assert "good" in kept and "long" not in kept
    stdout, kept = clean(dataset_dir, "--check_media", "none", "--tokenizer", tokenizer_dir,
                         "--num_visual_tokens", "9", "--max_tokens", str(good_tokens), capsys=capsys)
    assert "good" not in kept and table(stdout)["too_many_tokens"] >= 2


def test_output_elsewhere_rewrites_paths_so_the_loader_finds_the_media(dataset_dir, tokenizer, frame_encoder,
                                                                      capsys):
    out = dataset_dir / "cleaned" / "sub" / "clean.jsonl"
    clean(dataset_dir, "--workers", "1", out=out, capsys=capsys)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["video"] == "../../videos/good.mp4"
    data = ConversationDataset(out, ChatEncoder(tokenizer, 2), num_frames=4, max_len=512,
                               preprocess=frame_encoder.clip_inputs)
    assert all("error" not in data[i] for i in range(len(data)))


def test_missing_input_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as stop:
        clean_data.main(["--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o.jsonl")])
    assert stop.value.code == f"error: {tmp_path / 'nope.jsonl'}: no such file"


def test_script_shares_count_han_characters_and_latin_words():
    shares = script_shares("这是一个 YouTube 视频")
    assert shares["zh"] == pytest.approx(6 / 7) and shares["en"] == pytest.approx(1 / 7)
    assert script_shares("A red square moves left.") == {"zh": 0.0, "en": 1.0, "other": 0.0}
    assert script_shares("Привет world")["other"] == pytest.approx(6 / 7)
    assert script_shares("42 !") == {}
