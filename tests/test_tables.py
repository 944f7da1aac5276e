"""Parquet files and Hugging Face dataset folders as --data_path: rows mapped to our schema (ShareGPT turns,
"messages", JSON-string conversations, nulls dropped), bad rows named by file:row, the store reused and rebuilt."""
import json

import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from dataset.annotations import AnnotationStore  # noqa: E402
from dataset.tables import TableError, to_record  # noqa: E402
from dataset.vlm_dataset import ConversationDataset  # noqa: E402

OURS = {"id": "a", "video": "videos/v0.mp4", "category": "colour",
        "conversations": [{"role": "user", "content": "<video>\nWhat colour?"}, {"role": "assistant", "content": "red"}]}
SHAREGPT = {"id": "b", "video": "videos/v1.mp4",
            "conversations": [{"from": "human", "value": "<video>\nDescribe it."}, {"from": "gpt", "value": "A circle."}]}
EXPECTED = [OURS, {"id": "b", "video": "videos/v1.mp4", "conversations": [
    {"role": "user", "content": "<video>\nDescribe it."}, {"role": "assistant", "content": "A circle."}]}]


def test_rows_map_to_our_schema():
    assert to_record({**OURS, "extra": 3, "span": None}) == OURS
    assert to_record(SHAREGPT) == EXPECTED[1]
    assert to_record({"messages": OURS["conversations"], "image": ["a.png"]}) == \
        {"image": ["a.png"], "conversations": OURS["conversations"]}
    assert to_record({"conversations": json.dumps(OURS["conversations"])}) == {"conversations": OURS["conversations"]}


def test_a_parquet_file_reads_as_its_rows(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([OURS, SHAREGPT, {"id": "c", "conversations": []}]), path)
    store = AnnotationStore(path)
    # Struct columns give every turn both shapes' fields; the nulls are dropped.
    assert [store.record(i) for i in range(2)] == [(1, EXPECTED[0]), (2, EXPECTED[1])]
    assert store.media_keys() == {"videos/v0.mp4", "videos/v1.mp4"}
    data = ConversationDataset(path, chat=None, num_frames=4, max_len=64)
    assert len(data) == 3 and data[2]["error"] == f"{path}:3: 'conversations' must be a non-empty list"
    assert store.folder == tmp_path / ".train.parquet.store"
    pq.write_table(pa.Table.from_pylist([SHAREGPT]), path)   # rewritten: the store follows
    assert [AnnotationStore(path).record(0)] == [(1, EXPECTED[1])]


def test_a_save_to_disk_folder_reads_as_its_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hf_train"
    datasets.Dataset.from_list([OURS, SHAREGPT] * 3).save_to_disk(str(folder))
    store = AnnotationStore(folder)
    assert len(store) == 6 and [store.record(i)[1] for i in range(2)] == EXPECTED
    assert store.hints.tolist()[:2] == [len("<video>\nWhat colour?red") + 32, len("<video>\nDescribe it.A circle.") + 32]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([OURS])}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(TableError, match="a DatasetDict folder; give one split's folder"):
        AnnotationStore(tmp_path / "splits")
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(TableError, match="not a Hugging Face dataset folder"):
        AnnotationStore(tmp_path / "not_a_dataset")


def test_training_on_the_parquet_of_a_jsonl_logs_the_same_losses(tmp_path, synthetic, fresh_flags, train):
    from conftest import read_log
    lines = (synthetic / "sft_video.jsonl").read_text().splitlines()[:24]
    (tmp_path / "data.jsonl").write_text("".join(line + "\n" for line in lines))
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in lines]), tmp_path / "data.parquet")
    losses = {}
    for name in ("data.jsonl", "data.parquet"):
        out = tmp_path / name.replace(".", "_")
        result = train("train_sft.py", "--stage=video", f"--data_path={tmp_path / name}", f"--media_root={synthetic}",
                       f"--out_dir={out}", *fresh_flags)
        assert result.returncode == 0, result.stderr
        losses[name] = [row["loss"] for row in read_log(out / "logs" / "sft_video_32.jsonl")]
    assert len(losses["data.jsonl"]) == 3 and losses["data.parquet"] == losses["data.jsonl"]
