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


def test_a_row_whose_kept_column_json_cannot_hold_is_reported_by_row(tmp_path):
    path = tmp_path / "bytes.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "x", "video": b"\x00\x01", "conversations": "[]"}]), path)
    data = ConversationDataset(path, chat=None, num_frames=4, max_len=64)
    assert data[0]["error"] == f"{path}:1: a column holds a value that is not JSON (bytes, a date)"


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


def table_copies(lines, folder) -> dict:
    """The same records as a jsonl, a parquet file and a save_to_disk folder."""
    datasets = pytest.importorskip("datasets")
    records = [json.loads(line) for line in lines]
    (folder / "data.jsonl").write_text("".join(line + "\n" for line in lines))
    pq.write_table(pa.Table.from_pylist(records), folder / "data.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(folder / "data_hf"))
    return {name: folder / name for name in ("data.jsonl", "data.parquet", "data_hf")}


def test_training_on_a_parquet_or_dataset_folder_of_a_jsonl_logs_the_same_losses(tmp_path, synthetic, fresh_flags,
                                                                                   train):
    from conftest import read_log
    lines = (synthetic / "sft_video.jsonl").read_text().splitlines()[:24]
    losses = {}
    for name, data in table_copies(lines, tmp_path).items():
        out = tmp_path / f"out_{name}"
        result = train("train_sft.py", "--stage=video", f"--data_path={data}", f"--media_root={synthetic}",
                       f"--out_dir={out}", *fresh_flags)
        assert result.returncode == 0, result.stderr
        losses[name] = [row["loss"] for row in read_log(out / "logs" / "sft_video_32.jsonl")]
    assert len(losses["data.jsonl"]) == 3
    assert losses["data.parquet"] == losses["data.jsonl"] and losses["data_hf"] == losses["data.jsonl"]


def test_scoring_a_parquet_or_dataset_folder_gives_the_jsonl_predictions_and_metrics(tmp_path, synthetic,
                                                                                      video_checkpoint):
    from conftest import run_python
    lines = (synthetic / "test.jsonl").read_text().splitlines()
    runs = {}
    for name, data in table_copies(lines, tmp_path).items():
        preds, metrics = tmp_path / f"{name}.preds.jsonl", tmp_path / f"{name}.metrics.json"
        result = run_python("eval.py", f"--weight={video_checkpoint}", f"--data_path={data}",
                            f"--media_root={synthetic}", f"--out={preds}", f"--metrics_out={metrics}",
                            "--max_new_tokens=8", "--batch_size=8")
        assert result.returncode == 0, result.stderr
        scores = {k: v for k, v in json.loads(metrics.read_text()).items() if k != "seconds"}   # wall time
        runs[name] = (preds.read_text().splitlines(), scores)
    predictions, metrics = runs["data.jsonl"]
    assert len(predictions) == len(lines) and metrics["n"] == len(lines) and metrics["skipped"] == 0
    assert runs["data.parquet"] == runs["data.jsonl"] and runs["data_hf"] == runs["data.jsonl"]
