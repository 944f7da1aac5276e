"""Packed batches (dataset/packing.py): fewer rows, the same conversations, the same loss and gradients;
each conversation computed as if alone; the trainer's packed and padded runs take the same steps."""
import pytest
import torch

from conftest import read_log, tiny_vlm
from dataset.packing import first_fit_decreasing, packing_inputs
from dataset.vlm_dataset import MediaEntry, collate, visual_inputs
from model.lm import segment_mask, segment_spans, span_attention

VISION = 3   # tiny_vlm's slot token id
PAD = 0


def conversation(n_tokens: int, n_media: int, seed: int) -> dict:
    """A sample as ConversationDataset gives it: ids with 2 visual slots per media, labels on the tail."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (n_tokens,), generator=g)
    ids[1:1 + 2 * n_media] = VISION
    labels = torch.full_like(ids, -100)
    labels[n_tokens // 2:] = ids[n_tokens // 2:]
    media = [MediaEntry("features", torch.randn(4, 16, generator=g), torch.arange(4.0)) for _ in range(n_media)]
    return {"input_ids": ids, "labels": labels, "media": media}


ITEMS = [conversation(n, m, s) for s, (n, m) in enumerate([(40, 1), (9, 0), (17, 1), (12, 2), (25, 0), (8, 1)])]


def loss_and_grads(model, batch):
    model.zero_grad()
    loss, count = model(batch["input_ids"], batch["labels"], *visual_inputs(batch["media"]), **packing_inputs(batch))
    loss.backward()
    return float(loss.detach()), int(count), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_first_fit_decreasing_places_every_item_once_within_capacity():
    lengths = [40, 9, 17, 12, 25, 8]
    rows = first_fit_decreasing(lengths, 40)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 40 for row in rows)
    assert rows[0] == [0] and len(rows) == 3   # 40 | 25 + 12 | 17 + 9 + 8


def test_a_packed_batch_has_fewer_rows_and_the_same_loss_and_gradients():
    model = tiny_vlm().train()
    padded, packed = collate(ITEMS, PAD), collate(ITEMS, PAD, pack=True)
    assert packed["input_ids"].shape[0] == 3 < padded["input_ids"].shape[0] == 6
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1] == 40
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum()) == sum(len(i["input_ids"]) for i in ITEMS)
    loss_padded, count_padded, grads_padded = loss_and_grads(model, padded)
    loss_packed, count_packed, grads_packed = loss_and_grads(model, packed)
    assert count_packed == count_padded
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    assert grads_packed.keys() == grads_padded.keys()
    for name in grads_padded:
        assert torch.allclose(grads_packed[name], grads_padded[name], atol=1e-5, rtol=1e-4), name


def test_each_conversation_in_a_packed_row_gives_its_logits_alone():
    model = tiny_vlm().eval()
    packed = collate(ITEMS, PAD, pack=True)
    with torch.no_grad():
        logits = model(packed["input_ids"], None, *visual_inputs(packed["media"]),
                       position_ids=packed["position_ids"], segments=packed["segments"])
        row, segment = 1, 2   # 25 + 12: the 12-token conversation with two videos, second in its row
        cols = packed["segments"][row] == segment
        alone = ITEMS[3]
        expected = model(alone["input_ids"][None], None, *visual_inputs(alone["media"]))[0]
    assert int(cols.sum()) == 12 and torch.equal(packed["input_ids"][row, cols], alone["input_ids"])
    assert torch.allclose(logits[row, cols], expected, atol=1e-5)


def test_packed_rows_are_attended_span_by_span_as_the_dense_mask_does():
    packed = collate(ITEMS, PAD, pack=True)
    spans = segment_spans(packed["segments"])
    assert spans == [(0, 0, 40), (1, 0, 25), (1, 25, 37), (2, 0, 17), (2, 17, 26), (2, 26, 34)]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, heads, 40, 8, generator=g) for heads in (4, 2, 2))
    segments = packed["segments"]   # the dense mask is what an accelerator gets
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=segment_mask(segments), enable_gqa=True)
    by_span = span_attention(q, k, v, spans, 0.0, True)
    real = (segments > 0)[:, None, :, None]
    assert torch.allclose(by_span * real, dense * real, atol=1e-6)
    assert not by_span[~real.expand_as(by_span)].any()   # padding attends nothing
    with pytest.raises(ValueError, match="no attention_mask"):
        tiny_vlm().lm.hidden(torch.zeros(3, 40, 32), segments=segments, attention_mask=segments > 0)


def test_a_batch_packing_cannot_shrink_stays_padded():
    same = [conversation(10, 0, s) for s in range(3)]
    batch = collate(same, PAD, pack=True)
    assert "segments" not in batch and batch["input_ids"].shape == (3, 10)


def test_packed_and_padded_training_take_the_same_steps(train, synthetic, mixed_lengths, fresh_flags, tmp_path):
    losses = {}
    for flag in ("--pack", "--no-pack"):
        out = tmp_path / flag.strip("-")
        result = train("train_sft.py", "--stage=video", f"--data_path={mixed_lengths}", f"--media_root={synthetic}",
                       f"--out_dir={out}", *fresh_flags, "--max_steps=4", "--batch_size=6", flag)
        assert result.returncode == 0, result.stderr
        losses[flag] = read_log(out / "logs" / "sft_video_32.jsonl")
    packed, padded = losses["--pack"], losses["--no-pack"]
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], rel=1e-4)
    assert all(r["pad_share"] < p["pad_share"] for r, p in zip(packed, padded))   # packing happened
