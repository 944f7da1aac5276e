"""The annotation store: a jsonl file's (or a table's) rows as memory-mapped numpy arrays (byte span and line
number of each record, a length hint, its media keys), built once per file version and reused; each record is
read and parsed on access.

Nothing per row lives in Python objects, so opening a million-row file costs a few arrays of pages mapped
from disk, and DataLoader workers do not grow as Python touches refcounts (copy-on-read of a list of dicts).
"""
import fcntl
import hashlib
import json
import os
from array import array
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dataset.embedded_images import images_folder
from dataset.tables import UNREADABLE, is_table, table_files, write_records
from model.atomic import atomic_write_dir

FORMAT = 1   # bump when the arrays change: stores of another format are rebuilt
KINDS = ("image", "video")
NOT_AN_OBJECT = "line is not a JSON object"
TABLE_TEXT = "records.jsonl"   # a parquet file's or dataset folder's rows, rendered in our schema


def parse_line(raw: bytes):
    """One jsonl line → its record (a dict), or the one-line reason it cannot be one."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "line is not UTF-8 text"
    except json.JSONDecodeError as e:
        return f"malformed JSON ({e.msg})"
    if isinstance(record, str) and record.startswith(UNREADABLE):   # a table's row, rendered by dataset/tables.py
        return record[len(UNREADABLE):]
    return record if isinstance(record, dict) else NOT_AN_OBJECT


def size_hint(record: dict) -> int:
    """A cheap length of a sample: characters of its turns + 32 per media item."""
    turns = record.get("conversations") if isinstance(record.get("conversations"), list) else []
    text = sum(len(t.get("content", "")) for t in turns if isinstance(t, dict) and isinstance(t.get("content"), str))
    return text + 32 * sum(media_count(record.get(k)) for k in KINDS)


def media_count(value) -> int:   # a malformed field (a number, an object) is reported when the sample is read
    return 1 if isinstance(value, str) else len(value) if isinstance(value, list) else 0


def media_items(record: dict) -> list:
    """(kind, path) of each media item the record names; malformed media fields name none (the dataset
    reports them when the sample is read)."""
    items = []
    for kind in KINDS:
        value = record.get(kind)
        values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        items += [(kind, v) for v in values if isinstance(v, str)]
    return items


class Columns:
    """The arrays being built, one entry per non-blank line (typed arrays: 8 bytes a value, not a Python int)."""

    def __init__(self):
        self.spans, self.hints, self.media_ends, self.media_ids = array("q"), array("q"), array("q"), array("q")
        self.keys = {}   # media path → (id, kind), in first-seen order

    def add(self, start: int, length: int, line: int, record):
        self.spans.extend((start, length, line))
        is_record = isinstance(record, dict)
        self.hints.append(size_hint(record) if is_record else 0)
        for kind, key in media_items(record) if is_record else []:
            self.media_ids.append(self.keys.setdefault(key, (len(self.keys), kind))[0])
        self.media_ends.append(len(self.media_ids))

    def save(self, folder: Path, meta: dict):
        np.save(folder / "spans.npy", np.frombuffer(self.spans, np.int64).reshape(-1, 3))
        np.save(folder / "hints.npy", np.frombuffer(self.hints, np.int64))
        np.save(folder / "media_ends.npy", np.frombuffer(self.media_ends, np.int64))
        np.save(folder / "media_ids.npy", np.frombuffer(self.media_ids, np.int64).astype(np.int32))
        np.save(folder / "media_keys.npy", np.array([k.encode("utf-8") for k in self.keys], dtype=np.bytes_))
        np.save(folder / "media_kinds.npy", np.array([KINDS.index(kind) for _, kind in self.keys.values()], np.int8))
        (folder / "meta.json").write_text(json.dumps({**meta, "rows": len(self.hints)}) + "\n")


def is_blank(raw: bytes) -> bool:
    """Blank lines are no rows (whitespace as str.strip sees it, as the text-mode reader did)."""
    try:
        return not raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


def file_stamp(path) -> dict:
    """What identifies this version of the file (or of a table folder's files): the store is rebuilt
    when any of it changes."""
    stats = [os.stat(f) for f in table_files(path)] if is_table(path) else [os.stat(path)]
    return {"format": FORMAT, "source": str(Path(path).resolve()), "size": sum(st.st_size for st in stats),
            "mtime_ns": max((st.st_mtime_ns for st in stats), default=0), "files": len(stats)}


def scan_jsonl(text_path) -> Columns:
    """One streaming pass over the jsonl: a row per non-blank line."""
    columns, offset = Columns(), 0
    with open(text_path, "rb") as f:
        for number, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not is_blank(raw):
                columns.add(start, len(raw), number, parse_line(raw))
    return columns


def build_store(path, folder: Path):
    """Write the store of a jsonl (or of a table: its rows rendered as jsonl into the store) to `folder`,
    atomically."""
    stamp = file_stamp(path)

    def write(tmp):
        text_path = Path(tmp) / TABLE_TEXT if is_table(path) else path
        meta = dict(stamp)
        if is_table(path):
            images = image_folder(path, folder)
            if write_records(path, text_path, images):
                meta["image_dir"] = str(images)   # removed later: the store is rebuilt, the images written again
        scan_jsonl(text_path).save(Path(tmp), meta)
    atomic_write_dir(folder, write)


def image_folder(path, folder: Path) -> Path:
    """Where a table's embedded images go: beside it, or beside its store when its folder is not writable."""
    parent = Path(path).resolve().parent
    return images_folder(path, parent if os.access(parent, os.W_OK) else folder.parent)


def store_folder(path, cache_dir=None) -> Path:
    """Beside the jsonl (.<name>.store), or under cache_dir (or ~/.cache/tiny-vlm/annotations when the jsonl's
    folder is not writable), named by a hash of the file's absolute path."""
    path = Path(path).resolve()
    if cache_dir is None and os.access(path.parent, os.W_OK):
        return path.parent / f".{path.name}.store"
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tiny-vlm" / "annotations"
    return root / f"{hashlib.sha1(str(path).encode()).hexdigest()[:16]}-{path.name}.store"


def is_current(folder: Path, path) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if "image_dir" in meta and not Path(meta["image_dir"]).is_dir():
        return False
    return all(meta.get(k) == v for k, v in file_stamp(path).items() if k != "source")


@contextmanager
def build_lock(folder: Path):
    """An exclusive lock beside the store folder (flock: released when the holder exits or dies)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class AnnotationStore:
    """The rows of one jsonl file: len(store), store.record(row) → (line number, record or error string),
    store.hints (a length per row), store.media_keys(rows). Rows are the file's non-blank lines, in order;
    of a parquet file or dataset folder, its rows in order (numbered from 1, as lines are)."""

    def __init__(self, path, cache_dir=None):
        self.path, self.cache_dir = str(path), cache_dir
        self.folder = store_folder(path, cache_dir)
        with build_lock(self.folder):   # DDP ranks opening a new file at once: one builds, the others wait
            if not is_current(self.folder, path):
                build_store(path, self.folder)
        load = lambda name: np.load(self.folder / f"{name}.npy", mmap_mode="r")
        self.spans, self.hints = load("spans"), load("hints")
        self.media_ends, self.media_ids = load("media_ends"), load("media_ids")
        self.keys, self.kinds = load("media_keys"), load("media_kinds")
        self.fd = os.open(self.folder / TABLE_TEXT if is_table(path) else self.path, os.O_RDONLY)

    def __len__(self):
        return len(self.hints)

    def record(self, row: int):
        """(line number, the record, or the reason the line is no record). Read with pread, not mmap: the
        text passes through the page cache without becoming part of every worker's resident memory."""
        start, length, line = (int(x) for x in self.spans[row])
        return line, parse_line(os.pread(self.fd, length, start))

    def media_ids_of(self, rows) -> np.ndarray:
        """The media key ids named by the given (distinct) rows; all rows when None."""
        if rows is None or len(rows) == len(self):
            return np.asarray(self.media_ids)
        chosen = np.zeros(len(self), bool)
        chosen[np.asarray(rows)] = True
        counts = np.diff(np.asarray(self.media_ends), prepend=0)
        return np.asarray(self.media_ids)[np.repeat(chosen, counts)]

    def media_keys(self, rows=None) -> set:
        return {key.decode("utf-8") for key in self.keys[np.unique(self.media_ids_of(rows))]}

    def media_table(self) -> list:
        """Every distinct (kind, path), in the order the file first names them."""
        return [(KINDS[kind], key.decode("utf-8")) for key, kind in zip(self.keys, self.kinds)]

    def __getstate__(self):   # a spawned worker maps the store again rather than receiving copies of it
        return {"path": self.path, "cache_dir": self.cache_dir}

    def __setstate__(self, state):
        self.__init__(state["path"], state["cache_dir"])

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)
