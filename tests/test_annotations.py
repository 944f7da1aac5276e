"""The annotation store: rows and line numbers as the old whole-file parse gave them, bad lines named by
file:line, the store reused while the file is unchanged and rebuilt when it changes, nothing per row held
in Python objects, and the seeded validation hold-out picking the records it always picked."""
import gc
import json
import os
import pickle
import types

import numpy as np
import pytest

import dataset.annotations as annotations
from conftest import ROOT
from dataset.annotations import AnnotationStore, store_folder
from dataset.vlm_dataset import ConversationDataset
from trainer.data import hold_out


def old_read_jsonl(path):
    """The loader the store replaced: every line parsed into a list at start-up."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows.append((n, record if isinstance(record, dict) else "line is not a JSON object"))
            except json.JSONDecodeError as e:
                rows.append((n, f"malformed JSON ({e.msg})"))
    return rows


def old_size_hints(rows):
    hints = []
    for _, record in rows:
        if not isinstance(record, dict):
            hints.append(0)
            continue
        turns = record.get("conversations") if isinstance(record.get("conversations"), list) else []
        text = sum(len(t.get("content", "")) for t in turns if isinstance(t, dict) and isinstance(t.get("content"), str))
        hints.append(text + 32 * sum(len([v] if isinstance(v, str) else v or []) for v in
                                     (record.get("image"), record.get("video"))))
    return hints


def sample(i, words=3):
    return {"id": f"s{i}", "video": f"videos/v{i % 7}.mp4", "conversations": [
        {"role": "user", "content": "<video>\nWhat is it, déjà vu? ✓"},
        {"role": "assistant", "content": " ".join(["word"] * words)}]}


MESSY = [json.dumps(sample(0)), "", "   ", '{"id": "x", "conversations": [', "[1, 2]", '"a string"',
         json.dumps({"image": ["a.png", "b.png"], "video": "videos/v0.mp4", "conversations": "not a list"}),
         json.dumps(sample(1, words=40)) + "\r", json.dumps({"id": "no media"}), json.dumps(sample(2))]


@pytest.fixture
def messy(tmp_path):
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(MESSY) + "\n", encoding="utf-8")
    return path


def write_rows(path, n):
    path.write_text("".join(json.dumps(sample(i, words=i % 50)) + "\n" for i in range(n)))
    return path


def test_rows_line_numbers_and_hints_equal_the_old_parse(messy):
    store, old = AnnotationStore(messy), old_read_jsonl(messy)
    assert [store.record(i) for i in range(len(store))] == old
    assert store.hints.tolist() == old_size_hints(old)
    assert store.media_keys() == {"videos/v0.mp4", "videos/v1.mp4", "videos/v2.mp4", "a.png", "b.png"}
    assert store.media_table()[:3] == [("video", "videos/v0.mp4"), ("image", "a.png"), ("image", "b.png")]


def test_bad_lines_are_reported_with_file_and_line(messy):
    data = ConversationDataset(messy, chat=None, num_frames=4, max_len=64)
    assert len(data) == 8
    assert data[1]["error"].startswith(f"{messy}:4: malformed JSON")
    assert data[2]["error"] == f"{messy}:5: line is not a JSON object"
    assert data[3]["error"] == f"{messy}:6: line is not a JSON object"
    odd = messy.with_name("odd.jsonl")   # a media field of the wrong type: the store builds, the sample is reported
    odd.write_text(json.dumps({"video": 5, "conversations": sample(0)["conversations"]}) + "\n")
    assert ConversationDataset(odd, chat=None, num_frames=4, max_len=64)[0]["error"] == \
        f"{odd}:1: 'video' must be a path or a list of paths, not int"
    latin = messy.with_name("latin.jsonl")   # not UTF-8: one reported row, where the text-mode reader stopped
    latin.write_bytes(json.dumps(sample(0)).encode() + b"\n" + '{"id": "caf\xe9"}'.encode("latin-1") + b"\n")
    data = ConversationDataset(latin, chat=None, num_frames=4, max_len=64)
    assert len(data) == 2 and data[1]["error"] == f"{latin}:2: line is not UTF-8 text"


def test_store_is_reused_while_the_file_is_unchanged_and_rebuilt_when_it_changes(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "data.jsonl", 5)
    builds = []
    real_build = annotations.build_store
    monkeypatch.setattr(annotations, "build_store", lambda *a: builds.append(a) or real_build(*a))
    assert len(AnnotationStore(path)) == 5 and len(builds) == 1
    assert len(AnnotationStore(path)) == 5 and len(builds) == 1   # reused
    with open(path, "a") as f:
        f.write(json.dumps(sample(99)) + "\n")
    store = AnnotationStore(path)
    assert len(builds) == 2 and len(store) == 6 and store.record(5)[1]["id"] == "s99"
    stat = os.stat(path)   # same size, new content and time: rebuilt too
    path.write_text(path.read_text().replace('"s99"', '"s98"'))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert AnnotationStore(path).record(5)[1]["id"] == "s98" and len(builds) == 3
    assert not [p for p in store.folder.parent.iterdir() if ".tmp" in p.name or ".old" in p.name]


def test_store_goes_under_the_cache_folder_when_asked(tmp_path):
    path = write_rows(tmp_path / "data.jsonl", 3)
    store = AnnotationStore(path, cache_dir=tmp_path / "cache")
    assert store.folder.parent == tmp_path / "cache" and store.folder == store_folder(path, tmp_path / "cache")
    assert not (tmp_path / ".data.jsonl.store").exists()


def test_nothing_per_row_lives_in_python_objects(tmp_path):
    def python_objects(root):
        seen, stack = set(), [root]
        while stack:
            obj = stack.pop()
            if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
                continue
            seen.add(id(obj))
            stack.extend(gc.get_referents(obj))
        return len(seen)

    small = ConversationDataset(write_rows(tmp_path / "small.jsonl", 10), chat=None, num_frames=4, max_len=64)
    large = ConversationDataset(write_rows(tmp_path / "large.jsonl", 3000), chat=None, num_frames=4, max_len=64)
    assert python_objects(large) == python_objects(small)
    assert isinstance(large.store.spans, np.memmap) and isinstance(large.store.hints, np.memmap)
    assert isinstance(large.rows, np.ndarray)


def test_a_pickled_store_maps_its_arrays_again(tmp_path):
    store = AnnotationStore(write_rows(tmp_path / "data.jsonl", 20))
    # What a spawned worker receives, rebuilt as unpickling would (no unpickler runs in this repo's tests).
    copy = AnnotationStore.__new__(AnnotationStore)
    copy.__setstate__(store.__getstate__())
    assert len(pickle.dumps(store)) < 500   # the path, not the arrays
    assert copy.record(7) == store.record(7) and isinstance(copy.hints, np.memmap)


def test_hold_out_picks_the_records_the_old_list_split_picked(tmp_path):
    data = ConversationDataset(write_rows(tmp_path / "data.jsonl", 257), chat=None, num_frames=4, max_len=64)
    old_rows = old_read_jsonl(data.path)
    for seed, val_samples in ((0, 16), (3, 1000), (7, 1)):
        order = np.random.default_rng(seed).permutation(len(old_rows))
        held = set(order[:min(val_samples, len(old_rows) // 10)].tolist())
        old_val = [r for i, r in enumerate(old_rows) if i in held]
        old_train = [r for i, r in enumerate(old_rows) if i not in held]
        train_rows, val_rows = hold_out(data.rows, seed, val_samples)
        assert [data.store.record(r) for r in train_rows] == old_train
        assert [data.store.record(r) for r in val_rows] == old_val
        data.rows = val_rows
        assert data.size_hints().tolist() == old_size_hints(old_val)
        assert data.media_keys() == {r["video"] for _, r in old_val}
        data.rows = np.arange(len(data.store))



def test_processes_opening_a_new_file_at_once_build_its_store_once(tmp_path):
    import subprocess, sys
    data = write_rows(tmp_path / "data.jsonl", 2000)
    code = ("import sys; from dataset.annotations import AnnotationStore; s = AnnotationStore(sys.argv[1]); "
            "print(len(s), s.record(1999)[0])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(data)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-500:] for _, err in results]
    assert [out.split() for out, _ in results] == [["2000", "2000"]] * 4
