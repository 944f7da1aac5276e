"""Parquet files and Hugging Face dataset folders (save_to_disk) as our jsonl records: the column mapping
(docs/data-format.md), applied batch by batch while the annotation store is built; needs pyarrow, no network."""
import json
import os
from pathlib import Path

from model.chat import BadSample

# Columns carried into a record, as our schema names them (any other column is dropped).
FIELDS = ("id", "video", "image", "conversations", "category", "subset", "references", "span", "duration",
          "phrasing", "source")
ALIASES = {"messages": "conversations"}   # OpenAI-style message lists
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
BATCH_ROWS = 1024
UNREADABLE = "unreadable row: "   # prefix of the JSON string that stands for a row that gives no record


class TableError(BadSample):
    """A parquet file or dataset folder that cannot be read as a whole; one line naming it."""


def is_table(path) -> bool:
    path = Path(path)
    return path.suffix == ".parquet" or path.is_dir()


def table_files(path) -> list:
    """The files whose sizes and times identify this version of the table."""
    path = Path(path)
    return [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())


def turn(value):
    """One turn as our schema has it: {"role", "content"}, from ShareGPT's {"from", "value"} too."""
    if not isinstance(value, dict):
        return value
    value = {k: v for k, v in value.items() if v is not None}
    if "role" not in value and "from" in value:
        return {"role": SHAREGPT_ROLES.get(value["from"], value["from"]), "content": value.get("value")}
    return value


def to_record(row: dict) -> dict:
    """A table row → a record of our schema: known columns only, nulls dropped, a conversation given as
    a JSON string parsed, ShareGPT turns renamed."""
    row = {ALIASES.get(k, k): v for k, v in row.items()}
    record = {k: row[k] for k in FIELDS if row.get(k) is not None}
    turns = record.get("conversations")
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            return record   # left as a string: reported as a bad conversation when the sample is read
    if isinstance(turns, list):
        record["conversations"] = [turn(t) for t in turns]
    return record


def record_batches(path):
    """Lists of row dicts, a batch at a time: a parquet file, or the Arrow files of a save_to_disk folder."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(f"{path}: reading parquet and dataset folders needs pyarrow (pip install pyarrow)") from None
    path = Path(path)
    try:
        if path.is_file():
            for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
                yield batch.to_pylist()
            return
        if (path / "dataset_dict.json").exists():
            raise TableError(f"{path}: a DatasetDict folder; give one split's folder (e.g. {path / 'train'})")
        try:
            files = [f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise TableError(f"{path}: not a Hugging Face dataset folder (save_to_disk: state.json and .arrow files)") from None
        for name in files:
            with pa.memory_map(str(path / name)) as source:
                for batch in pa.ipc.open_stream(source):
                    yield batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise TableError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None


def write_records(path, out_path, image_dir=None):
    """Render the table's rows as jsonl lines of our schema, one per row (a row that cannot be rendered
    becomes a line naming why, reported as that row's error when read). MiniMind-V's rows (an
    "image_bytes" column) go through its converter, their images written once under image_dir.
    Returns whether the table has such a column."""
    from dataset.converters import Options, Skip, from_minimind   # converters reads tables too
    opts = Options(out_dir=str(Path(path).parent), image_dir=str(image_dir), id_prefix=Path(path).stem)

    def render(row: dict, index: int) -> str:
        try:
            record = from_minimind(row, index, opts) if "image_bytes" in row else to_record(row)
            return json.dumps(record, ensure_ascii=False)
        except Skip as e:
            return json.dumps(UNREADABLE + str(e))
        except (TypeError, ValueError):   # e.g. bytes or dates in a known column
            return json.dumps(UNREADABLE + "a column holds a value that is not JSON (bytes, a date)")

    rows = (row for batch in record_batches(path) for row in batch)
    embedded = False
    with open(out_path, "w", encoding="utf-8") as out:
        for index, row in enumerate(rows):
            embedded = embedded or "image_bytes" in row
            out.write(render(row, index) + "\n")
        out.flush()
        os.fsync(out.fileno())
    return embedded
