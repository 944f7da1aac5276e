"""MiniMind-V's parquet layout (a JSON-string "conversations" column, "image_bytes" holding one image or a list):
converted by convert_data.py or read directly as --data_path, its images written once, named by content, and
reaching the model bit-identical; text-only rows drop the placeholder image; bad bytes skip one row."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from conftest import read_log, run_python  # noqa: E402
from dataset.annotations import AnnotationStore  # noqa: E402
from dataset.vlm_dataset import ConversationDataset  # noqa: E402


def png_bytes(seed: int, size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def turns(question: str, answer: str) -> str:
    return json.dumps([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                      ensure_ascii=False)


PLACEHOLDER = png_bytes(9, (8, 8))
ROWS = [
    {"conversations": turns("<image>\nDescribe this image.", "A red square."), "image_bytes": png_bytes(0)},
    {"conversations": turns("What time of day is it?<image>", "Noon."), "image_bytes": png_bytes(1)},
    {"conversations": turns("<image>\nAgain: describe it.", "A red square."), "image_bytes": png_bytes(0)},
    {"conversations": turns("What is two plus two?", "Four."), "image_bytes": PLACEHOLDER},   # text only
    {"conversations": turns("<image>\nDescribe this image.", "?"), "image_bytes": b"not an image"},
]
MULTI = {"conversations": turns("<image> and <image>: which is brighter?", "The first."),
         "image_bytes": [png_bytes(2), png_bytes(3)]}


def write_minimind_parquet(path, rows, listed=False):
    """listed: the image column a list of images in every row (a single image a list of one)."""
    if listed:
        rows = [{**r, "image_bytes": r["image_bytes"] if isinstance(r["image_bytes"], list) else [r["image_bytes"]]}
                for r in rows]
    images = pa.list_(pa.binary()) if listed else pa.binary()
    schema = pa.schema([("conversations", pa.string()), ("image_bytes", images)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_parquet_loads_directly_images_written_once_by_content(tmp_path):
    path = tmp_path / "sft_i2t.parquet"
    write_minimind_parquet(path, ROWS)
    store = AnnotationStore(path)
    records = [store.record(i)[1] for i in range(len(ROWS))]
    names = [r.get("image") for r in records[:4]]
    assert names[0] == names[2] and names[0] != names[1] and names[3] is None   # one file per distinct image
    assert all(n.startswith("sft_i2t_images/") and n.endswith(".png") for n in names[:3])
    assert (tmp_path / names[0]).read_bytes() == ROWS[0]["image_bytes"]
    assert (tmp_path / names[1]).read_bytes() == ROWS[1]["image_bytes"]
    assert sorted(p.name for p in (tmp_path / "sft_i2t_images").iterdir()) == sorted({n.split("/")[1] for n in names[:3]})
    assert records[1]["conversations"][0]["content"] == "What time of day is it?<image>"
    assert records[3] == {"id": "sft_i2t_3", "conversations": json.loads(ROWS[3]["conversations"])}
    assert records[4].startswith("'image_bytes' is not a JPEG, PNG, WebP or BMP image (12 bytes")
    data = ConversationDataset(path, chat=None, num_frames=4, max_len=64)
    assert data[4]["error"].startswith(f"{path}:5: 'image_bytes' is not a JPEG, PNG, WebP or BMP image")
    # The images folder removed: the store is rebuilt and writes them again, under the same names.
    for image in (tmp_path / "sft_i2t_images").iterdir():
        image.unlink()
    (tmp_path / "sft_i2t_images").rmdir()
    assert [AnnotationStore(path).record(i)[1].get("image") for i in range(4)] == names
    assert (tmp_path / names[1]).read_bytes() == ROWS[1]["image_bytes"]


def test_convert_gives_the_records_direct_loading_gives(tmp_path):
    path = tmp_path / "sft_i2t.parquet"
    write_minimind_parquet(path, [*ROWS, MULTI], listed=True)
    out = tmp_path / "sft_i2t.jsonl"
    result = run_python("scripts/convert_data.py", "--format=minimind-v", f"--input={path}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert "read 6, written 5" in result.stdout and "skipped bad_image: 1" in result.stdout
    assert f"skipped {path}:row 5: 'image_bytes' is not a JPEG, PNG, WebP or BMP image" in result.stderr
    converted = [json.loads(line) for line in out.read_text().splitlines()]
    store = AnnotationStore(path)
    direct = [store.record(i)[1] for i in (0, 1, 2, 3, 5)]
    assert [r["image"] if "image" in r else None for r in converted] == \
        [r["image"] if "image" in r else None for r in direct]   # the same paths: the same feature-cache keys
    assert [r["conversations"] for r in converted] == [r["conversations"] for r in direct]
    multi = converted[-1]
    assert len(multi["image"]) == 2 and [(tmp_path / p).read_bytes() for p in multi["image"]] == MULTI["image_bytes"]
    elsewhere = tmp_path / "elsewhere" / "data.jsonl"
    result = run_python("scripts/convert_data.py", "--format=minimind-v", f"--input={path}", f"--out={elsewhere}",
                        f"--image_dir={tmp_path / 'pics'}")
    assert result.returncode == 0, result.stderr
    first = json.loads(elsewhere.read_text().splitlines()[0])
    assert first["image"].startswith("../pics/") and (elsewhere.parent / first["image"]).read_bytes() == ROWS[0]["image_bytes"]


def test_images_reach_the_model_bit_identical(tmp_path, tokenizer):
    from model.chat import ChatEncoder
    path = tmp_path / "sft_i2t.parquet"
    write_minimind_parquet(path, ROWS[:2])
    seen = []
    data = ConversationDataset(path, chat=ChatEncoder(tokenizer, 4), num_frames=4, max_len=256,
                               preprocess=lambda pixels: seen.append(pixels) or torch.zeros(1))
    for i in range(2):
        assert "error" not in data[i], data[i]
        original = np.asarray(Image.open(io.BytesIO(ROWS[i]["image_bytes"])).convert("RGB"))
        assert np.array_equal(seen[i][0], original)


def test_training_on_the_minimind_parquet_of_image_records_logs_the_jsonl_losses(tmp_path, synthetic, fresh_flags,
                                                                                  train):
    records = [json.loads(line) for line in (synthetic / "sft_image.jsonl").read_text().splitlines()]
    rows = [{"conversations": json.dumps(r["conversations"]), "image_bytes": (synthetic / r["image"]).read_bytes()}
            for r in records]
    write_minimind_parquet(tmp_path / "sft_i2t.parquet", rows)
    losses = {}
    for name, data in (("jsonl", synthetic / "sft_image.jsonl"), ("parquet", tmp_path / "sft_i2t.parquet")):
        result = train("train_sft.py", "--stage=image", f"--data_path={data}", f"--out_dir={tmp_path / name}",
                       *fresh_flags)
        assert result.returncode == 0, result.stderr
        losses[name] = [row["loss"] for row in read_log(tmp_path / name / "logs" / "sft_image_32.jsonl")]
    assert len(losses["jsonl"]) == 3 and losses["parquet"] == losses["jsonl"]


def test_the_feature_cache_keys_embedded_images_by_their_paths(tmp_path, synthetic, vision_file, fresh_flags, train):
    from dataset.features import read_index
    records = [json.loads(line) for line in (synthetic / "sft_image.jsonl").read_text().splitlines()]
    rows = [{"conversations": json.dumps(r["conversations"]), "image_bytes": (synthetic / r["image"]).read_bytes()}
            for r in records]
    path, cache = tmp_path / "sft_i2t.parquet", tmp_path / "features"
    write_minimind_parquet(path, rows)
    result = run_python("scripts/extract_features.py", f"--data={path}", "--clip_model=ViT-Tiny-16",
                        "--clip_image_size=32", f"--clip_pretrained={vision_file}", "--num_frames=4",
                        f"--out={cache}", "--num_workers=0")
    assert result.returncode == 0, result.stderr
    assert set(read_index(cache)) == AnnotationStore(path).media_keys() == \
        {f"sft_i2t_images/{p.name}" for p in (tmp_path / "sft_i2t_images").iterdir()}
    result = train("train_sft.py", "--stage=image", f"--data_path={path}", f"--out_dir={tmp_path / 'out'}",
                   *fresh_flags, "--max_steps=1", f"--feature_dir={cache}")
    assert result.returncode == 0, result.stderr
    assert "not in the feature cache" not in result.stderr


def test_a_table_in_a_read_only_folder_gets_its_images_beside_its_store(tmp_path, monkeypatch):
    import dataset.annotations as annotations
    table_dir, cache = tmp_path / "read_only", tmp_path / "cache"
    table_dir.mkdir()
    path = table_dir / "sft_i2t.parquet"
    write_minimind_parquet(path, ROWS[:1])
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(annotations.os, "access", lambda p, mode: Path(p).resolve() != table_dir.resolve())
    store = AnnotationStore(path)
    name = store.record(0)[1]["image"]
    assert store.folder.parent == cache / "tiny-vlm" / "annotations"
    assert (table_dir / name).resolve().parent == store.folder.parent / "sft_i2t_images"
    assert (table_dir / name).read_bytes() == ROWS[0]["image_bytes"] and not (table_dir / "sft_i2t_images").exists()
