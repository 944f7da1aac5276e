"""Scale: gradient checkpointing, feature extraction split across ranks and resumed, the VRAM script."""
import argparse
import json
import sys

import pytest
import torch

import extract_features
import measure_vram
from conftest import CLIP_MODEL, CLIP_SIZE, run_python
from dataset.features import MANIFEST, FeatureCache
from model.config import LMConfig
from model.lm import LanguageModel


def lm_gradients(checkpointing: bool, calls: list, packed: bool = False):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=64,
                   max_seq_len=64, dropout=0.2)
    lm = LanguageModel(cfg).train()
    lm.grad_checkpointing = checkpointing
    for block in lm.layers:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    embeds = lm.embed_tokens(torch.randint(0, 64, (2, 16)))
    torch.manual_seed(1)   # the dropout masks
    # packed: two conversations in row 0, one and padding in row 1 (attended span by span)
    segments = torch.tensor([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4]) if packed else None
    loss = lm.logits(lm.hidden(embeds, segments=segments)).float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in lm.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_gradients(packed):
    plain_calls, recomputed_calls = [], []
    loss, grads = lm_gradients(False, plain_calls, packed)
    loss_ckpt, grads_ckpt = lm_gradients(True, recomputed_calls, packed)
    assert len(plain_calls) == 3 and len(recomputed_calls) == 6   # each block ran again in the backward pass
    assert torch.equal(loss, loss_ckpt)
    assert all(torch.allclose(grads[k], grads_ckpt[k], rtol=0, atol=1e-7) for k in grads)   # dropout masks replayed


# ---------------------------------------------------------------- split, resumable feature extraction

def extract(monkeypatch, capsys, synthetic, vision_file, out, *flags):
    monkeypatch.setattr(sys, "argv", ["extract_features.py", f"--data={synthetic / 'sft_video.jsonl'}",
                                      f"--clip_model={CLIP_MODEL}", f"--clip_image_size={CLIP_SIZE}",
                                      f"--clip_pretrained={vision_file}", "--num_frames=4", f"--out={out}",
                                      "--num_workers=0", *flags])
    extract_features.main()
    return capsys.readouterr().out


def assert_same_features(folder, reference):
    cache, expected = FeatureCache(folder), FeatureCache(reference)
    assert set(cache.index) == set(expected.index)
    for key in expected.index:
        assert torch.allclose(cache.get(key).float(), expected.get(key).float(), atol=2e-3), key


def test_extraction_split_over_two_ranks_is_one_cache_and_merges(tmp_path, synthetic, vision_file, feature_cache,
                                                                  monkeypatch, capsys):
    out = tmp_path / "cache"
    first = extract(monkeypatch, capsys, synthetic, vision_file, out, "--rank=0", "--world_size=2")
    second = extract(monkeypatch, capsys, synthetic, vision_file, out, "--rank=1", "--world_size=2")
    assert "part 1/2: 6 new media" in first and "part 2/2: 6 new media" in second
    assert sorted(p.name for p in out.glob("manifest*")) == ["manifest_r0.json", "manifest_r1.json"]
    parts = [set(json.loads((out / f"manifest_r{rank}.json").read_text())) for rank in (0, 1)]
    assert not parts[0] & parts[1]
    assert_same_features(out, feature_cache)   # the parts read as one cache, before any merge
    extract(monkeypatch, capsys, synthetic, vision_file, out, "--merge")
    assert sorted(p.name for p in out.glob("manifest*")) == [MANIFEST]
    assert_same_features(out, feature_cache)
    assert "0 new media" in extract(monkeypatch, capsys, synthetic, vision_file, out)


def test_an_interrupted_extraction_resumes_with_only_what_is_missing(tmp_path, synthetic, vision_file, feature_cache,
                                                                     monkeypatch, capsys):
    out = tmp_path / "cache"
    encode = extract_features.FrameEncoder.encode_inputs
    batches = []

    def dies_at_the_third_batch(self, pixels, *args):
        batches.append(len(pixels))
        if len(batches) == 3:
            raise KeyboardInterrupt
        return encode(self, pixels, *args)

    monkeypatch.setattr(extract_features.FrameEncoder, "encode_inputs", dies_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(monkeypatch, capsys, synthetic, vision_file, out, "--batch_size=2", "--shard_size=2")
    assert len(FeatureCache(out)) == 4   # two full shards made it to disk before the stop
    monkeypatch.setattr(extract_features.FrameEncoder, "encode_inputs", encode)
    assert "8 new media" in extract(monkeypatch, capsys, synthetic, vision_file, out, "--batch_size=2", "--shard_size=2")
    assert_same_features(out, feature_cache)


def test_extraction_under_torchrun_splits_and_rank_0_merges(tmp_path, synthetic, vision_file, feature_cache):
    out = tmp_path / "cache"
    result = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "scripts/extract_features.py", f"--data={synthetic / 'sft_video.jsonl'}",
                        f"--clip_model={CLIP_MODEL}", f"--clip_image_size={CLIP_SIZE}",
                        f"--clip_pretrained={vision_file}", "--num_frames=4", f"--out={out}", "--num_workers=0",
                        "--device=cpu", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "part 1/2: 6 new media" in result.stdout and "part 2/2: 6 new media" in result.stdout
    assert sorted(p.name for p in out.glob("manifest*")) == [MANIFEST]
    assert len({p.name for p in out.glob("shard_r*.safetensors")}) == 2
    assert_same_features(out, feature_cache)


# ---------------------------------------------------------------- the VRAM script

def test_the_vram_step_trains_on_cpu(monkeypatch):
    monkeypatch.setitem(measure_vram.PRESETS, "tiny", dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                                           intermediate_size=64))
    model = measure_vram.build("tiny", vocab_size=64, clip_dim=16, num_frames=4, num_visual_tokens=2, device="cpu")
    model.lm.grad_checkpointing = True
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = measure_vram.random_batch(model, 3, 24, "cpu", torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", enabled=False)
    losses = [measure_vram.train_step(model, optimizer, batch, autocast) for _ in range(5)]
    assert losses[-1] < losses[0]


def test_the_vram_script_without_cuda_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["measure_vram.py"])
    with pytest.raises(SystemExit) as stop:
        measure_vram.main()
    assert "needs a CUDA device" in str(stop.value.code) and "\n" not in str(stop.value.code)


def test_the_vram_estimate_counts_states_and_grows_with_the_batch(monkeypatch):
    monkeypatch.setitem(measure_vram.PRESETS, "tiny", dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                                           intermediate_size=64))
    args = argparse.Namespace(preset="tiny", batch_sizes=[1, 2, 4], seq_len=24, num_frames=4, num_visual_tokens=2,
                              vocab_size=64, clip_dim=16, dtype="bf16", grad_checkpointing=False)
    (_, states1, acts1), (_, _, acts2), (_, states4, acts4) = measure_vram.estimate(args)
    params = sum(p.numel() for p in measure_vram.build("tiny", 64, 16, 4, 2, "cpu").parameters())
    assert states1 == states4 == 16 * params   # fp32 weights, grads and AdamW's two moments
    per_sample = acts2 - acts1
    assert per_sample > 0 and acts4 - acts1 == pytest.approx(3 * per_sample, rel=0.01)   # linear in the batch
