"""Images carried in annotation rows as bytes (MiniMind-V's parquet `image_bytes`) → image files named by their
content, written once: the loader, the feature cache and the converter then see ordinary image paths that
stay the same from run to run, and an image shared by many rows is stored (and encoded) once."""
import hashlib
from pathlib import Path

from dataset.media import IMAGE_SUFFIXES
from model.atomic import atomic_write

# The first bytes of each format we read → the suffix its file gets (and the media loader reads). A header
# check, not a decode: a corrupt image past its header is reported when the sample reads it.
MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"BM", ".bmp"))
assert {suffix for _, suffix in MAGIC} | {".webp"} <= IMAGE_SUFFIXES
HASH_CHARS = 24   # of sha256's hex digest: 96 bits, no collision among billions of images


class BadImageBytes(ValueError):
    """A row's image bytes that are no image we read; one line."""


def byte_list(value) -> list:
    """One image or a list of them, each as bytes or as the datasets library's Image struct {"bytes", "path"}."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        data = item.get("bytes") if isinstance(item, dict) else item
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise BadImageBytes(f"'image_bytes' holds {type(data).__name__}, not image bytes")
        out.append(bytes(data))
    return out


def image_suffix(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for magic, suffix in MAGIC:
        if data.startswith(magic):
            return suffix
    raise BadImageBytes(f"'image_bytes' is not a JPEG, PNG, WebP or BMP image ({len(data)} bytes, "
                        f"starting {data[:8]!r})")


def save_image(data: bytes, folder) -> Path:
    """The file holding exactly these bytes, written (atomically) the first time they are seen."""
    path = Path(folder) / (hashlib.sha256(data).hexdigest()[:HASH_CHARS] + image_suffix(data))
    if not path.exists():
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


def images_folder(table_path, parent=None) -> Path:
    """Where a table's embedded images go: <parent (default: the table's folder)>/<its name without suffix>_images/.
    The names are content hashes, so tables that share a folder's name can share the folder."""
    table_path = Path(table_path)
    name = table_path.stem if table_path.is_file() else table_path.name
    return Path(parent if parent is not None else table_path.parent) / f"{name}_images"
