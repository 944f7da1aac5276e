"""Packed training batches: a micro-batch's conversations share rows, each attending only to itself.

A padded batch is as wide as its longest conversation, and every shorter one leaves the rest of its row
as padding. Packing puts the conversations into rows of that same width, first-fit by decreasing length,
so the batch has fewer rows and almost no padding, while its attention per row costs no more than a
padded row's. The micro-batch keeps the same conversations, so each step learns from the same tokens,
with the same loss: only where they sit changes. Within a row, `segments` numbers the conversations
(1, 2, ...; 0 is padding): the LM masks attention to keys of the same segment, and positions restart at 0
for every conversation, so each one is computed as if it were alone.
"""
import torch

from model.chat import IGNORE


def first_fit_decreasing(lengths: list, capacity: int) -> list:
    """Rows of item indices whose lengths sum to at most capacity, longest items placed first."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[row].append(i)
            room[row] -= lengths[i]
    return rows


def packed_rows(items: list):
    """The rows to pack the items into (as wide as the longest item), or None when packing saves no row."""
    lengths = [len(item["input_ids"]) for item in items]
    rows = first_fit_decreasing(lengths, max(lengths))
    return rows if len(rows) < len(items) else None


def packed_batch(items: list, rows: list, pad_id: int) -> dict:
    """input_ids, labels, attention_mask, position_ids and segments of the packed rows, and the items'
    media in the order of their slots (row by row)."""
    width = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row, start=1):
            n = len(items[i]["input_ids"])
            cols = slice(start, start + n)
            ids[r, cols], labels[r, cols] = items[i]["input_ids"], items[i]["labels"]
            labels[r, start] = IGNORE   # never learn a conversation's first token from the one before it
            positions[r, cols], segments[r, cols] = torch.arange(n), segment
            start += n
    return {"input_ids": ids, "labels": labels, "attention_mask": segments > 0, "position_ids": positions,
            "segments": segments, "media": [m for row in rows for i in row for m in items[i]["media"]]}


def packing_inputs(batch: dict, device="cpu") -> dict:
    """The model's extra keyword inputs for a batch: position_ids and segments when it was packed, else none."""
    return {k: batch[k].to(device) for k in ("position_ids", "segments") if k in batch}
